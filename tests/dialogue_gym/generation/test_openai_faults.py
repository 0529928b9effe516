"""OpenAIEngine against a server that misbehaves in what it sends (issue 25, part 1), on a real loopback server.

Every answer field the engine reads is corrupted once (tests/fault_server.py's ``("edit", fn)`` fault): each must
raise :class:`ServerError` naming the server, the model and the field, without a retry, and leave the engine
usable. Then the body-size cap, the one deadline per request, the shared engine cache, the Retry-After cap and
the redaction of secrets in error messages.
"""

from __future__ import annotations

import asyncio
import math
import types

import gymnasium as gym
import numpy as np
import pytest

import dialogue_gym  # noqa: F401  (registers the env)
from dialogue_gym.conversation import DialogueError
from dialogue_gym.generation import openai as openai_module
from dialogue_gym.generation.base import SamplingParams
from dialogue_gym.generation.openai import OpenAIEngine, ServerError
from tests.fault_server import FaultServer, canned_tokens

CHATS = [[{"role": "user", "content": f"Question number {i}: how do I boil an egg?"}] for i in range(3)]
PARAMS = SamplingParams(temperature=0.8, max_new_tokens=16)
SECRET = "sk-test-0123456789abcdef-secret"
VOCAB = 49152  # the tiny model's tokenizer
NAN = float("nan")


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def posts(server: FaultServer) -> list:
    return [r for r in server.requests if r[0] == "POST"]


def set_choice(*path_and_value: object):
    """An ``edit`` fault: set ``choices[0][path...]`` of the normal answer to the last argument."""
    *path, value = path_and_value

    def edit(answer: dict) -> None:
        cur = answer["choices"][0]
        for key in path[:-1]:
            cur = cur[key]
        cur[path[-1]] = value
    return edit


def set_first_top(value: object, key: str | None = None):
    """An ``edit`` fault for a completions judge answer: the first candidate's log-prob becomes ``value`` (and
    its key ``key``, when given)."""
    def edit(answer: dict) -> None:
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        first = next(iter(top))
        del top[first]
        top[key or first] = value
    return edit


def drop_chat_logprob(answer: dict) -> None:
    answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0].pop("logprob")


def generate(eng: OpenAIEngine) -> object:
    return eng.generate(CHATS[:1], PARAMS, seeds=[3])


def generate_lp(eng: OpenAIEngine) -> object:
    return eng.generate(CHATS[:1], PARAMS, seeds=[3], return_logprobs=True)


def judge(eng: OpenAIEngine) -> object:
    return eng.next_token_logprobs(CHATS[:1], list(range(17, 26)))


# (api, call, fault edit, the field the error must name)
CORRUPT = [
    ("completions", generate, set_choice("token_ids", [-5, 2]), r"choices\[0\]\.token_ids\[0\] is -5"),
    ("completions", generate, set_choice("token_ids", [10**20]), r"choices\[0\]\.token_ids\[0\] is 10{20}"),
    ("completions", generate, set_choice("token_ids", [28, VOCAB]), rf"choices\[0\]\.token_ids\[1\] is {VOCAB}; "
                                                                    rf"token ids must be integers in \[0, {VOCAB}\)"),
    ("completions", generate, set_choice("token_ids", [28, "7"]), r"choices\[0\]\.token_ids\[1\] is '7'"),
    ("completions", generate, set_choice("token_ids", list(range(30, 47))),
     r"choices\[0\]\.token_ids has 17 ids; max_tokens was 16"),
    ("completions", generate, set_choice("token_ids", 28), r"choices\[0\]\.token_ids is 28, not a list"),
    ("completions", generate, set_choice("prompt_token_ids", 5), r"choices\[0\]\.prompt_token_ids is 5, not a list"),
    ("completions", generate, set_choice("prompt_token_ids", [1, 2]),
     r"choices\[0\]\.prompt_token_ids: the server used 2 prompt token ids that differ from the \d+ sent"),
    ("completions", generate, set_choice("finish_reason", 1), r"choices\[0\]\.finish_reason is 1"),
    ("completions", generate_lp, set_choice("logprobs", "token_logprobs", [-0.25, NAN, -0.25, -0.25]),
     r"choices\[0\]\.logprobs\.token_logprobs\[1\] is nan"),
    ("completions", generate_lp, set_choice("logprobs", "token_logprobs", [-0.25, None, -0.25, -0.25]),
     r"choices\[0\]\.logprobs\.token_logprobs\[1\] is None"),
    ("completions", generate_lp, set_choice("logprobs", "token_logprobs", [-0.25, 3.0, -0.25, -0.25]),
     r"choices\[0\]\.logprobs\.token_logprobs\[1\] is 3\.0"),
    ("completions", generate_lp, set_choice("logprobs", "token_logprobs", [-0.25, -0.25, -9999.0, -0.25]),
     r"token_logprobs\[2\] is -9999\.0; a log-prob must be a finite number <= 0"),
    ("completions", generate, set_choice("token_ids", [28, True]), r"choices\[0\]\.token_ids\[1\] is True"),
    ("completions", generate_lp, set_choice("logprobs", "tokens", ["token_id:1"] * 4),
     r"choices\[0\]\.logprobs\.tokens: .* do not match choices\[0\]\.token_ids"),
    ("completions", judge, set_first_top(None), r"choices\[0\]\.logprobs\.top_logprobs\[0\]\['token_id:17'\] is None"),
    ("completions", judge, set_first_top("abc"), r"top_logprobs\[0\]\['token_id:17'\] is 'abc'"),
    ("completions", judge, set_first_top(NAN), r"top_logprobs\[0\]\['token_id:17'\] is nan"),
    ("completions", judge, set_first_top(-1.0, "token_id:-3"), r"top_logprobs\[0\] has key 'token_id:-3'"),
    ("completions", judge, set_first_top(-1.0, f"token_id:{VOCAB}"), rf"has key 'token_id:{VOCAB}'"),
    ("completions", judge, set_choice("logprobs", "top_logprobs", [[1, 2]]),
     r"choices\[0\]\.logprobs\.top_logprobs\[0\] is \[1, 2\], not an object"),
    ("chat", generate, set_choice("message", "content", None), r"choices\[0\]\.message\.content is None"),
    ("chat", generate, lambda a: a.update(usage={"completion_tokens": 17}),
     r"usage\.completion_tokens is 17; max_tokens was 16"),
    ("chat", judge, drop_chat_logprob, r"choices\[0\]\.logprobs\.content\[0\]\.top_logprobs\[0\] lacks logprob"),
    ("chat", judge, set_choice("logprobs", "content", [{"token": "1", "logprob": -1.0, "top_logprobs": [
        {"token": "1", "logprob": None}]}]), r"content\[0\]\.top_logprobs\[0\]\.logprob is None"),
    ("chat", judge, set_choice("logprobs", "content", [{"token": "1", "logprob": -1.0, "top_logprobs": [
        {"token": "1", "logprob": NAN}]}]), r"content\[0\]\.top_logprobs\[0\]\.logprob is nan"),
    ("chat", judge, set_choice("logprobs", "content", [{"token": "1", "logprob": -1.0, "top_logprobs": [
        {"token": 1, "logprob": -1.0}]}]), r"content\[0\]\.top_logprobs\[0\]\.token is 1, not a string"),
    ("chat", judge, set_choice("logprobs", "content", [{"token": "1", "logprob": -1.0, "top_logprobs": None}]),
     r"content\[0\]\.top_logprobs is None, not a non-empty list"),
]


@pytest.mark.filterwarnings("ignore:some candidate tokens were not among the top 20")  # the chat judge's retry
@pytest.mark.parametrize("api, call, edit, match", CORRUPT, ids=[f"{c[0]}-{c[1].__name__}-{i}"
                                                                for i, c in enumerate(CORRUPT)])
def test_a_corrupt_answer_field_is_a_server_error_naming_it(server, api, call, edit, match):
    with OpenAIEngine("tiny", server.url, api=api, backoff_s=0.01, timeout_s=5) as eng:
        server.faults = [("edit", edit)]
        with pytest.raises(ServerError, match=match) as e:
            call(eng)
        assert (e.value.url, e.value.model, e.value.status) == (server.url, "tiny", 200)
        assert f"server {server.url}, model 'tiny'" in str(e.value)
        assert len(posts(server)) == 1  # a malformed answer is not retried
        assert eng.tokens_generated == 0  # nothing of the failed call is counted
        out = call(eng)  # the engine is still usable
        if call in (generate, generate_lp) and api == "completions":
            assert out[0].token_ids == canned_tokens(3)


@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000, b'{"choices": [\xff\xfe]}'],
                         ids=["nested-too-deep", "not-utf8"])
def test_an_unparsable_body_is_malformed_json(server, payload):
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=5) as eng:
        server.faults = [("raw", payload)]
        with pytest.raises(ServerError, match="malformed JSON in an HTTP 200 answer") as e:
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
        assert e.value.status == 200 and len(e.value.args[0]) < 1000  # the quoted body is cut
        assert eng.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)


def test_a_corrupt_answer_leaves_the_episodes_intact(server):
    """A token id past the vocabulary used to decode to '' and become the fallback question, silently."""
    def corrupt(answer: dict) -> None:
        choice = answer["choices"][0]
        choice["token_ids"] = [VOCAB] * len(choice["token_ids"])
        if choice.get("logprobs") and choice["logprobs"].get("top_logprobs"):  # a judge request came first
            top = choice["logprobs"]["top_logprobs"][0]
            top.update({k: NAN for k in top})

    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=3, autoreset_mode="Disabled", engine="openai",
                        base_url=server.url, model="tiny", reward="judge", reward_mode="per_turn", max_turns=4,
                        engine_options={"backoff_s": 0.01, "timeout_s": 5, "max_retries": 1})
    venv.reset(seed=0)
    before = [s.to_dict() for s in venv.get_states()]
    server.faults = [("edit", corrupt)]
    with pytest.raises(ServerError, match=r"token_ids\[0\] is 49152|is nan"):
        venv.step(["Boil it.", "Eight minutes.", "Use a timer."])
    assert [s.to_dict() for s in venv.get_states()] == before
    obs, *_ = venv.step(["Boil it.", "Eight minutes.", "Use a timer."])
    assert all(o[-1]["role"] == "user" for o in obs)


# ---- size and time ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "streamed"])
def test_a_body_past_the_cap_is_refused(server, declare):
    big = 16 * 2**20  # the default cap
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=20) as eng:
        server.faults = [("pad", big + 1024, declare)]
        with pytest.raises(ServerError, match=r"answer is larger than max_body_bytes=16777216 bytes") as e:
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
        assert e.value.url == server.url and len(posts(server)) == 1
        assert eng.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)
    with OpenAIEngine("tiny", server.url, max_body_bytes=2000) as eng:  # a smaller cap, and a body within it
        server.faults = [("pad", 1000, False)]
        assert eng.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)
        server.faults = [("pad", 3000, True)]
        with pytest.raises(ServerError, match="larger than max_body_bytes=2000 bytes"):
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
    with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1024"):
        OpenAIEngine("tiny", server.url, max_body_bytes=10)


def test_timeout_bounds_the_whole_request_not_each_read(server):
    """A valid body trickled in pieces 0.4 s apart (each read well within timeout_s) for 2.4 s: one deadline."""
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=1.0, max_retries=1) as eng:
        server.faults = [("trickle", 7, 0.4)] * 2
        with pytest.raises(ServerError, match=r"failed after 2 attempts: no answer within timeout_s=1 s") as e:
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
        assert e.value.status is None and len(posts(server)) == 2
        server.faults = [("trickle", 3, 0.1)]  # slow but within the deadline
        assert eng.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)


# ---- the shared engine cache -----------------------------------------------------------------------------------

def single_env(server: FaultServer) -> gym.Env:
    return gym.make("MultiTurnDialogue-v0", engine="openai", base_url=server.url, model="tiny",
                    engine_options={"backoff_s": 0.01, "timeout_s": 5, "max_retries": 0})


def test_a_new_env_on_a_shared_engine_checks_the_server(server):
    env = single_env(server)
    env.reset(seed=0)
    server.close()
    with pytest.raises(ServerError, match=r"GET .*/models failed after 1 attempt: connection failed"):
        single_env(server)


def test_a_closed_shared_engine_is_never_handed_out(server):
    first = single_env(server)
    engine = first.unwrapped.core.engine()
    engine.close()
    second = single_env(server)
    assert second.unwrapped.core.engine() is not engine
    second.reset(seed=0)
    obs, *_ = second.step("Boil it for eight minutes.")
    assert obs[-1]["role"] == "user"


# ---- retries and secrets ---------------------------------------------------------------------------------------

def test_the_retry_after_cap_holds_with_jitter(server, monkeypatch):
    """The server asks for 100 s; the engine waits the cap (30 s) at most, jitter included. The clock is a spy:
    it records the wait the engine asked for and returns at once."""
    asked: list[float] = []

    async def sleep(seconds: float, *args: object) -> None:
        asked.append(seconds)

    spy = types.ModuleType("asyncio")
    spy.__dict__.update(asyncio.__dict__)
    spy.sleep = sleep
    monkeypatch.setattr(openai_module, "asyncio", spy)
    monkeypatch.setattr(openai_module.random, "random", lambda: 0.999)
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, max_retries=2) as eng:
        server.faults = [("status", 429, {"Retry-After": "100"}), ("status", 503, {"Retry-After": "inf"})]
        assert eng.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)
    assert len(asked) == 2 and all(0 < s <= openai_module.MAX_RETRY_AFTER_S for s in asked), asked
    assert asked[0] > 0.9 * openai_module.MAX_RETRY_AFTER_S  # the server's wish is honoured up to the cap


@pytest.mark.parametrize("base_url, match", [
    ("htp://user:hunter2@127.0.0.1:8000/v1", "expected http"),
    ("user:hunter2@127.0.0.1:8000/v1", "expected http"),
    ("http://user:hunter2@[::1/v1", "base_url"),
    ("http://127.0.0.1:notaport/v1", "Port could not be cast"),
    ("http://127.0.0.1:99999/v1", "Port out of range 0-65535"),
])
def test_a_malformed_url_is_a_value_error_without_the_password(base_url, match):
    with pytest.raises(ValueError, match=match) as e:
        OpenAIEngine("tiny", base_url)
    assert "hunter2" not in str(e.value)
    with pytest.raises(DialogueError, match=match) as e:
        gym.make("MultiTurnDialogue-v0", engine="openai", base_url=base_url)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("status, pad", [(400, 0), (400, 135), (503, 0), (503, 135)])
def test_error_bodies_are_quoted_without_the_api_key(server, monkeypatch, status, pad):
    """A proxy that echoes the Authorization header into its error body; ``pad`` puts the key across the place
    where the quoted body is cut, so a redaction after the cut would miss the key's start."""
    monkeypatch.setenv("DG_TEST_KEY", SECRET)
    with OpenAIEngine("tiny", server.url, api_key_env="DG_TEST_KEY", backoff_s=0.01, max_retries=1) as eng:
        server.faults = [("echo", status, pad)] * 2
        with pytest.raises(ServerError, match=f"HTTP {status}") as e:
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
    message = str(e.value)
    assert posts(server)[0][2]["Authorization"] == f"Bearer {SECRET}"  # the key was sent, and echoed
    assert not any(SECRET[i:i + 6] in message for i in range(len(SECRET) - 5)), message
    assert "received Authorization: Bearer ***" in message or pad


def test_the_redaction_rules():
    from dialogue_gym.generation.http_common import redact

    text = f"key {SECRET} auth: Bearer abc.def-123 url http://me:pw0rd@host:1/v1 and me:pw0rd@host"
    out = redact(text, secrets=[SECRET])
    assert out == "key *** auth: Bearer *** url http://***@host:1/v1 and ***@host"
    assert redact("nothing to hide", secrets=["", None]) == "nothing to hide"


def test_a_quoted_body_is_redacted_before_it_is_cut():
    """The key placed where the quote is cut, after a body that is mostly whitespace (collapsed in the quote)."""
    from dialogue_gym.generation.http_common import server_error

    for body in (" \n" * 20_000 + "." * 180 + f" x-api-key: {SECRET}", "." * 185 + SECRET):
        message = str(server_error("HTTP 400", "http://h:1/v1", "tiny", 400, body=body, secrets=[SECRET]))
        assert not any(SECRET[i:i + 6] in message for i in range(len(SECRET) - 5)), message
        assert message.startswith("HTTP 400: ....") and message.endswith("[server http://h:1/v1, model 'tiny', "
                                                                          "HTTP status 400]")


def test_the_retry_wait_rule():
    from dialogue_gym.generation.http_common import retry_wait

    cap = openai_module.MAX_RETRY_AFTER_S
    assert retry_wait(1, 0.5, None, jitter=0.0, cap_s=cap) == 0.5
    assert retry_wait(3, 0.5, None, jitter=0.0, cap_s=cap) == 2.0
    assert retry_wait(2, 0.5, None, jitter=0.5, cap_s=cap) == pytest.approx(1.05)
    assert retry_wait(1, 0.5, 4.0, jitter=0.0, cap_s=cap) == 4.0  # the server's wish beats a shorter backoff
    assert retry_wait(1, 0.5, 100.0, jitter=0.999, cap_s=cap) == cap
    assert retry_wait(40, 0.5, None, jitter=0.999, cap_s=cap) == cap  # the backoff is capped as well
    assert math.isfinite(retry_wait(1, 0.5, math.inf, jitter=0.5, cap_s=cap))
    waits = [retry_wait(a, 0.5, r, jitter=j, cap_s=cap) for a in range(1, 12) for r in (None, 0.0, 29.9, 1e9)
             for j in np.linspace(0, 0.999, 7)]
    assert max(waits) <= cap and min(waits) >= 0.5
