"""Stable-Baselines3 (PPO, A2C, DQN) on the dialogue env through its numeric wrappers.

Run:
    python -m agents.sb3 algo=ppo wrapper=choice +env=arithmetic    # pick among K candidate replies
    python -m agents.sb3 algo=dqn wrapper=choice +env=arithmetic
    python -m agents.sb3 algo=ppo wrapper=token +env=arithmetic     # the tiny LM acts one token per step
    python -m agents.sb3 +experiment=sb3_smoke algo=a2c +env=arithmetic   # tiny model, under a minute

What it does:
  1. builds one native batched env of ``num_envs`` sub-envs behind a wrapper (``dialogue_gym.wrappers``) and
     hands it to SB3 as one ``VecEnv`` (one user call and one reward call per step for all sub-envs);
  2. ``wrapper=choice``: each turn a frozen engine (``choice.model``) samples K replies with per-row seeds; the
     observation is its pooled hidden states of the conversation and of each candidate plus a few numbers
     (mean log-probability, length, finished); SB3's MLP policy picks one. ``wrapper=token``: the policy is a
     causal LM (``token.model``) whose own head gives the action logits (``agents/sb3/policy.py``);
  3. trains ``total_timesteps`` steps with SB3's own algorithm (nothing re-implemented here);
  4. evaluates on the first ``eval.dialogues`` test rows with fixed seeds, deterministic actions, against a
     baseline on the same rows and the same candidates: always candidate 0 (``choice``; candidate 0 is a plain
     sample of the frozen engine, so this is "the engine without selection") or the initial policy (``token``).
     Reported: solved share and mean return with 95% bootstrap intervals over test rows, and the paired
     difference. Written to ``<run_dir>/eval.json``; the SB3 model to ``<run_dir>/model.zip`` (``choice``).

Departures from a textbook SB3 run: the sub-envs are one batched env (not ``DummyVecEnv`` copies), and a
blank reply (possible from any engine) ends the episode with ``blank_reward`` -1 rather than erroring.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.common.config import build_task_early
from agents.common.evaluation import bootstrap_ci, save_json
from agents.common.logging import MetricLogger
from agents.common.run import launch, make_vec
from agents.sb3.config import Sb3Config, validate
from dialogue_gym.progress import Progress

log = logging.getLogger("agents.sb3")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def build_wrappers(cfg: Sb3Config) -> tuple[Any, Any, Any]:
    """(training wrapper of ``num_envs`` rows, evaluation wrapper of ``eval.dialogues`` test rows, the LM or None)."""
    from dialogue_gym.wrappers import CandidateChoice, TokenLevel

    n_eval = cfg.eval.dialogues
    if cfg.wrapper == "choice":
        from dialogue_gym.generation.hf import HFEngine

        engine = HFEngine(cfg.choice.model, seed=cfg.seed)  # frozen: shared by training and evaluation
        c = cfg.choice
        kw = dict(k=c.k, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                  max_context_tokens=c.max_context_tokens)
        return (CandidateChoice(make_vec(cfg.env, cfg.num_envs), engine, **kw),
                CandidateChoice(make_vec(cfg.env, n_eval, split="test"), engine, **kw), None)
    from dialogue_gym.models import load_model

    lm, tokenizer = load_model(cfg.token.model, shared=False)
    t = cfg.token
    return (TokenLevel(make_vec(cfg.env, cfg.num_envs), tokenizer, t.window, t.max_reply_tokens),
            TokenLevel(make_vec(cfg.env, n_eval, split="test"), tokenizer, t.window, t.max_reply_tokens), lm)


def build_model(cfg: Sb3Config, venv: Any, lm: Any) -> Any:
    """The SB3 algorithm on the batched VecEnv."""
    from stable_baselines3 import A2C, DQN, PPO

    common = dict(learning_rate=cfg.learning_rate, gamma=cfg.gamma, seed=cfg.seed, device=cfg.device, verbose=0)
    if cfg.wrapper == "token":
        from agents.sb3.policy import LMActorCriticPolicy

        policy, policy_kwargs = LMActorCriticPolicy, {"lm": lm}
    else:
        policy, policy_kwargs = "MlpPolicy", {"net_arch": list(cfg.choice.net_arch)}
    if cfg.algo == "ppo":
        return PPO(policy, venv, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                   ent_coef=cfg.ent_coef, policy_kwargs=policy_kwargs, **common)
    if cfg.algo == "a2c":
        return A2C(policy, venv, n_steps=cfg.n_steps, ent_coef=cfg.ent_coef, policy_kwargs=policy_kwargs, **common)
    return DQN(policy, venv, batch_size=cfg.batch_size, learning_starts=cfg.learning_starts,
               exploration_fraction=cfg.exploration_fraction, buffer_size=max(1000, cfg.total_timesteps),
               train_freq=1, gradient_steps=1, target_update_interval=max(1, cfg.total_timesteps // 8),
               policy_kwargs=policy_kwargs, **common)


def play_eval(batched: Any, act: Any, dialogues: int, seed: int) -> dict[str, np.ndarray]:
    """Play the first ``dialogues`` test rows to the end with ``act(obs) -> actions``; per-row return and turns."""
    obs, _ = batched.reset(seed=seed, options={"task_indices": list(range(dialogues))})
    returns = np.zeros(dialogues)
    turns = np.zeros(dialogues, dtype=int)
    with Progress(total=dialogues, desc="evaluation", unit="dialogue", interval=10) as bar:
        while not batched.done.all():
            obs, rewards, _, _, infos = batched.step(act(obs))
            returns += rewards
            turns += np.array([bool(i.get("turn_ended")) for i in infos], dtype=int)
            bar.update(int(batched.done.sum()) - bar.n)
    return {"returns": returns, "turns": turns}


def compare(trained: dict[str, np.ndarray], baseline: dict[str, np.ndarray], threshold: float,
            n_boot: int) -> dict[str, Any]:
    """Solved share and mean return of both, with 95% bootstrap intervals over test rows, and paired differences."""
    out: dict[str, Any] = {}
    solved = {}
    for name, res in (("trained", trained), ("baseline", baseline)):
        solved[name] = (res["returns"] >= threshold).astype(float)
        out[name] = {"solved": float(solved[name].mean()), "solved_ci": bootstrap_ci(solved[name], n_boot, seed=1),
                     "return": float(res["returns"].mean()), "return_ci": bootstrap_ci(res["returns"], n_boot, seed=2),
                     "turns": float(res["turns"].mean())}
    diff = solved["trained"] - solved["baseline"]
    out["solved_difference"] = float(diff.mean())
    out["solved_difference_ci"] = bootstrap_ci(diff, n_boot, seed=3)
    ret_diff = trained["returns"] - baseline["returns"]
    out["return_difference"] = float(ret_diff.mean())
    out["return_difference_ci"] = bootstrap_ci(ret_diff, n_boot, seed=4)
    return out


def format_comparison(result: dict[str, Any], trained: str, baseline: str) -> str:
    """A Markdown table of :func:`compare`'s result."""
    lines = ["| policy | solved | mean return | turns |", "|---|---|---|---|"]
    for key, name in (("baseline", baseline), ("trained", trained)):
        r = result[key]
        lines.append(f"| {name} | {r['solved']:.3f} [{r['solved_ci'][0]:.3f}, {r['solved_ci'][1]:.3f}] | "
                     f"{r['return']:.3f} [{r['return_ci'][0]:.3f}, {r['return_ci'][1]:.3f}] | {r['turns']:.2f} |")
    lo, hi = result["solved_difference_ci"]
    lines.append(f"| difference (paired) | {result['solved_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                 f"{result['return_difference']:+.3f} [{result['return_difference_ci'][0]:+.3f}, "
                 f"{result['return_difference_ci'][1]:+.3f}] | |")
    return "\n".join(lines)


def progress_callback(total: int, desc: str, logger: MetricLogger) -> Any:
    """An SB3 callback: a progress bar (or log lines) over environment steps, episode returns to metrics.jsonl."""
    from stable_baselines3.common.callbacks import BaseCallback

    class _Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = Progress(total=total, desc=desc, unit="step")
            self.returns: list[float] = []
            self.running = np.zeros(self.training_env.num_envs)

        def _on_step(self) -> bool:
            self.running += self.locals["rewards"]
            for i, done in enumerate(self.locals["dones"]):
                if done:
                    self.returns.append(float(self.running[i]))
                    self.running[i] = 0.0
            self.bar.update(self.training_env.num_envs)
            if self.returns:
                self.bar.set_postfix(ep_return=float(np.mean(self.returns[-32:])))
            return True

        def _on_rollout_end(self) -> None:
            if self.returns:
                logger.log(self.num_timesteps, {"env/episode_return": float(np.mean(self.returns)),
                                                "env/episodes": float(len(self.returns))})
                self.returns = []

        def _on_training_end(self) -> None:
            self.bar.close()

    return _Progress()


def run(cfg: Sb3Config) -> dict[str, Any]:
    validate(cfg)
    build_task_early(cfg.env, cfg.eval.dialogues)  # a missing dataset or too few test rows fail before models load
    from stable_baselines3.common.utils import set_random_seed

    from dialogue_gym.wrappers.sb3 import DialogueSB3VecEnv

    run_dir = Path(cfg.run_dir)
    set_random_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train, test, lm = build_wrappers(cfg)
    venv = DialogueSB3VecEnv(train, seed=cfg.seed)
    model = build_model(cfg, venv, lm)
    logger = MetricLogger(run_dir)
    t0 = time.time()
    if cfg.wrapper == "choice":
        baseline_name = "always candidate 0"
        baseline = play_eval(test, lambda obs: np.zeros(len(obs), dtype=np.int64), cfg.eval.dialogues, cfg.eval.seed)
    else:
        baseline_name = "initial policy"
        baseline = play_eval(test, lambda obs: model.predict(obs, deterministic=True)[0], cfg.eval.dialogues,
                             cfg.eval.seed)
    t_base = time.time() - t0
    model.learn(total_timesteps=cfg.total_timesteps,
                callback=progress_callback(cfg.total_timesteps, f"SB3 {cfg.algo} ({cfg.wrapper})", logger))
    t_train = time.time() - t0 - t_base
    trained = play_eval(test, lambda obs: model.predict(obs, deterministic=True)[0], cfg.eval.dialogues,
                        cfg.eval.seed)
    result = compare(trained, baseline, cfg.eval.success_threshold, cfg.eval.n_boot)
    name = f"SB3 {cfg.algo.upper()} ({cfg.wrapper}, {cfg.total_timesteps} steps)"
    result.update(policy=name, baseline_policy=baseline_name, dialogues=cfg.eval.dialogues,
                  wall_s={"baseline_eval": t_base, "train": t_train, "total": time.time() - t0},
                  user_calls=train.venv.usage.user_calls, reward_calls=train.venv.usage.reward_calls,
                  per_row={"trained_returns": trained["returns"].tolist(),
                           "baseline_returns": baseline["returns"].tolist()})
    save_json(run_dir / "eval.json", result)
    if cfg.wrapper == "choice":
        model.save(run_dir / "model.zip")
    logger.log(cfg.total_timesteps, {"eval/solved": result["trained"]["solved"],
                                     "eval/baseline_solved": result["baseline"]["solved"]})
    logger.close()
    print(f"\n{name} vs {baseline_name} on {cfg.eval.dialogues} held-out rows (95% bootstrap CI over rows):")
    print(format_comparison(result, name, baseline_name))
    return result


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sb3")
def main(raw: DictConfig) -> None:
    launch(raw, Sb3Config, run)


if __name__ == "__main__":
    main()
