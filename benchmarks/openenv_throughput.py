"""Steps/s of N concurrent OpenEnv sessions over the server vs the in-process vector env of N, same run.

    python -m benchmarks.openenv_throughput [--sessions 16] [--turns 3] [--repeats 2] [--model embedded]

Both sides play the same dialogues: the embedded task, the LLM user and the LLM judge on ``--model`` (the
embedded SmolLM2-135M by default), the same seeds and the same fixed assistant messages, so they do the same model
work. In process: one :class:`~dialogue_gym.vector.DialogueVectorEnv` of N. Over the server: openenv's app under
uvicorn on loopback (a thread of this process, sharing its cores), N :class:`DialogueGymClient` sessions stepping
concurrently (each reset with the vector env's seed for that sub-env), the server batching their steps. Only the
steps are timed (resets are not); the repeats alternate the two sides and the median is reported. The target of
issue 26: the server at >= 0.7x the vector env.

Writes ``benchmarks/results/openenv_throughput.md`` (with machine info and the command).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "openenv_throughput.md"
ACTIONS = ["Could you tell me a little more about what you need?", "Here is a short answer with one example.",
           "Let me explain step by step.", "That is a good question; the key idea is simple."]


def env_kwargs(model: str, turns: int, user_tokens: int) -> dict:
    return {"task": "embedded", "user": "llm", "reward": "judge", "model": model, "max_turns": turns + 1,
            "user_max_new_tokens": user_tokens, "device": "cpu"}


_VECTOR: dict[int, object] = {}


def run_vector(kwargs: dict, n: int, turns: int, seed: int) -> tuple[float, int]:
    """Seconds spent in ``step`` and steps taken, for the in-process vector env of ``n`` (built once, like the
    server's shared core)."""
    from gymnasium.vector import AutoresetMode

    from dialogue_gym.vector import DialogueVectorEnv

    if n not in _VECTOR:
        _VECTOR[n] = DialogueVectorEnv(n, autoreset_mode=AutoresetMode.DISABLED, **kwargs)
    env = _VECTOR[n]
    env.reset(seed=seed)
    spent, steps = 0.0, 0
    for t in range(turns):
        running = ~env.done
        actions = [ACTIONS[(t + i) % len(ACTIONS)] if running[i] else None for i in range(n)]
        t0 = time.perf_counter()
        env.step(actions)
        spent += time.perf_counter() - t0
        steps += int(running.sum())
    return spent, steps


def run_server(url: str, n: int, turns: int, seed: int) -> tuple[float, int]:
    """Wall seconds of the step phase and steps taken, for ``n`` concurrent sessions."""
    from dialogue_gym.integrations.openenv import DialogueGymClient

    async def go() -> tuple[float, int]:
        clients = [await DialogueGymClient(base_url=url, message_timeout_s=600).connect() for _ in range(n)]
        try:
            await asyncio.gather(*[c.reset(seed=seed + i) for i, c in enumerate(clients)])
            counts = [0] * n

            async def play(i: int) -> None:
                done = False
                for t in range(turns):
                    if done:
                        return
                    r = await clients[i].step(ACTIONS[(t + i) % len(ACTIONS)])
                    counts[i] += 1
                    done = r.done

            t0 = time.perf_counter()
            await asyncio.gather(*[play(i) for i in range(n)])
            return time.perf_counter() - t0, sum(counts)
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="embedded")
    p.add_argument("--user-tokens", type=int, default=32, help="the LLM user's reply cap in tokens")
    p.add_argument("--window-ms", type=float, default=20.0, help="the server's batch window")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import uvicorn

    from dialogue_gym.generation.serve import free_port
    from dialogue_gym.integrations.openenv import create_app

    kwargs = env_kwargs(args.model, args.turns, args.user_tokens)
    app = create_app(kwargs, max_sessions=args.sessions, batch_window_s=args.window_ms / 1000)
    shared = app.state.dialogue
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    run_vector(kwargs, args.sessions, 1, seed=999)  # warm-up: loads the models, first-call overheads
    run_server(url, args.sessions, 1, seed=999)
    rows: dict[str, list[tuple[float, int]]] = {"vector": [], "server": []}
    batch_sizes: list[int] = []
    for r in range(args.repeats):
        seed = 1000 * (r + 1)
        order = ("vector", "server") if r % 2 == 0 else ("server", "vector")
        for side in order:
            if side == "vector":
                rows["vector"].append(run_vector(kwargs, args.sessions, args.turns, seed))
            else:
                before = len(shared.batch_sizes)
                rows["server"].append(run_server(url, args.sessions, args.turns, seed))
                batch_sizes += shared.batch_sizes[before:]
            s, n = rows[side][-1]
            print(f"repeat {r + 1} {side}: {n} steps in {s:.2f} s = {n / s:.2f} steps/s", flush=True)
    server.should_exit = True
    thread.join(timeout=10)
    total = time.perf_counter() - started

    rate = {k: statistics.median(n / s for s, n in v) for k, v in rows.items()}
    ratio = rate["server"] / rate["vector"]
    info = machine_info()
    lines = [
        "# OpenEnv server vs in-process vector env", "",
        f"Measured {info['date']} with `python -m benchmarks.openenv_throughput {' '.join(argv or sys.argv[1:])}` "
        f"({total:.0f} s in all). Machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, GPU {info['gpu']}, "
        f"torch {info['torch']} ({info['threads']} threads), Python {info['python']}. The machine was shared with "
        "other jobs while this ran: compare the two rows (measured side by side, alternating), not the seconds with "
        "other reports.", "",
        f"{args.sessions} dialogues, {args.turns} timed turns each: embedded task, LLM user (at most "
        f"{args.user_tokens} tokens a reply) and LLM judge on `{args.model}`; fixed assistant messages; the same "
        f"seeds on both sides. Server: openenv's app under uvicorn on loopback (a thread of the benchmark process), "
        f"{args.sessions} WebSocket sessions, batch window {args.window_ms:g} ms. Median of {args.repeats} "
        "repeat(s).", "",
        "| side | steps/s (median) | runs (steps/s) |", "|---|---|---|",
    ]
    for k in ("vector", "server"):
        runs = ", ".join(f"{n / s:.2f}" for s, n in rows[k])
        lines.append(f"| {'in-process DialogueVectorEnv' if k == 'vector' else 'OpenEnv server, concurrent sessions'}"
                     f" | {rate[k]:.2f} | {runs} |")
    sizes = statistics.mean(batch_sizes) if batch_sizes else 0
    lines += ["", f"**Server / vector: {ratio:.2f}x** (target >= 0.7x). Server batches: {len(batch_sizes)}, mean "
              f"{sizes:.1f} sessions per user/reward call (of {args.sessions})."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
