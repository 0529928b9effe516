"""REFUEL training throughput: the policy on HF vs vLLM, and 1 vs 2 processes; GRPO beside it.

    python -m benchmarks.train_throughput                       # hf, vllm, hf x2 at 32 dialogues
    python -m benchmarks.train_throughput --setups hf,vllm --dialogues 16 --iterations 2
    python -m benchmarks.train_throughput --setups "hf full,vllm full"   # full fine-tuning (policy.lora_r=0)
    python -m benchmarks.train_throughput --setups "hf,vllm,vllm merged"   # LoRA: adapter vs merged weights
    python -m benchmarks.train_throughput --setups "hf,grpo hf"  # GRPO (credit=turn, G = 4) beside REFUEL

Each setup is a real REFUEL run (``python -m agents.refuel``, or ``accelerate launch --config_file
conf/accelerate/cpu2.yaml -m agents.refuel`` for 2 processes) with the embedded SmolLM2-135M policy (LoRA r = 16;
the ``full`` setups fine-tune every weight and, on vLLM, reload them all into the engine after each update;
``vllm merged`` trains LoRA but reloads the merged weights instead of loading a vLLM LoRA adapter)
on the arithmetic task, whose critic user and verifier reward need no model, so the figures are the policy's own
cost: sampling (roll-in, both branches to H') and the update (pi_t log-probs + the regression steps). Read from
each run's ``metrics.jsonl``:

- policy samples/s: replies sampled in the iteration (``env/policy_samples``) / rollout seconds;
- pair updates/s: pairs / (iteration seconds − rollout seconds), the reference log-probs included;
- iteration seconds, and the whole run's wall time (model loads, engine start and the two evaluations included);
- a ``grpo`` row runs ``python -m agents.grpo credit=turn group_size=4`` with dialogues / 2 groups (as many
  turn-h replies as REFUEL's 2 per dialogue); its "pairs" are its trained replies / 2 (an all-equal group trains
  none);
- the bound: what the iteration ratio against the first row would be if sampling took no time at all
  (first row's iteration seconds / this row's update seconds). A faster sampler cannot beat it.

The last iteration is reported (the first pays one-off costs: vLLM's first adapter load, allocator warm-up).
Writes ``benchmarks/results/train_throughput.md`` with the machine, its load average and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.env_throughput import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_throughput.md"
SETUPS = {  # name: (policy engine, processes, LoRA rank (0 = full fine-tuning), policy.lora_sync)
    "hf": ("hf", 1, 16, "adapter"),
    "vllm": ("vllm", 1, 16, "adapter"),
    "vllm merged": ("vllm", 1, 16, "merged"),
    "hf x2": ("hf", 2, 16, "adapter"),
    "vllm x2": ("vllm", 2, 16, "adapter"),
    "hf full": ("hf", 1, 0, "adapter"),
    "vllm full": ("vllm", 1, 0, "adapter"),
    "grpo hf": ("hf", 1, 16, "adapter"),  # GRPO credit=turn (agents.grpo) beside REFUEL's "hf" row
}
GRPO_GROUP = 4  # G; a GRPO row plays dialogues / 2 groups, so it samples as many turn-h replies as REFUEL's pairs


def run_setup(name: str, dialogues: int, iterations: int, max_new_tokens: int, out: Path) -> dict[str, Any]:
    """One REFUEL (or, for a ``grpo`` setup, GRPO) run; returns the last iteration's throughput figures."""
    engine, processes, lora_r, lora_sync = SETUPS[name]
    run_dir = out / name.replace(" ", "")
    grpo = name.startswith("grpo")
    agent = ["agents.grpo", "credit=turn", f"group_size={GRPO_GROUP}"] if grpo else ["agents.refuel"]
    groups = max(1, dialogues * 2 // GRPO_GROUP) if grpo else dialogues
    args = ["-m", agent[0], *agent[1:], "+env=arithmetic", "policy.model=embedded", f"policy.lora_r={lora_r}",
            f"policy.lora_sync={lora_sync}",
            f"policy.engine={engine}", f"dialogues={groups}", f"iterations={iterations}",
            f"sampling.max_new_tokens={max_new_tokens}", "eval.dialogues=2", "optim.batch_size=8",
            "optim.micro_batch_size=8", "export=false", f"hydra.run.dir={run_dir}"]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "conf" / "accelerate" / "cpu2.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    t0 = time.time()
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    if grpo:  # GRPO trains replies, not pairs: two trained replies count as one pair's worth of update
        last["env/pairs"] = last["env/trained_replies"] / 2
    update_s = last["perf/iteration_s"] - last["perf/rollout_s"]
    return {"setup": name, "engine": engine, "processes": processes, "lora_r": lora_r, "lora_sync": lora_sync,
            "samples": last["env/policy_samples"],
            "pairs": last["env/pairs"], "rollout_s": last["perf/rollout_s"], "update_s": update_s,
            "iteration_s": last["perf/iteration_s"], "wall_s": wall,
            "samples_per_s": last["env/policy_samples"] / last["perf/rollout_s"],
            "pair_updates_per_s": last["env/pairs"] / update_s}


def compare_rollouts(dialogues: int, max_new_tokens: int) -> str:
    """Play the same arithmetic rows with the same seeds with the policy on HF and on vLLM (greedy and sampled):
    how often the two engines give the same dialogue, their scores and their time (engine start excluded)."""
    import gymnasium as gym
    import numpy as np

    import dialogue_gym  # noqa: F401
    from agents.common.evaluation import play_states, records_result
    from agents.common.policy import PolicySettings, load_policy
    from agents.common.policy_engine import VLLMPolicy
    from dialogue_gym.generation import SamplingParams
    from dialogue_gym.generation.hf import HFEngine
    from dialogue_gym.rollout_store import make_states

    settings = PolicySettings(model="embedded", lora_r=16, engine="vllm")
    model, tokenizer = load_policy(settings)
    engines = {"hf": HFEngine((model, tokenizer), seed=0), "vllm": VLLMPolicy(settings, seed=0)}
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=dialogues, autoreset_mode="Disabled", task="arithmetic",
                        user="critic", reward="verifier", reward_mode="per_turn", max_turns=3, split="test")
    lines = ["| temperature | same first reply | same dialogue | solved by turn 3 (hf / vllm) | "
             "policy tokens (hf / vllm) | seconds (hf / vllm) |", "|" + "---|" * 6]
    for temperature in (0.0, 0.8):
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        got, secs = {}, {}
        for name, engine in engines.items():
            t0 = time.time()
            played = play_states(venv, engine, params, make_states(venv, dialogues, seed=7), name)
            got[name] = records_result(played, venv.max_turns)
            secs[name] = time.time() - t0
        a, b = got["hf"]["conversations"], got["vllm"]["conversations"]
        def first_reply(messages: list[dict[str, str]]) -> str:
            return next(m["content"] for m in messages if m["role"] == "assistant")

        first = np.mean([first_reply(x) == first_reply(y) for x, y in zip(a, b)])
        same = np.mean([x == y for x, y in zip(a, b)])
        solved = {k: float(np.nanmax(np.nan_to_num(v["scores"], nan=0.0), axis=1).mean()) for k, v in got.items()}
        lines.append(f"| {temperature} | {first:.0%} | {same:.0%} | {solved['hf']:.2f} / {solved['vllm']:.2f} | "
                     f"{got['hf']['tokens']} / {got['vllm']['tokens']} | {secs['hf']:.1f} / {secs['vllm']:.1f} |")
    engines["vllm"].close()
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    lines = ["| setup | policy engine | processes | trained | policy samples | rollout s | samples/s | pairs | "
             "update s | pair updates/s | iteration s | iteration vs first | bound (free sampling) | run wall s |",
             "|" + "---|" * 14]
    for r in results:
        trained = f"LoRA r={r['lora_r']}" if r.get("lora_r", 16) else "all weights"
        if r.get("lora_sync") == "merged" and r["engine"] == "vllm" and r.get("lora_r", 16):
            trained += ", merged into the engine"
        lines.append(f"| {r['setup']} | {r['engine']} | {r['processes']} | {trained} | {r['samples']:.0f} | "
                     f"{r['rollout_s']:.1f} | "
                     f"{r['samples_per_s']:.2f} ({r['samples_per_s'] / base['samples_per_s']:.2f}x) | "
                     f"{r['pairs']:.0f} | {r['update_s']:.1f} | "
                     f"{r['pair_updates_per_s']:.2f} ({r['pair_updates_per_s'] / base['pair_updates_per_s']:.2f}x) | "
                     f"{r['iteration_s']:.1f} | {base['iteration_s'] / r['iteration_s']:.2f}x | "
                     f"{base['iteration_s'] / r['update_s']:.2f}x | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="hf,vllm,hf x2", help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--dialogues", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compare", type=int, default=16,
                        help="dialogues played with both engines for the same-seed comparison (0: skip)")
    parser.add_argument("--note", default="", help="a line added to the report (e.g. how loaded the machine was)")
    parser.add_argument("--out", default=str(RESULTS),
                        help="the report's path (another name keeps a partial run from replacing the full table)")
    args = parser.parse_args()
    names = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; allowed: {', '.join(SETUPS)}")
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as out:
        for name in names:
            print(f"running {name} ...", flush=True)
            results.append(run_setup(name, args.dialogues, args.iterations, args.max_new_tokens, Path(out)))
            print(table(results), flush=True)
            write_report(args, results, "", load_before)  # a partial report survives an interruption
    comparison = compare_rollouts(args.compare, args.max_new_tokens) if args.compare else ""
    if comparison:
        print(comparison, flush=True)
    write_report(args, results, comparison, load_before)
    print(f"wrote {args.out}")


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], comparison: str,
                 load_before: tuple[float, float, float]) -> None:
    """``args.out`` (``benchmarks/results/train_throughput.md``): the table, the same-seed comparison, machine and
    load."""
    load_after = os.getloadavg()
    info = machine_info()
    command = "python -m benchmarks.train_throughput " + " ".join(sys.argv[1:])
    text = [
        "# REFUEL training throughput: policy on HF vs vLLM, 1 vs 2 processes", "",
        f"Command: `{command}`", "",
        f"REFUEL on the arithmetic task (critic user and verifier: no model in the env), embedded SmolLM2-135M "
        f"policy (LoRA r = 16 unless the row says all weights), {args.dialogues} dialogues per iteration, "
        "replies of at most "
        f"{args.max_new_tokens} tokens, horizon 3, batch 8 pairs; the last of {args.iterations} iteration(s) is "
        "reported. Ratios are against the first row.", "",
        table(results), "",
        *(["## The same seeds on HF and vLLM", "",
           f"The initial policy plays the first {args.compare} arithmetic test rows with the same env and policy "
           "seeds on each engine (horizon 3, every turn verified). Greedy decoding should agree up to near-ties "
           "that the two engines' float kernels break differently; sampled replies differ because each engine "
           "draws its own noise from a seed (same distribution, different samples; the log-prob test checks the "
           "distributions agree).", "", comparison, ""] if comparison else []),
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, torch {info['torch']}, "
        f"python {info['python']}, {info['date']}. Load average (1/5/15 min) before: "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after: {'/'.join(f'{x:.1f}' for x in load_after)}.", "",
        "The load averages say how busy the machine was: read the ratios side by side, not the absolute numbers. "
        "Two processes on two cores split the same cores (one thread each), so they show the data-parallel path "
        "working, not a speed-up; on GPUs each process gets its own device.",
    ]
    if args.note:
        text += ["", args.note]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
