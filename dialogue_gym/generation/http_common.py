"""The parts of the HTTP engine that need no connection: its error type and the one function that formats its
messages (with redaction), base-URL checks, the retry-wait rule, a process-wide tokenizer cache."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

# What redaction hides: the userinfo of a URL (``user:password@``; also catches the local part of an e-mail
# address, which an error message can do without) and the token after ``Bearer``.
_USERINFO = re.compile(r"[^\s/@'\"<>]{1,256}@")  # bounded: linear time on a long body without "@"
QUOTED_BODY_CHARS = 200  # how much of an answer body a message quotes
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;}]+")


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


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each of ``secrets`` (e.g. the API key), any ``Bearer`` token and any URL userinfo
    (``user:password@``) replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _USERINFO.sub("***@", _BEARER.sub(r"\1 ***", text))


def server_error(what: str, url: str, model: str, status: int | None = None, body: str | None = None,
                 secrets: Iterable[str | None] = ()) -> ServerError:
    """The :class:`ServerError` for ``what`` happening at server ``url`` serving ``model``; every message of the
    HTTP engine is made here, so every one is redacted (:func:`redact`).

    Args:
        what: what went wrong.
        status: the HTTP status, when there was an answer.
        body: the answer's body, quoted on one line; redacted before it is cut to 200 characters, so a secret
            across the cut cannot leave its first half behind.
        secrets: strings that must never appear (the API key, read from its variable by the caller).
    """
    secrets = list(secrets)
    if body is not None:  # on one line, a generous head redacted (a secret across the cut is whole), then cut
        flat = " ".join(body.split())
        what = f"{what}: {snippet(redact(flat[:QUOTED_BODY_CHARS + 8192], secrets), QUOTED_BODY_CHARS)}"
    where = f"server {url}, model {model!r}" + (f", HTTP status {status}" if status else "")
    return ServerError(redact(f"{what} [{where}]", secrets), url, model, status)


def retry_wait(attempt: int, backoff_s: float, retry_after_s: float | None, jitter: float, cap_s: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...).

    Exponential backoff (``backoff_s * 2 ** (attempt - 1)``), or the server's ``Retry-After`` when that is
    longer, plus up to 10% jitter (``jitter`` in [0, 1), so concurrent rows do not retry in lockstep); the
    total, jitter included, never exceeds ``cap_s``.
    """
    wait = backoff_s * 2.0 ** min(attempt - 1, 60)
    if retry_after_s is not None and math.isfinite(retry_after_s):
        wait = max(wait, retry_after_s)
    return min(wait * (1.0 + 0.1 * jitter), cap_s)


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
    (they would end up in configs and fingerprints: put the key in the environment variable), and the messages
    never repeat them (:func:`redact`)."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError(f"base_url must be the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1, got "
                         f"{redact(repr(base_url))}")
    shown = redact(repr(base_url.strip()))
    try:
        parts = urlsplit(base_url.strip())
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in 0-65535)
    except ValueError as e:
        raise ValueError(redact(f"base_url is {shown}: {e}; expected http(s)://HOST[:PORT]/v1 with PORT a number "
                                "in 0-65535")) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url is {shown}; expected http(s)://HOST[:PORT]/v1")
    if parts.username or parts.password or parts.query:
        raise ValueError("base_url must not carry credentials or a query string; put the API key in the "
                         "environment variable named by api_key_env")
    return base_url.strip().rstrip("/")


def retry_after(r: Any) -> float | None:
    """Seconds from an answer's ``Retry-After`` header (the number form), or None (absent, a date, negative or
    not finite)."""
    try:
        value = float(r.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def snippet(text: str, n: int = 200) -> str:
    """The start of an answer body on one line, for error messages."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
