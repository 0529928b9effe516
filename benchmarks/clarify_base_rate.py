"""How often the initial policy does what the clarify task rewards, before any training.

RL can only reinforce what the initial policy sometimes does. On ``clarify`` the user gives a withheld number to a
reply that asks (has a "?") or commits to no final answer; this measures the rate of that behaviour on the first
turn of the validation split, with the leaderboard's training temperature and with greedy decoding (its
evaluation), plus the other first-turn outcomes: a stated wrong answer (told what is unknown) and a lucky solve.

Run:
    python -m benchmarks.clarify_base_rate                     # 32 validation dialogues, the embedded policy
    python -m benchmarks.clarify_base_rate --dialogues 64 --temperatures 0.7 1.0 --withheld 2

Writes ``benchmarks/results/clarify_base_rate.md`` (the command, the machine, the table, a few replies).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import dialogue_gym  # noqa: F401
from benchmarks.machine import machine_info
from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.hf import HFEngine
from dialogue_gym.tasks.arithmetic import is_correct
from dialogue_gym.tasks.clarify import asks_or_holds_back

RESULTS = Path(__file__).resolve().parent / "results" / "clarify_base_rate.md"


def first_turn_rates(engine: HFEngine, prompts: list[list[dict[str, str]]], answers: list[float],
                     temperature: float, max_new_tokens: int, seed: int, reveal: str = "lenient"
                     ) -> tuple[dict[str, float], list[str]]:
    """Shares of first replies that ask, hold back (without asking, under the ``reveal`` rule), get the number
    (either), state a wrong answer or guess, or solve."""
    seeds = [int(s) for s in np.random.default_rng(seed).integers(0, 2**63 - 1, size=len(prompts))]
    texts = [g.text for g in engine.generate(prompts, SamplingParams(temperature=temperature,
                                                                     max_new_tokens=max_new_tokens), seeds=seeds)]
    asks = np.array(["?" in t for t in texts])
    holds = np.array([asks_or_holds_back(t, reveal) and "?" not in t for t in texts])
    solved = np.array([is_correct(t, a) for t, a in zip(texts, answers)])
    rates = {"asks": asks.mean(), "holds back": holds.mean(), "gets the number": (~solved & (asks | holds)).mean(),
             "wrong answer or guess": (~solved & ~asks & ~holds).mean(), "solved (lucky)": solved.mean()}
    return {k: float(v) for k, v in rates.items()}, texts


def solved_by_last_turn(engine: HFEngine, rows: int, temperature: float, max_new_tokens: int, seed: int,
                        task_kwargs: dict, max_turns: int) -> float:
    """Share of the first ``rows`` validation dialogues the policy solves within ``max_turns`` turns (played to the
    end with the scripted user, as the leaderboard evaluates)."""
    from agents.common.branching import fork

    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=rows, autoreset_mode="Disabled", task="clarify",
                        split="validation", max_turns=max_turns, task_kwargs=task_kwargs)
    venv.reset(seed=seed, options={"task_indices": list(range(rows))})
    states = venv.get_states()
    policy_seeds = [int(s) for s in np.random.default_rng(seed + 1).integers(0, 2**63 - 1, size=rows)]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    branches = fork(venv, engine, params, states, policy_seeds, 1, [max_turns] * rows)
    return float(np.mean([b[0].reward > 0 for b in branches]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="embedded", help="the initial policy (model name or directory)")
    ap.add_argument("--dialogues", type=int, default=32, help="validation rows (first turns) measured")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.0], help="0 = greedy")
    ap.add_argument("--withheld", type=int, default=1, help="numbers withheld (task_kwargs.withheld)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="reply cap (the leaderboard's)")
    ap.add_argument("--steps", type=int, default=1, help="story steps (task_kwargs.steps; 0: the answer is the "
                                                         "withheld number)")
    ap.add_argument("--max-turns", type=int, default=3, help="turns of the played dialogues (solved by this turn)")
    ap.add_argument("--instruction", default=None, help="task_kwargs.instruction (default: the task's own)")
    ap.add_argument("--reveal", default="lenient", choices=["lenient", "strict"],
                    help="task_kwargs.reveal: which replies get the withheld number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    t0 = time.time()
    task_kwargs = {"withheld": args.withheld, "steps": args.steps, "reveal": args.reveal}
    if args.instruction is not None:
        task_kwargs["instruction"] = args.instruction
    env = gym.make("MultiTurnDialogue-v0", task="clarify", split="validation", max_turns=args.max_turns,
                   task_kwargs=task_kwargs)
    rows = list(env.unwrapped.rows[:args.dialogues])
    prompts, answers = [list(r.messages) for r in rows], [float(r.profile["answer"]) for r in rows]
    engine = HFEngine(args.policy, seed=args.seed)
    table, examples = {}, {}
    for temperature in args.temperatures:
        table[temperature], examples[temperature] = first_turn_rates(engine, prompts, answers, temperature,
                                                                     args.max_new_tokens, args.seed, args.reveal)
        table[temperature][f"solved by turn {args.max_turns}"] = solved_by_last_turn(
            engine, len(rows), temperature, args.max_new_tokens, args.seed, task_kwargs, args.max_turns)
        print(f"T={temperature}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[temperature].items()), flush=True)
    info = machine_info()
    keys = list(next(iter(table.values())))
    lines = ["# Clarify: the initial policy's first-turn behaviour (before any training)", "",
             "Command: `python -m benchmarks.clarify_base_rate " + " ".join(argv if argv is not None else sys.argv[1:])
             + "`", "",
             f"{len(rows)} validation dialogues of `clarify` (withheld {args.withheld}, steps {args.steps}, reveal "
             f"{args.reveal}, horizon {args.max_turns}; instruction: {task_kwargs.get('instruction', 'default')!r}), "
             "policy "
             f"`{args.policy}`, replies capped at {args.max_new_tokens} tokens; {time.time() - t0:.0f} s. "
             "A small measurement: with 32 dialogues a rate's 95% interval is about +-0.15.", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             "| temperature | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for temperature, rates in table.items():
        lines.append(f"| {temperature} | " + " | ".join(f"{rates[k]:.3f}" for k in keys) + " |")
    lines += ["", "\"gets the number\": the reply asks or holds back (under the reveal rule) and is not already "
              "correct - the user then "
              f"reveals a withheld number. \"solved by turn {args.max_turns}\": the same dialogues played to the end "
              "with the scripted user. Example first replies (first three, per temperature):", ""]
    for temperature, texts in examples.items():
        for t in texts[:3]:
            lines.append(f"- T={temperature}: {t.strip()[:200]!r}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
