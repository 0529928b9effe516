"""The OpenEnv server (openenv's FastAPI app under uvicorn on loopback) driven by openenv's real WebSocket client.

The env is ``clarify`` with its scripted user and the verifier reward (no model), so these tests are about the
protocol: every dialogue over the wire is compared with an in-process ``DialogueEnv`` of the same configuration.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("openenv", reason="needs the integrations extra: pip install 'dialogue-gym[integrations]'")

import uvicorn  # noqa: E402

from dialogue_gym.conversation import DialogueState  # noqa: E402
from dialogue_gym.env import DialogueEnv  # noqa: E402
from dialogue_gym.generation.serve import free_port  # noqa: E402
from dialogue_gym.integrations.openenv import (  # noqa: E402
    DialogueGymClient,
    RemoteDialogueError,
    SharedDialogue,
    create_app,
)

ENV = {"task": "clarify", "user": "clarify", "reward": "verifier", "max_turns": 3,
       "task_kwargs": {"steps": 1, "withheld": 1, "n_train": 60, "n_validation": 10, "n_test": 10}}
# a policy that asks first, then answers with a number that depends on the seed (right for some, wrong for others)
ASK = "Could you tell me the missing number?"


def answer(i: int) -> str:
    return f"The answer is {i + 7}."


class Served:
    """A real uvicorn server on a loopback port, in a thread of this process (so tests can read its counters)."""

    def __init__(self, max_sessions: int = 16, window_s: float = 0.2):
        self.shared = SharedDialogue(ENV, batch_window_s=window_s)
        app = create_app(shared=self.shared, max_sessions=max_sessions)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def client(self) -> DialogueGymClient:
        return DialogueGymClient(base_url=self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.shared.close()


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.stop()


def local_env() -> DialogueEnv:
    return DialogueEnv(**ENV)


def test_reset_step_state_round_trip_equals_the_in_process_env(served):
    env = local_env()
    with served.client().sync() as remote:
        r = remote.reset(seed=5)
        obs, _ = env.reset(seed=5)
        assert r.observation.messages == obs and r.reward is None and not r.done
        assert r.observation.info["task_row"] == env.get_state().task_row
        for action in (ASK, answer(5)):
            r = remote.step(action)
            obs, reward, term, trunc, info = env.step(action)
            assert r.observation.messages == obs
            assert (r.reward, r.observation.terminated, r.observation.truncated) == (reward, term, trunc)
            assert r.done == (term or trunc) and r.observation.info == info
        st = remote.state()
        assert st.step_count == 2 and st.dialogue == env.get_state().to_dict()
        assert isinstance(st.dialogue_state(), DialogueState)


def test_a_state_sent_back_over_the_wire_continues_like_the_in_process_env(served):
    with served.client().sync() as a:
        a.reset(seed=11)
        a.step(ASK)
        saved = a.state().dialogue_state()  # fetched over the wire, mid-conversation
        wire_next = a.step(answer(3)).observation.messages
    env = local_env()
    with served.client().sync() as b:  # another session, forked from the snapshot
        r = b.reset(state=saved)
        assert r.observation.messages == saved.messages
        assert b.step(answer(3)).observation.messages == wire_next
        env.reset(options={"state": saved})
        assert env.step(answer(3))[0] == wire_next
        # a fork branch (k >= 1) gets its own user stream, the same as in process
        b.reset(state=saved.to_dict(), branch=2)
        env.reset(options={"state": saved, "branch": 2})
        assert b.step(ASK).observation.messages == env.step(ASK)[0]
        # a messages prefix (remote forking without a snapshot)
        prefix = saved.messages[:1]
        r = b.reset(messages=prefix, profile=saved.profile, seed=4)
        env.reset(seed=4, options={"messages": prefix, "profile": saved.profile})
        assert r.observation.messages == prefix and b.step(ASK).observation.messages == env.step(ASK)[0]


async def _play(url: str, seed: int) -> list[list[dict[str, str]]]:
    async with DialogueGymClient(base_url=url) as c:
        r = await c.reset(seed=seed)
        seen = [r.observation.messages]
        for action in (ASK, answer(seed), ASK):
            if r.done:
                break
            r = await c.step(action)
            seen.append(r.observation.messages)
        return seen


def test_eight_concurrent_sessions_equal_eight_envs_with_fewer_user_calls(served):
    core = served.shared.core
    calls0, batches0 = core.user_calls, len(served.shared.batch_sizes)

    async def run():
        return await asyncio.gather(*[_play(served.url, seed) for seed in range(8)])

    wire = asyncio.run(run())
    user_calls = core.user_calls - calls0
    sizes = served.shared.batch_sizes[batches0:]
    steps = separate_calls = 0
    for seed, seen in enumerate(wire):
        env = local_env()
        obs, _ = env.reset(seed=seed)
        expected = [obs]
        for action in (ASK, answer(seed), ASK):
            if env.get_state().done:
                break
            expected.append(env.step(action)[0])
        assert seen == expected, f"session {seed} differs from its in-process env"
        steps += len(seen) - 1
        separate_calls += env.core.user_calls
    assert sum(sizes) == steps >= 16  # every step went through a batch
    # the user is not asked after a finished episode, so a batch may make no user call
    assert user_calls <= len(sizes) < 8 < separate_calls, f"user calls {user_calls}, batch sizes {sizes}"
    assert max(sizes) == 8


def test_bad_input_is_a_structured_error_and_the_sessions_stay_usable(served):
    with served.client().sync() as a, served.client().sync() as b:
        a.reset(seed=1)
        b.reset(seed=2)
        b.step(ASK)
        b_before = b.state().dialogue
        a_before = a.state().dialogue
        bad = [
            (lambda: a.step(123), "action.content", "must be a string"),
            (lambda: a.step("   "), "action.content", "non-blank"),
            (lambda: a.step("x" * 9000), "action.content", "max_action_chars=8000"),
            (lambda: a.reset(state={"messages": []}), "state", "missing field"),
            (lambda: a.reset(state="not a dict"), "state", "must be a DialogueState or a dict"),
            (lambda: a.reset(task_idx=3), "task_idx", "allowed: seed, episode_id, state"),
            (lambda: a.reset(task_index=10**6), "task_index", "task_index must be an integer in [0, 59]"),
            (lambda: a.reset(seed=-1), "seed", "non-negative integer"),
            (lambda: a.reset(messages=[{"role": "assistant", "content": "hi"}]), "messages", "'user' was expected"),
            (lambda: a.reset(state=b_before, messages=[{"role": "user", "content": "hi"}]), "reset", "conflict"),
        ]
        wrong_fp = dict(b_before, config_fingerprint="0" * 16)
        bad.append((lambda: a.reset(state=wrong_fp), "state", "differently configured env"))
        for call, field, text in bad:
            with pytest.raises(RemoteDialogueError) as e:
                call()
            assert e.value.field == field and text in e.value.message, (field, str(e.value))
            assert a.state().dialogue == a_before  # the refused request changed nothing
        assert b.state().dialogue == b_before  # the other session is untouched
        env = local_env()
        env.reset(seed=1)
        assert a.step(ASK).observation.messages == env.step(ASK)[0]  # and the session goes on as if nothing happened
        a.step("The answer is 0.")
        if a.state().dialogue_state().done:
            with pytest.raises(RemoteDialogueError, match="the episode has ended"):
                a.step(ASK)


PREFIX = [{"role": "user", "content": "Zoe has some cookies. How many cookies does Zoe have now?"}]
FACTS = [{"text": "Zoe has 3 cookies at the start.", "unknown": "how many cookies Zoe has"}]


def test_a_free_form_start_the_user_cannot_play_is_refused_at_reset(served):
    # clarify's user reads the profile's answer and facts: a start without them is refused by reset, where the client
    # sent it (it used to pass reset and fail the first step); the session keeps its episode and steps on
    with served.client().sync() as remote:
        first = remote.reset(seed=2)
        for profile, text in ((None, "the clarify user needs the profile's 'answer' and 'facts'"),
                              ({"answer": "three", "facts": FACTS},
                               "the clarify user needs profile['answer'] to be a number, got 'three'")):
            with pytest.raises(RemoteDialogueError) as err:
                remote.reset(seed=3, messages=PREFIX, profile=profile)
            assert err.value.field == "messages" and text in err.value.message, err.value
        assert remote.state().dialogue["messages"] == first.observation.messages
        stepped = remote.step(ASK)
    env = local_env()
    env.reset(seed=2)
    assert stepped.observation.messages == env.step(ASK)[0]


def test_a_state_that_cannot_be_played_fails_its_own_session_not_its_batch(served, monkeypatch):
    # A user and reward without a reset-time check_profile (classes written elsewhere) let a free-form start whose
    # profile they cannot read pass reset; it fails inside the batched step. Before the retry, that failed all four
    # sessions of the batch with a generic error.
    core = served.shared.core
    for part in (core.user, core.reward, core.verifier):
        monkeypatch.setattr(part, "check_profile", lambda profile: None)
    prefix = PREFIX
    valueless = {"answer": "three", "facts": FACTS}  # the keys, but a value the user cannot read

    async def run():
        clients = [await DialogueGymClient(base_url=served.url).connect() for _ in range(5)]
        try:
            for seed, c in enumerate(clients[:3]):
                await c.reset(seed=seed)
            await clients[3].reset(seed=3, messages=prefix)
            await clients[4].reset(seed=4, messages=prefix, profile=valueless)
            before = (await clients[3].state()).dialogue
            first = len(served.shared.batch_sizes)
            results = await asyncio.gather(*[c.step(ASK) for c in clients], return_exceptions=True)
            sizes = served.shared.batch_sizes[first:]
            after = (await clients[3].state()).dialogue
            again = await asyncio.gather(*[c.step(answer(seed)) for seed, c in enumerate(clients[:3])],
                                         *[c.step(ASK) for c in clients[3:]], return_exceptions=True)
            sizes_again = served.shared.batch_sizes[first + len(sizes):]
            await clients[3].reset(seed=3)  # a reset clears it: a row's state steps again
            fresh = await clients[3].step(ASK)
            return results, sizes, before, after, again, sizes_again, fresh
        finally:
            for c in clients:
                await c.close()

    results, sizes, before, after, again, sizes_again, fresh = asyncio.run(run())
    assert sizes[0] == 5 and sizes[1:] == [1] * 5, sizes  # one batch of five, then each state alone
    for bad, text in ((results[3], "the clarify user needs the profile's 'answer' and 'facts'"),
                      (results[4], "the clarify user needs profile['answer'] to be a number, got 'three'")):
        assert isinstance(bad, RemoteDialogueError) and bad.field == "state" and text in bad.message, bad
    assert after == before  # the refused session's episode is unchanged
    # their next steps are refused before they join a batch: the three others step in one batch of three
    assert sizes_again == [3], sizes_again
    for bad in again[3:]:
        assert isinstance(bad, RemoteDialogueError) and "this episode cannot step; reset" in bad.message, bad
    env = local_env()
    env.reset(seed=3)
    assert fresh.observation.messages == env.step(ASK)[0]
    for seed, (first, second) in enumerate(zip(results[:3], again)):  # the others step as their in-process envs
        env = local_env()
        env.reset(seed=seed)
        assert first.observation.messages == env.step(ASK)[0]
        assert second.observation.messages == env.step(answer(seed))[0]


def test_a_snapshot_with_a_broken_random_state_is_refused_at_reset(served):
    with served.client().sync() as a:
        a.reset(seed=5)
        good = a.state().dialogue
        for rng, text in (({"bit_generator": "PCG64", "state": "x"}, "TypeError"),
                          ({"bit_generator": "PCG64", "state": {"state": 1, "inc": 2}}, "KeyError"),
                          ({**good["rng"], "state": {"state": -1, "inc": 2}}, "OverflowError")):
            for branch in (None, 1):  # stepping reads it, and so does forking (branch >= 1)
                with pytest.raises(RemoteDialogueError) as e:
                    a.reset(state=dict(good, rng=rng), branch=branch)
                assert e.value.field == "state" and "state.rng is not a usable PCG64" in e.value.message
                assert text in e.value.message
                assert a.state().dialogue == good


def test_the_session_limit_refuses_one_more_with_a_clear_message():
    s = Served(max_sessions=2, window_s=0.01)
    try:
        first, second = s.client().sync(), s.client().sync()
        first.connect()
        second.connect()
        first.reset(seed=0)
        second.reset(seed=1)
        third = s.client().sync()
        with pytest.raises(Exception, match=r"capacity: 2/2 sessions active"):
            third.connect()
            third.reset(seed=2)
        third.close()
        assert second.step(ASK).observation.turn == 1  # the open sessions are unaffected
        first.close()
        deadline = time.monotonic() + 10
        while s.shared.running_sessions() > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server frees the slot when it sees the close
        with s.client().sync() as fourth:
            assert fourth.reset(seed=3).observation.turn == 0
        second.close()
    finally:
        s.stop()


def test_importing_without_the_extra_names_the_install_line():
    code = ("import sys; sys.modules['openenv'] = None\n"
            "try:\n    import dialogue_gym.integrations.openenv\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert "pip install 'dialogue-gym[integrations]'" in out.stdout, out.stderr


@pytest.mark.slow
def test_serve_env_entry_point_serves_a_session(tmp_path):
    port = free_port()
    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "dialogue_gym.serve_env", "+env=clarify", f"port={port}", "max_sessions=2",
           "env.task_kwargs.n_train=20"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with DialogueGymClient(base_url=f"http://127.0.0.1:{port}").sync() as c:
                    r = c.reset(seed=0)
                    break
            except ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "server.log").read_text()) from None
                time.sleep(0.5)
        env = DialogueEnv(**{**ENV, "task_kwargs": {"steps": 1, "withheld": 1, "n_train": 20, "n_validation": 100,
                                                    "n_test": 200, "distractors": 0, "vague": 0.0, "seed": 0,
                                                    "discount": 1.0}})
        assert r.observation.messages == env.reset(seed=0)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
