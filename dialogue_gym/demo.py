"""Play a few conversations of the embedded environment and print them with their rewards.

    python -m dialogue_gym.demo [--conversations 3] [--turns 3] [--task embedded]

The policy is the embedded SmolLM2-135M-Instruct itself (through the same HF engine the env's simulated user
uses), the user is the LLM user and the reward the LLM judge: everything runs on a CPU with no downloads.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import dialogue_gym  # noqa: F401
from dialogue_gym.generation import SamplingParams, make_engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3, help="conversations played side by side")
    parser.add_argument("--turns", type=int, default=3, help="assistant turns per conversation")
    parser.add_argument("--task", default="embedded", help="embedded, arithmetic, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.time()
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=args.conversations, task=args.task, max_turns=args.turns,
                        reward_mode="per_turn", autoreset_mode="Disabled")
    policy = make_engine("hf", "embedded", seed=args.seed)
    params = SamplingParams(temperature=0.7, max_new_tokens=96)
    obs, _ = venv.reset(seed=args.seed)
    rewards = [[] for _ in range(args.conversations)]
    rng = np.random.default_rng(args.seed)
    while not venv.done.all():
        active = ~venv.done
        idx = np.flatnonzero(active)
        gens = policy.generate([obs[i] for i in idx], params, seeds=[int(s) for s in rng.integers(0, 2**62, len(idx))])
        actions: list = [None] * args.conversations
        for i, g in zip(idx, gens):
            actions[i] = g.text.strip() or "..."
        obs, r, term, trunc, info = venv.step(actions)
        for i in idx:
            rewards[i].append(float(r[i]))
    for i, conv in enumerate(obs):
        print(f"=== conversation {i + 1} (task row {venv.get_state(i).task_row}) ===")
        turn = 0
        for m in conv:
            tag = m["role"].upper()
            print(f"[{tag}] {m['content']}")
            if m["role"] == "assistant":
                print(f"    -> reward {rewards[i][turn]:.3f}")
                turn += 1
        print()
    print(f"{args.conversations} conversations, {args.turns} turns, {time.time() - t0:.1f} s "
          f"(reward: {venv.core.reward.describe().get('reward')}, per turn)")


if __name__ == "__main__":
    main()
