"""The parts of the HTTP engine that need no connection: its error type, base-URL checks, a process-wide
tokenizer cache and small helpers for reading answers."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit


class ServerError(RuntimeError):
    """An OpenAI-compatible server failed or answered something unusable.

    Attributes:
        url: the server's base URL.
        model: the served model name.
        status: the last HTTP status, or None when there was no HTTP answer (refused, timed out, bad body).
    """

    def __init__(self, message: str, url: str, model: str, status: int | None = None):
        super().__init__(message)
        self.url, self.model, self.status = url, model, status


_tokenizers: dict[str, Any] = {}
_tokenizers_lock = threading.Lock()


def tokenizer_for(model: str) -> Any:
    """The tokenizer of ``model``, loaded once per process (engines on several servers of one model share it)."""
    from dialogue_gym.models import load_tokenizer

    with _tokenizers_lock:
        if model not in _tokenizers:
            _tokenizers[model] = load_tokenizer(model)
        return _tokenizers[model]


def check_base_url(base_url: Any) -> str:
    """A base URL as ``http(s)://host[:port]/path`` without a trailing slash; credentials in it are refused
    (they would end up in configs and fingerprints: put the key in the environment variable)."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError(f"base_url must be the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1, got "
                         f"{base_url!r}")
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url is {base_url!r}; expected http(s)://HOST[:PORT]/v1")
    if parts.username or parts.password or parts.query:
        raise ValueError("base_url must not carry credentials or a query string; put the API key in the "
                         "environment variable named by api_key_env")
    return base_url.strip().rstrip("/")


def retry_after(r: Any) -> float | None:
    """Seconds from an answer's ``Retry-After`` header (the number form), or None."""
    try:
        return float(r.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def snippet(text: str, n: int = 200) -> str:
    """The start of an answer body on one line, for error messages."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
