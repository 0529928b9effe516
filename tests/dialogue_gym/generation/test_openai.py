"""OpenAIEngine against a real HTTP server on loopback that injects faults (tests/fault_server.py).

The server answers like vLLM's OpenAI server with canned content, so these tests need no vLLM and run in
seconds; tests/dialogue_gym/generation/test_openai_server.py checks the same engine against vLLM's real server.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import gymnasium as gym
import numpy as np
import pytest

import dialogue_gym  # noqa: F401  (registers the env)
from dialogue_gym.conversation import DialogueError
from dialogue_gym.generation import make_engine
from dialogue_gym.generation.base import SamplingParams, prompt_token_ids
from dialogue_gym.generation.openai import OpenAIEngine, ServerError
from dialogue_gym.rewards.judge import LLMJudge
from tests.fault_server import DIGIT_LOGPROB, FaultServer, canned_tokens

CHATS = [[{"role": "user", "content": f"Question number {i}: how do I boil an egg?"}] for i in range(6)]
PARAMS = SamplingParams(temperature=0.8, max_new_tokens=16)
SECRET = "sk-test-0123456789abcdef-secret"


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def engine(server):
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=5) as eng:
        yield eng


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def posts(server: FaultServer) -> list:
    return [r for r in server.requests if r[0] == "POST"]


def test_token_ids_and_seeds_travel(engine, server):
    gens = engine.generate(CHATS[:3], PARAMS, seeds=[5, 17, 5], return_logprobs=True)
    bodies = [r[3] for r in posts(server)]
    assert sorted(b["seed"] for b in bodies) == [5, 5, 17]
    for chat, g in zip(CHATS, gens):
        ids = prompt_token_ids(engine.tokenizer, chat)
        assert g.prompt_token_ids == ids  # rendered here, sent as ids
        assert ids in [b["prompt"] for b in bodies]
    assert gens[0].token_ids == canned_tokens(5) == gens[2].token_ids and gens[1].token_ids == canned_tokens(17)
    assert gens[0].finished and gens[0].text == engine.tokenizer.decode(canned_tokens(5)[:-1])
    assert gens[0].logprobs == [-0.25] * 4
    assert engine.tokens_generated == 12
    assert all(b["return_token_ids"] and b["top_k"] == 0 and b["stop_token_ids"] == [2] for b in bodies)


def test_requests_run_concurrently_within_the_bound(server):
    server.answer_delay = 0.3
    with OpenAIEngine("tiny", server.url, max_concurrency=3) as eng:
        eng.generate(CHATS, PARAMS, seeds=list(range(6)))
    assert server.max_in_flight == 3


@pytest.mark.parametrize("faults", [[("status", 429)], [("status", 500), ("status", 503)], [("delay", 2.0)],
                                    [("drop",)]])
def test_transient_faults_are_retried(server, faults):
    server.faults = list(faults)
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=1.0, max_retries=3) as eng:
        (g,) = eng.generate(CHATS[:1], PARAMS, seeds=[3])
    assert g.token_ids == canned_tokens(3)
    assert len(posts(server)) == len(faults) + 1


@pytest.mark.parametrize("fault, status, match", [
    (("status", 503), 503, r"failed after 3 attempts: HTTP 503: .*injected 503"),
    (("status", 429), 429, r"failed after 3 attempts: HTTP 429"),
    (("delay", 2.0), None, r"failed after 3 attempts: no answer within timeout_s=0.5 s"),
])
def test_retries_are_bounded_and_the_error_names_server_model_status(server, fault, status, match):
    server.faults = [fault] * 3
    with OpenAIEngine("tiny", server.url, backoff_s=0.01, timeout_s=0.5, max_retries=2) as eng:
        with pytest.raises(ServerError, match=match) as e:
            eng.generate(CHATS[:1], PARAMS, seeds=[3])
    assert e.value.url == server.url and e.value.model == "tiny" and e.value.status == status
    assert server.url in str(e.value) and "'tiny'" in str(e.value)
    assert len(posts(server)) == 3


@pytest.mark.parametrize("fault, match", [
    (("garbage",), "malformed JSON in an HTTP 200 answer"),
    (("truncated",), "malformed JSON in an HTTP 200 answer"),
    (("choices", 2), "the answer has 2 choices; one was asked for"),
    (("choices", 0), "the answer has 0 choices"),
    (("status", 400), "HTTP 400: .*injected 400"),
])
def test_bad_answers_fail_at_once_with_a_clear_error(engine, server, fault, match):
    server.faults = [fault]
    with pytest.raises(ServerError, match=match):
        engine.generate(CHATS[:1], PARAMS, seeds=[3])
    assert len(posts(server)) == 1  # not retried
    assert engine.generate(CHATS[:1], PARAMS, seeds=[3])[0].token_ids == canned_tokens(3)  # still usable


def test_one_failing_request_fails_the_whole_batch(engine, server):
    server.faults = [("status", 400)]
    with pytest.raises(ServerError, match="HTTP 400"):
        engine.generate(CHATS, PARAMS, seeds=list(range(6)))
    assert engine.tokens_generated == 0


def test_construction_fails_fast_when_the_server_is_down():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t = time.perf_counter()
    with pytest.raises(ServerError, match=f"GET {url}/models failed after 1 attempt: connection failed"):
        OpenAIEngine("tiny", url, max_retries=5, backoff_s=10)
    assert time.perf_counter() - t < 30  # no retries with their 10 s backoff


def test_a_server_that_goes_away_is_retried_then_named(server):
    eng = OpenAIEngine("tiny", server.url, backoff_s=0.01, max_retries=2)
    server.close()  # connections are refused from now on
    with pytest.raises(ServerError, match=r"POST .*/completions failed after 3 attempts: connection failed") as e:
        eng.generate(CHATS[:2], PARAMS)
    assert e.value.status is None and server.url in str(e.value)
    eng.close()
    with pytest.raises(RuntimeError, match="this OpenAIEngine was closed"):
        eng.generate(CHATS[:1], PARAMS)


def test_construction_fails_when_the_model_is_not_served(server):
    with pytest.raises(ServerError, match=r"serves \['tiny'\], not 'embedded'; start it with --served-model-name"):
        OpenAIEngine("embedded", server.url)


@pytest.mark.parametrize("kwargs, match", [
    ({"base_url": "127.0.0.1:8000/v1"}, "expected http"),
    ({"base_url": "http://user:pw@127.0.0.1:8000/v1"}, "must not carry credentials"),
    ({"api": "grpc"}, "api is 'grpc'; allowed: completions, chat"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
])
def test_bad_engine_settings(server, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenAIEngine("tiny", **({"base_url": server.url} | kwargs))


def test_unauthorised_names_the_key_variable(server, monkeypatch):
    monkeypatch.delenv("DG_TEST_KEY", raising=False)
    server.faults = [("status", 401)]
    with OpenAIEngine("tiny", server.url, api_key_env="DG_TEST_KEY") as eng:
        with pytest.raises(ServerError, match=r"HTTP 401 \(unauthorised\); set \$DG_TEST_KEY"):
            eng.generate(CHATS[:1], PARAMS)


def test_judge_reads_the_digit_logprobs(engine, server):
    judge = LLMJudge("tiny", engine=engine)
    convs = [CHATS[0] + [{"role": "assistant", "content": "Boil it for 8 minutes."}]] * 2
    scores = judge.score(convs)
    body = posts(server)[-1][3]
    assert body["logprob_token_ids"] == judge.digit_ids and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["prompt"] == judge.prompt_ids(convs[0])
    w = np.exp(DIGIT_LOGPROB - 0.5 * np.arange(9))  # the canned log-probs: digit d gets -3 - 0.5 (d - 1)
    np.testing.assert_allclose(scores, [(w * np.arange(1, 10)).sum() / w.sum()] * 2, rtol=1e-12)
    assert judge.describe()["engine"] == engine.describe()


def test_chat_api_sends_messages_and_reads_top_logprobs(server):
    with OpenAIEngine("tiny", server.url, api="chat") as eng:
        (g,) = eng.generate(CHATS[:1], PARAMS, seeds=[9])
        body = posts(server)[-1][3]
        assert body["messages"] == CHATS[0] and body["seed"] == 9 and "prompt" not in body
        assert g.text == "Question: canned?" and g.prompt_token_ids == prompt_token_ids(eng.tokenizer, CHATS[0])
        with pytest.raises(ValueError, match="api='chat' cannot return log-probs"):
            eng.generate(CHATS[:1], PARAMS, return_logprobs=True)
        with pytest.raises(ValueError, match="takes chat conversations only"):
            eng.generate([[1, 2, 3]], PARAMS)
        judge = LLMJudge("tiny", engine=eng)
        with pytest.warns(UserWarning, match="not among the top 20 log-probs"):
            (score,) = judge.score([CHATS[0] + [{"role": "assistant", "content": "Eight minutes."}]])
    w = np.exp(-0.5 * np.arange(0, 9, 2))  # the canned answer lists the odd digits only
    assert score == pytest.approx((w * np.arange(1, 10, 2)).sum() / w.sum(), rel=1e-12)


def test_env_config_checks_the_server_settings(server):
    with pytest.raises(DialogueError, match="engine 'openai' needs base_url"):
        gym.make("MultiTurnDialogue-v0", engine="openai")
    with pytest.raises(DialogueError, match="base_url is set but the user engine is 'hf'"):
        gym.make("MultiTurnDialogue-v0", base_url=server.url)
    with pytest.raises(DialogueError, match="judge_engine 'openai' needs judge_base_url"):
        gym.make("MultiTurnDialogue-v0", judge_engine="openai")
    with pytest.raises(DialogueError, match="judge_base_url: .*must not carry credentials"):
        gym.make("MultiTurnDialogue-v0", judge_engine="openai", judge_base_url="http://a:b@h:1/v1")
    with pytest.raises(DialogueError, match="judge_engine is 'tgi'"):
        gym.make("MultiTurnDialogue-v0", judge_engine="tgi")
    with pytest.raises(ServerError, match="not 'embedded'"):  # construction checks the server
        gym.make("MultiTurnDialogue-v0", engine="openai", base_url=server.url)


def make_env(server: FaultServer, **kw):
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=3, autoreset_mode="Disabled", engine="openai",
                        base_url=server.url, model="tiny", reward="judge", reward_mode="per_turn", max_turns=4,
                        engine_options={"backoff_s": 0.01, "timeout_s": 5, "max_retries": 1,
                                       "api_key_env": "DG_TEST_KEY"}, **kw)


def test_env_through_the_server_survives_an_outage(server, tmp_path, monkeypatch, caplog):
    """A step that fails on the server leaves every state as it was, stores nothing, and the next step after the
    server is back works; the API key reaches the server and nothing else."""
    from benchmarks.leaderboard import play_states
    from dialogue_gym.generation.hf import HFEngine
    from dialogue_gym.rollouts import RolloutStore, make_states

    monkeypatch.setenv("DG_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    venv = make_env(server)
    obs, _ = venv.reset(seed=0)
    assert venv.core.engine() is venv.core.reward.engine  # one engine for user and judge
    before = [s.to_dict() for s in venv.get_states()]
    server.outage = 503
    with pytest.raises(ServerError, match="HTTP 503"):
        venv.step(["Boil it.", "Eight minutes.", "Use a timer."])
    assert [s.to_dict() for s in venv.get_states()] == before
    server.outage = None
    obs, reward, term, trunc, info = venv.step(["Boil it.", "Eight minutes.", "Use a timer."])  # server is back
    assert all(o[-1]["role"] == "user" for o in obs) and np.all(info["score"] > 1)

    store = RolloutStore(tmp_path / "dialogues.jsonl")
    states = make_states(venv.core, 3, seed=1)
    policy = HFEngine("tiny")
    server.outage = 500
    with pytest.raises(ServerError):
        store.append(play_states(venv, policy, SamplingParams(temperature=0, max_new_tokens=4), states, "p"))
    assert store.read() == []  # no partial record
    server.outage = None
    records = play_states(venv, policy, SamplingParams(temperature=0, max_new_tokens=4), states, "p")
    store.append(records)

    auth = {r[2].get("Authorization") for r in server.requests}
    assert auth == {f"Bearer {SECRET}"}  # every request carried the key
    leaks = {"describe": json.dumps(venv.core.describe()), "fingerprint": venv.core.fingerprint,
             "states": json.dumps([s.to_dict() for s in venv.get_states()]),
             "store": (tmp_path / "dialogues.jsonl").read_text(), "engine": repr(venv.core.engine()) +
             json.dumps(venv.core.engine().__dict__, default=repr), "logs": caplog.text}
    assert [k for k, v in leaks.items() if SECRET in v] == []
    assert len(store.read()) == 3


def test_make_engine_shares_one_engine_per_server_and_model(server):
    a = make_engine("openai", "tiny", base_url=server.url)
    b = make_engine("openai", "tiny", base_url=server.url)
    assert a is b


def test_hydra_env_settings_carry_the_servers_and_bad_ones_are_config_errors():
    from hydra import compose, initialize_config_dir

    from agents.common.config import ConfigError, check_engines, env_kwargs, merge_schema
    from agents.refuel.config import RefuelConfig, validate
    from tests.agents.test_agents_regression import CONF

    overrides = ["env.engine=openai", "env.base_url=http://user-node:8000/v1", "env.judge_engine=openai",
                 "env.judge_base_url=http://judge-node:8001/v1", "env.judge_model=judge-7b",
                 "+env.engine_options.max_concurrency=64"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = merge_schema(compose(config_name="refuel", overrides=overrides), RefuelConfig)
    kw = env_kwargs(cfg.env)
    assert kw["engine"] == "openai" and kw["base_url"] == "http://user-node:8000/v1"
    assert kw["judge_base_url"] == "http://judge-node:8001/v1" and kw["judge_model"] == "judge-7b"
    assert kw["engine_options"] == {"max_concurrency": 64} and "judge_engine_options" not in kw
    validate(cfg)  # no server is asked at validation
    cfg.env.judge_base_url = None
    cfg.env.judge_engine = "vllm"
    with pytest.raises(ConfigError, match="env.judge_base_url is set|env.base_url is set"):
        cfg.env.judge_base_url = "http://judge-node:8001/v1"
        check_engines(cfg.env)
    cfg.env.base_url = None
    with pytest.raises(ConfigError, match="env.base_url is missing: engine 'openai' needs base_url"):
        validate(cfg)


def test_refuel_paper_preset_with_a_served_user_composes():
    """The README's command: the refuel_paper preset with its 70B user on a server."""
    from hydra import compose, initialize_config_dir

    from agents.common.config import check_engines, merge_schema
    from agents.refuel.config import RefuelConfig
    from tests.agents.test_agents_regression import CONF

    overrides = ["+env=ultrainteract", "+experiment=refuel_paper", "env.task_kwargs.path=/data/ultrainteract_pair",
                 "env.engine=openai", "env.base_url=http://node-a:8000/v1", "+env.engine_options.max_concurrency=128",
                 "+env.engine_options.timeout_s=600"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = merge_schema(compose(config_name="refuel", overrides=overrides), RefuelConfig)
    check_engines(cfg.env)
    assert cfg.env.model == "meta-llama/Llama-3.1-70B-Instruct" and cfg.env.engine == "openai"
    assert cfg.env.engine_options == {"max_concurrency": 128, "timeout_s": 600}
    assert cfg.env.reward.startswith("classifier:")  # the paper's reward model stays in process
