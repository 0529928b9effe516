"""What checking every answer field costs the HTTP engine, next to decoding the body and to a request's round trip.

``OpenAIEngine`` checks each answer (``dialogue_gym/generation/http_answers.py``: token ids in the vocabulary, the
``max_tokens`` bound, every log-prob a number and not NaN) and reads each body as a stream under a size cap and a
deadline. This measures, in one run on the same machine: the time to check one completions answer of ``T``
sampled tokens with log-probs (in process, no HTTP) next to decoding the same JSON body, and the engine's round
trip per request against the loopback test server (``tests/fault_server.py``, canned 4-token answers, a batch of
``B`` requests at once). A real server adds its sampling time (seconds for 2048 tokens) to the round trip, so the
last column is a loose upper bound.

Run:
    python -m benchmarks.http_checks                  # T = 256 and 2048, B = 64
    python -m benchmarks.http_checks --tokens 128 --batch 32 --repeats 5

Writes ``benchmarks/results/http_checks.md`` (the command, the machine, the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.machine import machine_info
from dialogue_gym.generation.base import SamplingParams
from dialogue_gym.generation.http_answers import read_generation
from dialogue_gym.generation.openai import OpenAIEngine
from tests.fault_server import FaultServer

RESULTS = Path(__file__).resolve().parent / "results" / "http_checks.md"


def completions_answer(tokens: int, prompt: list[int]) -> dict:
    """A vLLM-shaped completions answer of ``tokens`` sampled ids with their log-probs."""
    toks = [(17 + 31 * i) % 49000 for i in range(tokens)]
    choice = {"index": 0, "text": "", "token_ids": toks, "prompt_token_ids": prompt, "finish_reason": "length",
              "logprobs": {"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": [-1.25] * tokens,
                           "top_logprobs": None}}
    return {"id": "cmpl-bench", "object": "text_completion", "model": "tiny", "choices": [choice]}


def check_seconds(tokens: int, repeats: int) -> tuple[float, float]:
    """Seconds to check one answer of ``tokens`` tokens, and to decode its JSON body (the work every client
    does anyway), each the best of ``repeats`` runs of 50."""
    prompt = list(range(100, 400))
    answer = completions_answer(tokens, prompt)
    body = json.dumps(answer).encode()
    best_check = best_json = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(50):
            read_generation(answer, api="completions", vocab_size=49152, max_tokens=tokens, sent_ids=prompt,
                            want_logprobs=True)
        best_check = min(best_check, (time.perf_counter() - t) / 50)
        t = time.perf_counter()
        for _ in range(50):
            json.loads(body)
        best_json = min(best_json, (time.perf_counter() - t) / 50)
    return best_check, best_json


def round_trip_seconds(batch: int, repeats: int) -> float:
    """Seconds per request of a batch of ``batch`` concurrent requests to the loopback server (the best of
    ``repeats`` batches)."""
    server = FaultServer()
    try:
        with OpenAIEngine("tiny", server.url, max_concurrency=batch) as eng:
            chats = [[{"role": "user", "content": f"Question {i}: how long do I boil an egg?"}] for i in range(batch)]
            params = SamplingParams(temperature=0.8, max_new_tokens=16)
            eng.generate(chats, params, seeds=list(range(batch)), return_logprobs=True)  # warm: connections
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                eng.generate(chats, params, seeds=list(range(batch)), return_logprobs=True)
                best = min(best, (time.perf_counter() - t) / batch)
            return best
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="sampled tokens per checked answer")
    ap.add_argument("--batch", type=int, default=64, help="concurrent requests per timed batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    trip = round_trip_seconds(args.batch, args.repeats)
    rows = [(t, *check_seconds(t, args.repeats)) for t in args.tokens]
    info = machine_info()
    lines = ["# HTTP engine: the cost of checking every answer field", "",
             "Command: `python -m benchmarks.http_checks " + " ".join(argv if argv is not None else sys.argv[1:])
             + "`", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Round trip per request to the loopback test server (canned 4-token answers, {args.batch} requests "
             f"at once, best of {args.repeats}): {trip * 1e3:.3f} ms. A real server adds its sampling time, so the "
             "last column is a loose upper bound. The machine was shared with other jobs: compare the columns of "
             "one run, not seconds across runs.", "",
             "| sampled tokens per answer | check per answer (ms) | JSON decode of the body (ms) | check / decode "
             "| check / 4-token round trip |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {c * 1e3:.3f} | {j * 1e3:.3f} | {c / j:.2f} | {c / trip:.1%} |" for t, c, j in rows]
    print("\n".join(lines[-len(rows) - 2:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
