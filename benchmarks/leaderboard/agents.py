"""How the leaderboard meets the agents: each exports ``Config`` (its typed schema) and ``run(cfg)`` from
``agents/<name>/__main__.py``; the leaderboard composes the agent's Hydra config, imposes the shared settings,
runs it under the budget and measures one iteration's cost (calibration)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from agents.common.config import ConfigError, merge_schema
from benchmarks.leaderboard.config import CONF_DIR, ROOT, LeaderboardConfig
from dialogue_gym.budget import LIMITS, Budget, BudgetExhausted, Usage, use_budget

log = logging.getLogger("benchmarks.leaderboard")
SHARED = ("env", "policy", "sampling", "eval", "seed", "iterations", "run_dir", "export", "optim")
# Arms: one agent package run with fixed settings under its own name (GRPO's two credits are separate entries);
# the arm's overrides come first, so ``overrides.<arm>`` can still change anything else.
ARMS = {"grpo_turn": ("grpo", ["credit=turn"]), "grpo_traj": ("grpo", ["credit=trajectory"])}


def available_agents() -> list[str]:
    """The agent packages with an entry point (``agents/<name>/__main__.py``), and the :data:`ARMS`."""
    return sorted([p.name for p in (ROOT / "agents").iterdir() if (p / "__main__.py").is_file()] + list(ARMS))


def agent_module(name: str) -> Any:
    """``agents.<name>.__main__``, which must export ``Config`` (a dataclass schema) and ``run(cfg)``.

    Raises:
        ConfigError: no such agent (naming the ones that exist), or it does not keep the contract.
    """
    name = ARMS[name][0] if name in ARMS else name
    try:
        module = importlib.import_module(f"agents.{name}.__main__")
    except ModuleNotFoundError as e:
        if e.name not in (f"agents.{name}", f"agents.{name}.__main__"):
            raise
        raise ConfigError(f"agents lists {name!r}, but there is no agents/{name}/__main__.py; available: "
                          f"{', '.join(available_agents())}") from None
    if not callable(getattr(module, "run", None)) or not dataclasses.is_dataclass(getattr(module, "Config", None)):
        raise ConfigError(f"agents/{name}/__main__.py must export Config (its config dataclass) and run(cfg)")
    return module


def package(cfg: LeaderboardConfig, name: str) -> str:
    """The agent package an arm runs: ``arms[name]``, else the arm's own name."""
    return cfg.arms.get(name, name)


def base_package(cfg: LeaderboardConfig, name: str) -> tuple[str, list[str]]:
    """The agent package an arm finally runs and the fixed overrides it carries: ``arms[name]`` (or the name), then
    :data:`ARMS` (e.g. ``grpo_turn`` -> ``("grpo", ["credit=turn"])``)."""
    pkg = package(cfg, name)
    base, fixed = ARMS.get(pkg, (pkg, []))
    return base, list(fixed)


def check_agents(cfg: LeaderboardConfig) -> None:
    """Every arm's agent exists and keeps the contract; every override names an agent or an arm."""
    for arm, pkg in cfg.arms.items():
        if pkg not in available_agents():
            raise ConfigError(f"arms.{arm} is {pkg!r}, which is no agent; available: {', '.join(available_agents())}")
    for name in cfg.agents:
        agent_module(package(cfg, name))
    unknown = sorted(set(cfg.overrides) - set(available_agents()) - set(cfg.arms))
    if unknown:
        raise ConfigError(f"overrides name agent(s) {unknown} that do not exist; agents: "
                          f"{', '.join(available_agents())}; arms: {', '.join(cfg.arms) or 'none'}")


def compose_agent_config(name: str, overrides: list[str]) -> DictConfig:
    """The agent's Hydra config (``conf/<name>.yaml`` with ``overrides``), composed as its own entry point would.

    A plain ``key=value`` override may also set a key the YAML file leaves to the agent's schema default (it is
    applied as ``++key=value``); the schema still rejects unknown keys.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o if o.startswith(("+", "~")) else "++" + o for o in overrides]
    if GlobalHydra.instance().is_initialized():  # inside the leaderboard's own Hydra app: same conf/ directory
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides)


def agent_config(cfg: LeaderboardConfig, name: str, seed: int, run_dir: Path, iterations: int | None,
                 lr: float | None = None) -> Any:
    """The agent's typed ``Config`` with the leaderboard's shared settings imposed.

    Shared by every agent: the env, the initial policy and its engine (``policy_engine``), the reply length cap,
    the sampling temperature (when set), the seed; the learning rate when the sweep chose one (``lr``); the
    agent's own in-run evaluation is shrunk to ``agent_eval_dialogues`` (the leaderboard evaluates every policy
    itself) and plays the first of the leaderboard's stored states (its ``eval.seed`` and ``eval.temperature``).
    """
    base, fixed = base_package(cfg, name)
    schema = agent_module(base).Config
    typed = merge_schema(compose_agent_config(base, fixed + list(cfg.overrides.get(name, []))), schema)
    for key in SHARED:
        if not hasattr(typed, key):
            raise ConfigError(f"agent {name!r} has no {key!r} setting; the leaderboard needs it ({schema.__name__})")
    typed.env = dataclasses.replace(cfg.env, task_kwargs=dict(cfg.env.task_kwargs), split="train")
    typed.policy.model = cfg.policy
    typed.policy.engine, typed.policy.engine_memory = cfg.policy_engine, cfg.policy_engine_memory
    typed.sampling.max_new_tokens = cfg.max_new_tokens
    if cfg.temperature is not None:
        typed.sampling.temperature = cfg.temperature
    if lr is not None:
        typed.optim.lr = lr
    typed.eval.dialogues = cfg.agent_eval_dialogues
    typed.eval.seed, typed.eval.temperature = cfg.eval.seed, cfg.eval.temperature  # the same states and seeds
    typed.seed, typed.run_dir, typed.export = seed, str(run_dir), True
    if iterations is not None:
        typed.iterations = iterations
    if hasattr(typed, "resume"):
        typed.resume = False
    return typed


def train(cfg: LeaderboardConfig, name: str, seed: int, run_dir: Path, iterations: int | None, budget: Budget,
          lr: float | None = None) -> tuple[Any, str, float]:
    """Run one agent under ``budget``; returns its typed config, how it stopped and the wall time in seconds."""
    typed = agent_config(cfg, name, seed, run_dir, iterations, lr)
    t0 = time.time()
    stop = "completed"
    with use_budget(budget):
        try:
            agent_module(package(cfg, name)).run(typed)
        except BudgetExhausted as e:
            stop = "budget"
            log.info("%s seed %d stopped by the budget: %s", name, seed, e)
    return typed, stop, time.time() - t0


def limit_text(v: int | None) -> str:
    return "no limit" if v is None else str(v)


def calibration_saved(out: Path, name: str) -> bool:
    """The agent's calibration has been measured in this run directory (``calibrate`` only reads it)."""
    return (out / "calibration" / name / "cost.json").is_file()


def calibrate(cfg: LeaderboardConfig, name: str, out: Path, count_tokens: Any) -> tuple[int, dict[str, int], float]:
    """Iterations that fit the budget, from one measured iteration of the agent (first seed, nothing capped).

    Returns:
        ``(iterations, cost of one iteration, wall seconds of the measured iteration)``; the cost and the wall time
        are saved in ``<out>/calibration/<name>/cost.json`` and reused when present.

    Raises:
        ConfigError: the agent spent nothing the budget limits, or one iteration already exceeds the budget.
    """
    run_dir = out / "calibration" / name
    saved = run_dir / "cost.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        wall = float(data.pop("wall_s", 0.0))
        cost = Usage(**data)
    else:
        budget = Budget(count_tokens=count_tokens)
        typed = agent_config(cfg, name, cfg.seeds[0], run_dir, 1)
        typed.export = False
        t0 = time.time()
        with use_budget(budget):
            agent_module(package(cfg, name)).run(typed)
        cost, wall = budget.usage("train"), time.time() - t0
        saved.write_text(json.dumps({**cost.as_dict(), "wall_s": wall}))
    fits = [getattr(cfg.budget, n) / (getattr(cost, n) * (1 + cfg.budget.margin))
            for n in LIMITS if getattr(cfg.budget, n) is not None and getattr(cost, n) > 0]
    if not fits:
        raise ConfigError(f"agent {name!r} spent none of the limited budget ({', '.join(LIMITS)}) in one iteration: "
                          "the budget cannot bound it (does it train through the env?)")
    iterations = min(cfg.budget.max_iterations, math.floor(min(fits)))
    if iterations < 1:
        limits = ", ".join(f"{n} {limit_text(getattr(cfg.budget, n))}" for n in LIMITS)
        raise ConfigError(f"one iteration of {name!r} costs {cost.as_dict()}, more than the budget ({limits}) "
                          f"allows with margin {cfg.budget.margin}: raise budget.policy_samples or shrink the "
                          f"agent's iterations (overrides.{name})")
    log.info("calibration: one iteration of %s costs %s -> %d iteration(s)", name, cost.as_dict(), iterations)
    return iterations, cost.as_dict(), wall
