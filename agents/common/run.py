"""Run scaffolding shared by the agents: envs, policy engine, evaluation bookkeeping, run directory."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import dialogue_gym  # noqa: F401  (registers MultiTurnDialogue-v0)
from agents.common.config import ConfigError, EvalSettings, SamplingSettings, env_kwargs, merge_schema
from agents.common.distributed import broadcast, setup
from agents.common.evaluation import format_table, play_states, records_result, save_json, states_horizon, summarize
from agents.common.policy import PolicySettings, export_policy
from agents.common.policy_engine import build_policy_engine, sync_policy
from dialogue_gym.config import EnvConfig
from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.base import GenerationEngine
from dialogue_gym.rollout_store import RolloutStore, stored_states
from dialogue_gym.vector import DialogueVectorEnv

log = logging.getLogger("agents")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_vec(env: EnvConfig, num_envs: int, **overrides: Any) -> DialogueVectorEnv:
    """A DialogueVectorEnv in DISABLED autoreset mode (agents decide when each sub-env resets)."""
    kwargs = env_kwargs(env, **overrides)
    if not isinstance(kwargs["task"], str):  # a task instance built once and shared: already configured
        kwargs.pop("task_kwargs")
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=num_envs, autoreset_mode="Disabled", **kwargs)


def sampling_params(s: SamplingSettings, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(temperature=s.temperature if temperature is None else temperature, top_p=s.top_p,
                          max_new_tokens=s.max_new_tokens)


def policy_engine(settings: PolicySettings, model: Any, tokenizer: Any, seed: int) -> GenerationEngine:
    """The policy's generation engine (``policy.engine``): HF on the model being trained, or vLLM with the LoRA
    adapter synced by :func:`agents.common.policy_engine.sync_policy` after each update."""
    return build_policy_engine(settings, model, tokenizer, seed)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class Evaluator:
    """Fixed held-out evaluation: the leaderboard's stored states of the first ``dialogues`` test rows (fixed user
    and policy seeds from ``eval.seed``), per-turn scores (:mod:`agents.common.evaluation`).

    The states and every evaluation's dialogues are kept in the rollout store ``<run_dir>/eval_rollouts.jsonl``
    (policy: the evaluation's name). The first evaluation (the initial policy) is the baseline for every later win
    rate; all evaluations are written to ``<run_dir>/eval.json`` and printed as a table. With ``resume`` an
    existing ``eval.json`` and store are continued (the store's states must be this env's: a changed env
    configuration is an error); otherwise both are replaced.
    """

    STORE = "eval_rollouts.jsonl"

    def __init__(self, env: EnvConfig, settings: EvalSettings, sampling: SamplingSettings, run_dir: Path,
                 resume: bool = False):
        self.settings = settings
        self.sampling = sampling
        self.venv = make_vec(env, settings.dialogues, split=settings.split, reward_mode=settings.reward_mode)
        n_rows = self.venv.num_rows
        if settings.dialogues > n_rows:
            raise ConfigError(f"eval.dialogues is {settings.dialogues} but the {settings.split} split has {n_rows} "
                              f"rows: lower eval.dialogues to at most {n_rows}")
        self.path = run_dir / "eval.json"
        self.store = RolloutStore(run_dir / self.STORE)
        if not resume:
            self.store.path.unlink(missing_ok=True)
        self.states = stored_states(self.store, self.venv, settings.dialogues, settings.seed)
        self.horizon = states_horizon(self.states, self.venv.max_turns)
        self.results: list[dict[str, Any]] = []
        self.raw_baseline: dict[str, Any] | None = None
        if resume and self.path.exists():  # resuming: keep the baseline and earlier evaluations
            saved = json.loads(self.path.read_text())
            self.results = saved["evaluations"]
            self.raw_baseline = {"scores": np.array(saved["baseline_scores"], dtype=float)}

    def evaluate(self, engine: GenerationEngine, name: str) -> dict[str, Any]:
        params = SamplingParams(temperature=self.settings.temperature, top_p=self.sampling.top_p,
                                max_new_tokens=self.sampling.max_new_tokens)
        records = play_states(self.venv, engine, params, self.states, name, {"evaluation": len(self.results)})
        self.store.append(records)
        raw = records_result(records, self.horizon)
        if self.raw_baseline is None:
            self.raw_baseline = raw
        summary = summarize(raw, self.raw_baseline, name)
        summary["conversations"] = raw["conversations"][:4]  # a few transcripts to read
        self.results.append(summary)
        baseline = [[None if np.isnan(x) else float(x) for x in row] for row in self.raw_baseline["scores"]]
        save_json(self.path, {"settings": asdict(self.settings), "store": self.STORE, "baseline_scores": baseline,
                              "evaluations": self.results})
        log.info("evaluation of %s:\n%s", name, format_table([summary]))
        return summary

    def table(self) -> str:
        return format_table(self.results)


def begin(cfg: Any, engine: GenerationEngine, model: Any, logger: Any | None, evaluator: Evaluator | None,
          load: Callable[[], dict[str, Any] | None]) -> tuple[int, dict[str, Any] | None]:
    """The shared start of every agent's loop. With ``cfg.resume``: ``load()`` (the agent's own ``load_checkpoint``
    call) restores the last checkpoint, the policy engine gets the restored weights, and the metric rows a killed
    run logged after that checkpoint (all of them, with none) are dropped. Then the initial evaluation, unless one
    is on record. Returns ``(iteration to start from, the saved state or None)``."""
    start, saved = 0, None
    if cfg.resume:
        saved = load()
        if saved is not None:
            start = saved["iteration"]
            log.info("resumed from %s at iteration %d", Path(cfg.run_dir) / "checkpoints", start)
            sync_policy(engine, model)
        if logger is not None:
            logger.drop_after(start)
    if evaluator is not None and not evaluator.results:
        evaluator.evaluate(engine, "initial")
    return start, saved


def end_iteration(cfg: Any, t: int, done_here: int, metrics: dict[str, float], history: list[dict[str, float]],
                  logger: Any | None, evaluator: Evaluator | None, engine: GenerationEngine,
                  save: Callable[[dict[str, Any]], None] | None) -> bool:
    """The shared end of an agent's iteration ``t``: the optimizer steps' mean ``history`` and their count
    (``loss/steps``) join ``metrics``, the
    logging process (``logger`` not None) logs them, ``save(state)`` writes the checkpoint with ``state =
    {"iteration": t + 1}`` (None on processes that do not save), then :func:`after_iteration`. True when the run
    stops here (``stop_after``; the logger is closed)."""
    for k in history[0] if history else []:
        metrics[k] = float(np.mean([h[k] for h in history]))
    metrics["loss/steps"] = float(len(history))  # optimizer steps this iteration (0: no update)
    if logger is not None:
        logger.log(t + 1, metrics)
    if save is not None:
        save({"iteration": t + 1})
    if after_iteration(cfg, t, done_here, evaluator, engine):
        if logger is not None:
            logger.close()
        return True
    return False


def after_iteration(cfg: Any, t: int, done_here: int, evaluator: Evaluator | None, engine: GenerationEngine) -> bool:
    """Evaluate every ``cfg.eval.every`` iterations; True when ``stop_after`` asks this process to stop now
    (a simulated interruption: the run continues with ``resume=true``). ``evaluator`` is None on the processes of
    a multi-process launch that do not evaluate (all but the main one)."""
    last = t + 1 >= cfg.iterations
    if evaluator is not None and cfg.eval.every and (t + 1) % cfg.eval.every == 0 and not last:
        evaluator.evaluate(engine, f"iteration {t + 1}")
    if cfg.stop_after and done_here >= cfg.stop_after and not last:
        log.info("stopping after %d iteration(s) as asked (stop_after); resume with resume=true", done_here)
        return True
    return False


def finish(name: str, cfg: Any, evaluator: Evaluator | None, engine: GenerationEngine, model: Any, tokenizer: Any,
           run_dir: Path,
           logger: Any) -> dict[str, Any]:
    """Final evaluation, the before/after table, the exported policy (``<run_dir>/policy``); on the processes of a
    multi-process launch that do not evaluate (``evaluator`` None), only the engine is closed."""
    if evaluator is None:
        engine.close()
        return {}
    final = evaluator.evaluate(engine, f"{name} after {cfg.iterations} iteration(s)")
    print(f"\n{name} before/after on held-out states (score at turn h with 95% bootstrap CI; win rate vs initial):")
    print(evaluator.table())
    if cfg.export:
        export_policy(model, tokenizer, run_dir / "policy")
    logger.close()
    engine.close()  # a vLLM policy engine stops its processes now, not at interpreter exit
    return final


def launch(raw: Any, schema: type, run: Any) -> Any:
    """The Hydra entry of every agent: logging, the typed config, Hydra's run directory, then ``run(cfg)``."""
    from hydra.core.hydra_config import HydraConfig

    setup_logging()
    cfg = merge_schema(raw, schema)
    # under `accelerate launch` every process writes to the main process's run directory (Hydra's timestamped
    # directory can differ by a second between processes)
    cfg.run_dir = broadcast(HydraConfig.get().runtime.output_dir, setup())
    return run(cfg)
