"""Shared test settings: no hub access, helpers for cheap reward models."""

from __future__ import annotations

import os
import sys

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


class LengthReward:
    """A deterministic reward for tests: number of characters of the last assistant reply / 10."""

    def __init__(self) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []

    def score(self, conversations, profiles=None):
        self.calls += 1
        self.batch_sizes.append(len(conversations))
        return np.array([len(c[-1]["content"]) / 10 for c in conversations], dtype=np.float64)

    def describe(self):
        return {"reward": "length_test"}


@pytest.fixture(scope="session", autouse=True)
def _shutdown_vllm_engines():
    """Shut down vLLM engines left open (make_engine shares them across tests) while pytest's output capture is
    still open; at interpreter exit their shutdown would log to closed streams."""
    yield
    module = sys.modules.get("dialogue_gym.generation.vllm")
    if module is not None:
        module.shutdown_all()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server on the tiny model (served as "tiny") on a free loopback port, started once per
    session (~30-65 s) with a 256 MiB KV cache; yields its base URL."""
    from dialogue_gym.generation.serve import VLLMServer

    try:
        server = VLLMServer("tiny", log_path=tmp_path_factory.mktemp("vllm_server") / "server.log")
    except RuntimeError as e:
        pytest.fail(str(e))
    with server:
        yield server.url
