"""TRL's GRPOTrainer on dialogue-gym's ``clarify`` task with the embedded SmolLM2-135M, on a CPU.

    python examples/trl_grpo_clarify.py                       # about 20 training steps, in process
    python examples/trl_grpo_clarify.py --steps 2 --eval 16   # a quick check that everything runs
    python -m dialogue_gym.serve_env +env=clarify env.task_kwargs.steps=0 &   # or: the env over OpenEnv
    python examples/trl_grpo_clarify.py --base-url http://127.0.0.1:8000

Clarify (dialogue_gym/tasks/clarify.py): the opening leaves a number out; the scripted user gives it when the
assistant asks (or holds back its answer); the verifier pays 1 for a correct final answer. ``steps=0`` (the CPU
leaderboard's setting) makes the answer the withheld number itself, so what there is to learn is the asking.
The script prints the success rate (return > 0) on ``--eval`` test openings before and after training, with a
95% Wilson interval; a few CPU minutes of GRPO are a smoke run, not a result: expect the two intervals to overlap.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dialogue_gym.integrations.trl import DialogueRollout  # noqa: E402
from dialogue_gym.models import load_model  # noqa: E402

CLARIFY = {"task": "clarify", "user": "clarify", "reward": "verifier", "reward_mode": "terminal", "max_turns": 3,
           "task_kwargs": {"steps": 0, "withheld": 1, "distractors": 0, "vague": 0.0}, "device": "cpu"}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def success(model, tokenizer, n: int, max_new_tokens: int, temperature: float) -> tuple[int, int]:
    """Correct dialogues out of ``n`` test openings (one sampled dialogue each, fixed seeds)."""
    test = DialogueRollout({**CLARIFY, "split": "test"}, max_new_tokens=max_new_tokens, seed=12345)
    out = test.play(model, tokenizer, test.dataset(n=n)["prompt"], temperature=temperature)
    return sum(r > 0 for r in out["env_reward"]), len(out["env_reward"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="GRPO optimizer steps")
    p.add_argument("--eval", type=int, default=48, help="test openings for the before/after success rate")
    p.add_argument("--batch", type=int, default=8, help="dialogues per step (prompts x generations)")
    p.add_argument("--generations", type=int, default=4, help="dialogues per opening (GRPO's group)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--max-new-tokens", type=int, default=48, help="policy tokens per reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--base-url", default=None, help="an OpenEnv server of `python -m dialogue_gym.serve_env`")
    p.add_argument("--out", default="outputs/trl_grpo_clarify")
    args = p.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_model("embedded", dtype="float32", shared=False, device="cpu")
    tokenizer.padding_side = "left"
    before = success(model, tokenizer, args.eval, args.max_new_tokens, args.temperature)

    rollout = DialogueRollout(CLARIFY, base_url=args.base_url, max_new_tokens=args.max_new_tokens, seed=0)
    config = GRPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch,
                        num_generations=args.generations, max_steps=args.steps, learning_rate=args.lr, beta=0.0,
                        temperature=args.temperature, logging_steps=1, report_to=[], save_strategy="no",
                        use_cpu=True, bf16=False, seed=0)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=config,
                          train_dataset=rollout.dataset(n=args.steps * args.batch // args.generations + 8),
                          reward_funcs=rollout.reward, rollout_func=rollout)
    trainer.train()
    rollout.close()
    after = success(trainer.model, tokenizer, args.eval, args.max_new_tokens, args.temperature)

    print(f"\nclarify, {args.eval} test openings, success = a correct final answer (T = {args.temperature}):")
    for name, (k, n) in (("before", before), ("after", after)):
        lo, hi = wilson(k, n)
        print(f"  {name:6s} {k:3d}/{n} = {k / n:.2f}  95% CI [{lo:.2f}, {hi:.2f}]")
    print(f"rollout: {rollout.stats}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
