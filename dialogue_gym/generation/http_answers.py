"""Reading an OpenAI-compatible server's answers: every field the HTTP engine uses is checked here, once, for both
APIs (``/v1/completions`` and ``/v1/chat/completions``), before anything else touches it.

Why one place: the engine used to read fields where it needed them, and each reader trusted what it got. A token id
past the vocabulary decoded to ``''`` (the user turn silently became a fallback question), a negative one raised
``OverflowError`` inside the tokenizer, a NaN judge log-prob counted as probability 0, and a ``null`` one raised a
``TypeError`` that callers catching :class:`~dialogue_gym.generation.http_common.ServerError` missed. Here each
reader returns plain, checked Python values or raises :class:`AnswerError` whose message starts with the field
(``choices[0].token_ids[3] is -5; ...``); the engine turns that into a ``ServerError`` naming the server and model.

Rules, per field:

- ``choices``: a list of exactly one object (the engine always asks for ``n=1``).
- token ids (``token_ids``, ``prompt_token_ids``, ``token_id:N`` keys): integers in ``[0, vocab_size)`` where
  ``vocab_size`` is ``len(tokenizer)``, the ids the tokenizer can decode. At most ``max_tokens`` sampled ids (and
  ``usage.completion_tokens`` at most ``max_tokens`` where a chat server reports it).
- log-probs: JSON numbers (not ``null``, strings or booleans), not NaN, at most :data:`LOGPROB_SLACK` (a log-prob
  is <= 0; the slack absorbs float rounding of a certain token). A sampled token's log-prob must be finite; a
  judge candidate's may be ``-inf`` (vLLM sends it as ``-9999``; JSON's ``-Infinity`` is read the same way).
- ``finish_reason``: a string or ``null``; ``message.content``: a string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LOGPROB_SLACK = 1e-3  # largest log-prob accepted (rounding of log(1) on the server)
NEG_INF_SENTINEL = -9999.0  # vLLM's JSON stand-in for -inf


class AnswerError(ValueError):
    """An answer field the engine cannot use; the message starts with the field's path."""


@dataclass(frozen=True)
class GenerationAnswer:
    """The checked parts of one generation answer.

    Attributes:
        token_ids: the sampled ids (``api="completions"``), or None (``api="chat"``: the text is re-tokenised).
        text: the returned text (``api="chat"``), or None (``api="completions"``: decoded from the ids).
        finished: the server stopped on a stop condition (``finish_reason == "stop"``).
        logprobs: one finite log-prob per sampled id, when asked for.
    """

    token_ids: list[int] | None
    text: str | None
    finished: bool
    logprobs: list[float] | None


def read_models(data: Any) -> list[str]:
    """The served model names of a ``GET /models`` answer."""
    entries = _get(data, "", "data")
    if not isinstance(entries, list):
        raise AnswerError(f"data is {_show(entries)}, not a list of models")
    return [str(_get(e, f"data[{i}]", "id")) for i, e in enumerate(entries)]


def read_generation(data: Any, *, api: str, vocab_size: int, max_tokens: int, sent_ids: list[int],
                    want_logprobs: bool) -> GenerationAnswer:
    """Check a generation answer of either API.

    Args:
        data: the decoded JSON body.
        api: ``"completions"`` or ``"chat"``.
        vocab_size: token ids must be below this (``len(tokenizer)``).
        max_tokens: the ``max_tokens`` the request asked for.
        sent_ids: the prompt ids sent (``api="completions"``): an echo must equal them.
        want_logprobs: the request asked for sampled log-probs (``api="completions"`` only).

    Raises:
        AnswerError: naming the first unusable field.
    """
    choice = _one_choice(data)
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise AnswerError(f"choices[0].finish_reason is {_show(finish)}; expected a string or null")
    if api == "chat":
        text = _get(_get(choice, "choices[0]", "message"), "choices[0].message", "content")
        if not isinstance(text, str):
            raise AnswerError(f"choices[0].message.content is {_show(text)}, not a string")
        usage = data.get("usage")
        used = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if used is not None and (isinstance(used, bool) or not isinstance(used, int) or not 0 <= used <= max_tokens):
            raise AnswerError(f"usage.completion_tokens is {_show(used)}; max_tokens was {max_tokens}")
        return GenerationAnswer(token_ids=None, text=text, finished=finish == "stop", logprobs=None)
    toks = _token_ids(_get(choice, "choices[0]", "token_ids",
                           hint="token_ids is returned by vLLM's server (return_token_ids); for other servers use "
                                "api='chat'"), "choices[0].token_ids", vocab_size)
    if len(toks) > max_tokens:
        raise AnswerError(f"choices[0].token_ids has {len(toks)} ids; max_tokens was {max_tokens}")
    seen = choice.get("prompt_token_ids")
    if seen is not None and _token_ids(seen, "choices[0].prompt_token_ids", vocab_size) != sent_ids:
        raise AnswerError(f"choices[0].prompt_token_ids: the server used {len(seen)} prompt token ids that differ "
                          f"from the {len(sent_ids)} sent")
    logprobs = None
    if want_logprobs:
        lp = _get(choice, "choices[0]", "logprobs")
        tokens = _get(lp, "choices[0].logprobs", "tokens")
        values = _get(lp, "choices[0].logprobs", "token_logprobs")
        if tokens != [f"token_id:{t}" for t in toks]:  # the ids are checked: comparing the strings is enough
            raise AnswerError(f"choices[0].logprobs.tokens: {_show(tokens)} do not match choices[0].token_ids")
        if not isinstance(values, list) or len(values) != len(toks):
            raise AnswerError(f"choices[0].logprobs.token_logprobs is {_show(values)}; expected a list of "
                              f"{len(toks)} log-probs, one per token id")
        if all(type(v) is float and NEG_INF_SENTINEL < v <= LOGPROB_SLACK for v in values):  # (NaN fails)
            logprobs = list(values)  # the common case in one pass; else find the first bad value for the message
        else:
            logprobs = [_logprob(v, f"choices[0].logprobs.token_logprobs[{i}]", finite=True)
                        for i, v in enumerate(values)]
    return GenerationAnswer(token_ids=toks, text=None, finished=finish == "stop", logprobs=logprobs)


def read_candidate_logprobs(data: Any, *, api: str, candidates: list[int], candidate_texts: list[str],
                            vocab_size: int) -> list[float]:
    """Check a judge answer (one token, with log-probs) and read the candidates' log-probs.

    ``api="completions"``: the first token's ``top_logprobs`` object, keyed ``token_id:N`` (vLLM's
    ``logprob_token_ids`` puts every candidate there). ``api="chat"``: the first token's ``top_logprobs`` list of
    ``{"token", "logprob"}``, matched by the candidates' decoded text; a candidate not listed gets ``-inf``.

    Returns:
        One log-prob per candidate (``-inf`` for probability 0).

    Raises:
        AnswerError: naming the first unusable field, or (completions) a candidate without a log-prob.
    """
    choice = _one_choice(data)
    lp = _get(choice, "choices[0]", "logprobs")
    if api == "chat":
        content = _get(lp, "choices[0].logprobs", "content")
        if not isinstance(content, list) or not content:
            raise AnswerError(f"choices[0].logprobs.content is {_show(content)}; expected the first token's entry")
        where = "choices[0].logprobs.content[0]"
        top = _get(content[0], where, "top_logprobs")
        if not isinstance(top, list) or not top:
            raise AnswerError(f"{where}.top_logprobs is {_show(top)}, not a non-empty list")
        got: dict[str, float] = {}
        for i, entry in enumerate(top):
            token = _get(entry, f"{where}.top_logprobs[{i}]", "token")
            if not isinstance(token, str):
                raise AnswerError(f"{where}.top_logprobs[{i}].token is {_show(token)}, not a string")
            value = _logprob(_get(entry, f"{where}.top_logprobs[{i}]", "logprob"),
                             f"{where}.top_logprobs[{i}].logprob", finite=False)
            got.setdefault(token, value)
        return [got.get(t, -math.inf) for t in candidate_texts]
    top = _get(lp, "choices[0].logprobs", "top_logprobs")
    if not isinstance(top, list) or not top:
        raise AnswerError(f"choices[0].logprobs.top_logprobs is {_show(top)}; expected the first token's log-probs")
    if not isinstance(top[0], dict):
        raise AnswerError(f"choices[0].logprobs.top_logprobs[0] is {_show(top[0])}, not an object")
    where = "choices[0].logprobs.top_logprobs[0]"
    ids = {_token_key(k, where, vocab_size): _logprob(v, f"{where}[{k!r}]", finite=False)
           for k, v in top[0].items()}
    missing = [c for c in candidates if c not in ids]
    if missing:
        raise AnswerError(f"{where}: no log-prob for token ids {missing}: the server ignored logprob_token_ids (a "
                          "vLLM extension); for other servers use api='chat'")
    return [ids[c] for c in candidates]


# ---- field checks ------------------------------------------------------------------------------------------------

def _one_choice(data: Any) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        n = len(choices) if isinstance(choices, list) else "no"
        raise AnswerError(f"choices: the answer has {n} choices; one was asked for (n=1)")
    return choices[0]


def _get(obj: Any, where: str, key: str, hint: str = "") -> Any:
    if not isinstance(obj, dict):
        raise AnswerError(f"{where or 'the answer'} is {_show(obj)}, not an object")
    if key not in obj:
        raise AnswerError(f"{where or 'the answer'} lacks {key}" + (f" ({hint})" if hint else ""))
    return obj[key]


def _token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list):
        raise AnswerError(f"{field} is {_show(value)}, not a list of token ids")
    if all(type(t) is int for t in value) and (not value or 0 <= min(value) and max(value) < vocab_size):
        return list(value)  # the common case at C speed; else find the first bad id for the message
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise AnswerError(f"{field}[{i}] is {_show(t)}; token ids must be integers in [0, {vocab_size}), the "
                              "tokenizer's vocabulary")
    return list(value)


def _token_key(key: str, field: str, vocab_size: int) -> int:
    """The id of a ``token_id:N`` key of a top-log-probs object (``return_tokens_as_token_ids``)."""
    text = key[9:] if key.startswith("token_id:") else ""
    if not text.isdigit() or not int(text) < vocab_size:
        raise AnswerError(f"{field} has key {_show(key)}; expected 'token_id:N' with N in [0, {vocab_size}) "
                          "(return_tokens_as_token_ids)")
    return int(text)


def _logprob(value: Any, field: str, *, finite: bool) -> float:
    """A log-prob: a number, not NaN, <= LOGPROB_SLACK; -inf (or vLLM's -9999) only where ``finite`` is False."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value) and \
        value <= LOGPROB_SLACK
    zero_prob = ok and value <= NEG_INF_SENTINEL
    if not ok or (zero_prob and finite):
        rule = "a finite number <= 0" if finite else "a number <= 0 (or -inf)"
        raise AnswerError(f"{field} is {_show(value)}; a log-prob must be {rule}")
    return -math.inf if zero_prob else float(value)


def _show(value: Any, n: int = 60) -> str:
    """A short repr for messages (answers can be megabytes)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."
