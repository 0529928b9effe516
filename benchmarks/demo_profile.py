"""Where `make demo`'s time goes: one evaluation and one REFUEL iteration of the demo config, by phase, against the
CPU's compute floor for the same work.

Run (a few minutes on a 2-core CPU; ``--dialogues``/``--eval-dialogues`` shrink it)::

    python -m benchmarks.demo_profile                       # the demo's sizes: 32 dialogues, 64 evaluation ones
    python -m benchmarks.demo_profile --dialogues 8 --eval-dialogues 16 --ops --out /tmp/p.md   # + the op table

Phases: ``sampling`` (the policy's ``generate`` calls), ``env`` (``venv.step``: the scripted critic user and the
exact verifier), ``log-probs`` (π_t's log-probs of the pairs), ``update`` (the regression update), ``other`` (the
rest of the wall time). The floor of a phase is its matmul FLOPs divided by the matmul rate measured in the same run
in the policy's weight dtype (``torch.mm`` of 1024 x 1024 matrices; the demo's is bfloat16): ``2 N`` FLOPs per token
through the model for sampling (prompt prefill included) and log-probs, ``4 N`` per token for the update (forward
plus the input gradients through the frozen base; LoRA's own weight gradients are negligible), ``N`` the model's
parameters. ``floor share`` = floor / measured: 1.0 would be a phase that does nothing but full-rate matmuls. The
env's floor is 0 (no model).

With ``--ops`` the top of a ``torch.profiler`` table over the iteration (self CPU time per op) is printed and written
too (its trace holds every op of every decoding step: keep ``--dialogues`` small with it). Results
go to ``--out`` (default ``benchmarks/results/demo_profile_run.md``) with the machine; the timings of a shared
machine are slowed by its other work, the shares much less.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def matmul_rate(size: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of ``torch.mm`` of two ``size`` x ``size`` matrices of ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


class Timed:
    """A generation engine wrapper that adds up the seconds and the tokens of ``generate`` calls."""

    def __init__(self, engine: Any):
        self.engine, self.seconds, self.prompt_tokens, self.new_tokens = engine, 0.0, 0, 0

    def generate(self, prompts: Any, params: Any, seeds: Any = None, return_logprobs: bool = False) -> Any:
        t0 = time.perf_counter()
        gens = self.engine.generate(prompts, params, seeds=seeds, return_logprobs=return_logprobs)
        self.seconds += time.perf_counter() - t0
        self.prompt_tokens += sum(len(g.prompt_token_ids) for g in gens)
        self.new_tokens += sum(len(g.token_ids) for g in gens)
        return gens

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def time_steps(venv: Any) -> list[float]:
    """Wrap ``venv.step`` so its seconds add up in the returned one-element list."""
    spent = [0.0]
    step = venv.step

    def timed(actions: Any) -> Any:
        t0 = time.perf_counter()
        out = step(actions)
        spent[0] += time.perf_counter() - t0
        return out

    venv.step = timed
    return spent


def demo_config(dialogues: int, eval_dialogues: int) -> Any:
    from agents.common.config import merge_schema
    from agents.refuel.config import RefuelConfig

    raw = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "refuel.yaml"),
                          OmegaConf.load(ROOT / "conf" / "experiment" / "demo.yaml"))
    raw.pop("hydra")
    raw.pop("defaults")
    raw.dialogues, raw.eval.dialogues = dialogues, eval_dialogues
    return merge_schema(raw, RefuelConfig)


def row(name: str, seconds: float, wall: float, flops: float, rate: float) -> str:
    floor = flops / rate
    share = f"{floor / seconds:.3f}" if seconds > 0 and flops > 0 else "-"
    return f"| {name} | {seconds:.1f} | {seconds / wall:.3f} | {flops / 1e12:.2f} | {floor:.1f} | {share} |"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialogues", type=int, default=32, help="REFUEL dialogues of the iteration (demo: 32)")
    parser.add_argument("--eval-dialogues", type=int, default=64, help="evaluation dialogues (demo: 64)")
    parser.add_argument("--top", type=int, default=15, help="rows of the torch.profiler table (with --ops)")
    parser.add_argument("--ops", action="store_true",
                        help="add a torch.profiler table of the iteration's ops; its trace grows with every decoding "
                             "step (at the demo's 32 dialogues it passed 24 GiB and was killed on the 2-core "
                             "machine): use it with --dialogues 8")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_profile_run.md"))
    args = parser.parse_args(argv)
    for name in ("dialogues", "eval_dialogues", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    from agents.common.evaluation import play_states
    from agents.common.policy import load_policy
    from agents.common.policy_engine import build_policy_engine
    from agents.common.rollout import collect_pairs
    from agents.common.run import make_vec, pad_id, sampling_params
    from agents.common.train import fill_reference_logprobs, make_optimizer, regression_update
    from dialogue_gym.generation import SamplingParams
    from dialogue_gym.models import resolve_dtype
    from dialogue_gym.rollout_store import make_states

    cfg = demo_config(args.dialogues, args.eval_dialogues)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.policy, seed=cfg.seed)
    dtype = resolve_dtype(cfg.policy.dtype, cfg.policy.device)
    rate, rate32 = matmul_rate(dtype=dtype), matmul_rate()
    n_params = sum(p.numel() for p in model.parameters())
    engine = Timed(build_policy_engine(cfg.policy, model, tokenizer, cfg.seed))
    lines = []

    # one evaluation of the initial policy (greedy, the demo's evaluation)
    evenv = make_vec(cfg.env, cfg.eval.dialogues, split="test", reward_mode=cfg.eval.reward_mode)
    env_s = time_steps(evenv)
    t0 = time.perf_counter()
    greedy = SamplingParams(temperature=cfg.eval.temperature, max_new_tokens=cfg.sampling.max_new_tokens)
    play_states(evenv, engine, greedy, make_states(evenv, cfg.eval.dialogues, cfg.eval.seed), "profile")
    wall = time.perf_counter() - t0
    flops = 2 * n_params * (engine.prompt_tokens + engine.new_tokens)
    lines += [f"### One evaluation ({cfg.eval.dialogues} dialogues, greedy): {wall:.1f} s wall, "
              f"{engine.new_tokens} policy tokens", "",
              "| phase | seconds | share of wall | TFLOP | floor s | floor share |", "|---|---|---|---|---|---|",
              row("sampling", engine.seconds, wall, flops, rate), row("env (user + reward)", env_s[0], wall, 0, rate),
              row("other", wall - engine.seconds - env_s[0], wall, 0, rate), ""]

    # one REFUEL iteration (the loop of agents/refuel/__main__.py, timed by phase)
    engine.seconds = engine.prompt_tokens = engine.new_tokens = 0
    rollin = make_vec(cfg.env, cfg.dialogues)
    branches = make_vec(cfg.env, 2 * cfg.dialogues, reward_mode="terminal")
    env_in, env_br = time_steps(rollin), time_steps(branches)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.iterations * max(1, cfg.dialogues // 8))
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU]) if args.ops else None
    with prof if prof is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        pairs, stats = collect_pairs(rollin, branches, engine, sampling_params(cfg.sampling),
                                     np.random.default_rng([cfg.seed, 0]), cfg.dialogues, rollin.num_rows,
                                     cfg.turn_sampling, future=True, prefix="on_policy")
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        fill_reference_logprobs(model, pairs, pad_id(tokenizer), cfg.sampling.temperature, cfg.optim)
        t_ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        regression_update(model, optimizer, scheduler, pairs, cfg.eta, pad_id(tokenizer), cfg.sampling.temperature,
                          cfg.optim, np.random.default_rng([cfg.seed, 0, 1]))
        t_upd = time.perf_counter() - t2
        wall = time.perf_counter() - t0
    seq_tokens = sum(len(r.prompt_ids) + len(r.token_ids) for p in pairs for r in (p.a, p.b))
    env_total = env_in[0] + env_br[0]
    lines += [f"### One REFUEL iteration ({cfg.dialogues} dialogues, {int(stats['env/policy_samples'])} policy "
              f"replies, {len(pairs)} pairs): {wall:.1f} s wall, {engine.new_tokens} policy tokens", "",
              "| phase | seconds | share of wall | TFLOP | floor s | floor share |", "|---|---|---|---|---|---|",
              row("sampling", engine.seconds, wall, 2 * n_params * (engine.prompt_tokens + engine.new_tokens), rate),
              row("env (user + reward)", env_total, wall, 0, rate),
              row("log-probs", t_ref, wall, 2 * n_params * seq_tokens, rate),
              row("update", t_upd, wall, 4 * n_params * seq_tokens, rate),
              row("other", t_roll - engine.seconds - env_total, wall, 0, rate), ""]
    ops = [] if prof is None else [
        "Top of the torch.profiler table over the iteration (self CPU time):", "", "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), "```", ""]
    info = machine_info()
    text = "\n".join([f"## demo profile, {info['date']}", "",
                      "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "date") + ".",
                      f"matmul rate (1024^3 torch.mm, best of 10) in the policy's weight dtype {dtype}: "
                      f"{rate / 1e9:.1f} GFLOP/s (float32: {rate32 / 1e9:.1f}); the floors use the first; model "
                      f"{n_params / 1e6:.1f} M parameters (LoRA included).", ""] + lines + ops)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
