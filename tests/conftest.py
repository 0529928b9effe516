"""Shared test settings: no hub access, the suite's device, helpers for cheap reward models.

The device: ``pytest --device cpu|cuda|cuda:N|auto`` (or ``DIALOGUE_GYM_DEVICE``; default ``auto``: CUDA when
available, else CPU) is where every model in the suite loads, in this process and in the agents' subprocesses
(through ``DIALOGUE_GYM_DEVICE``, which ``dialogue_gym.models.resolve_device("auto")`` reads).
"""

from __future__ import annotations

import os
import sys

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# HF engines default to the compiled static KV cache on CUDA; the suite opts out (minutes of compilation for tiny
# models); tests of the static cache ask for it explicitly.
os.environ.setdefault("DIALOGUE_GYM_HF_CACHE", "dynamic")
# Under pytest-xdist (`make test` runs 2 workers) each worker's torch, and the agents it spawns, get their share of the
# cores: a full set of OpenMP threads per worker would oversubscribe them. Set before anything imports torch; a
# user's OMP_NUM_THREADS is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device for the whole suite: auto (CUDA when available, else CPU), cpu, cuda, cuda:N; "
                          "default: $DIALOGUE_GYM_DEVICE or auto")


def pytest_configure(config):
    chosen = config.getoption("--device") or os.environ.get("DIALOGUE_GYM_DEVICE") or "auto"
    os.environ["DIALOGUE_GYM_DEVICE"] = chosen  # inherited by the agents' subprocesses
    from dialogue_gym.models import DeviceError, resolve_device

    try:
        config._dialogue_gym_device = resolve_device("auto")
    except DeviceError as e:  # fail the session at once, with the reason, when the device is not there
        raise pytest.UsageError(f"--device / DIALOGUE_GYM_DEVICE: {e}") from None


def pytest_report_header(config):
    return f"dialogue-gym test device: {config._dialogue_gym_device}"


@pytest.fixture(scope="session")
def device(pytestconfig):
    """The torch device every model of the suite runs on."""
    return pytestconfig._dialogue_gym_device


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
