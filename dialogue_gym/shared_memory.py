"""Gymnasium's shared-memory and empty-array hooks for the :class:`Conversation` space.

``gym.make_vec(..., vectorization_mode="async")`` builds an ``AsyncVectorEnv`` with ``shared_memory=True``: each
worker writes its observation into a buffer made by ``create_shared_memory`` and the main process reads the
batch through the object ``read_from_shared_memory`` returned *once*, at construction. That object must therefore
be a live view. Gymnasium's own hooks cover fixed-size arrays; a conversation has no fixed size, so each sub-env
gets a slot of ``SLOT_BYTES`` bytes holding an 8-byte length and the observation as UTF-8 JSON, and the view
decodes a slot when it is indexed. ``deepcopy`` of the view (what ``AsyncVectorEnv`` returns with its default
``copy=True``) is a plain tuple of decoded observations. An observation larger than its slot raises a
:class:`DialogueError` in the worker that names the size and the way out (``vector_kwargs={"shared_memory":
False}``, which works through ``create_empty_array`` and Gymnasium's generic ``concatenate``).

Importing :mod:`dialogue_gym.spaces` registers these hooks.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from gymnasium.vector.utils import (
    create_empty_array,
    create_shared_memory,
    read_from_shared_memory,
    write_to_shared_memory,
)

from dialogue_gym.conversation import DialogueError

SLOT_BYTES = 1 << 20
"""Bytes per sub-env for one observation (1 MiB: about 250k characters of JSON-encoded conversation)."""
_HEADER = 8


def _slots(shared: Any, n: int) -> np.ndarray:
    return np.frombuffer(shared.get_obj(), dtype=np.uint8).reshape(n, SLOT_BYTES)


class SharedObservations(Sequence):
    """A live, read-only view of ``n`` JSON observations in shared memory (decoded on access)."""

    def __init__(self, shared: Any, n: int):
        self._shared = shared
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} sub-envs")
        slot = _slots(self._shared, self._n)[index]
        size = int(slot[:_HEADER].view(np.uint64)[0])
        return json.loads(slot[_HEADER:_HEADER + size].tobytes().decode("utf-8")) if size else []

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self._n))

    def __deepcopy__(self, memo: dict) -> tuple[Any, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return f"SharedObservations({list(self)!r})"


def _create(space: Any, n: int = 1, ctx: ModuleType = mp) -> Any:
    return ctx.Array("B", n * SLOT_BYTES)


def _read(space: Any, shared: Any, n: int = 1) -> SharedObservations:
    return SharedObservations(shared, n)


def _write(space: Any, index: int, value: Any, shared: Any) -> None:
    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
    if len(data) > SLOT_BYTES - _HEADER:
        raise DialogueError(
            f"observation of sub-env {index} is {len(data)} bytes as JSON; the async vector env's shared-memory slot "
            f"holds {SLOT_BYTES - _HEADER}. Pass vector_kwargs={{'shared_memory': False}} to gym.make_vec"
        )
    n = len(shared) // SLOT_BYTES
    slot = _slots(shared, n)[index]
    slot[_HEADER:_HEADER + len(data)] = np.frombuffer(data, dtype=np.uint8)
    slot[:_HEADER] = np.array([len(data)], dtype=np.uint64).view(np.uint8)


def _empty(space: Any, n: int = 1, fn: Any = np.zeros) -> tuple[Any, ...]:
    return tuple([] for _ in range(n))


def register(*spaces: type) -> None:
    """Register the hooks for these space classes (done for Conversation on import)."""
    for cls in spaces:
        create_shared_memory.register(cls)(_create)
        read_from_shared_memory.register(cls)(_read)
        write_to_shared_memory.register(cls)(_write)
        create_empty_array.register(cls)(_empty)
