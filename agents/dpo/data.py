"""Offline preference data: (context, chosen, rejected) records from a JSON-lines file or a hub data set.

The project's layout, one JSON object per line::

    {"context": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Name a prime."}],
     "chosen": "7 is prime.",
     "rejected": "8."}

``context`` is a multi-turn conversation (optionally opening with a system message) that ends with a user turn;
``chosen`` and ``rejected`` are two candidate assistant replies to it, the first preferred. Extra fields are
ignored. Three common public layouts are read too (hub data sets, or files in those layouts):

- ``{"prompt": str | [messages], "chosen": str, "rejected": str}`` (a string prompt is one user turn);
- ``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}`` (TRL conversational);
- ``{"chosen": dialogue, "rejected": dialogue}`` with whole dialogues that differ only in the final assistant
  reply, as message lists (``trl-internal-testing/hh-rlhf-trl-style``) or ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  text (``Anthropic/hh-rlhf``).

A malformed record is an error naming its line or row. Records whose two replies are equal (after stripping
whitespace) or empty, and whole-dialogue records whose contexts differ or are not a valid conversation (public
dialogue data has rows with empty or repeated turns), carry no usable preference: they are dropped and counted.

Tokens. The loss covers only the final assistant reply: a pair's prompt ids are the context rendered by the
policy's chat template with the generation prompt (:func:`dialogue_gym.generation.prompt_token_ids`, what the
policy sees when it samples), and each reply is the tokenised text followed by the end-of-turn (EOS) token, the
token that ends a sampled reply.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from agents.common.batching import Reply
from agents.common.config import ConfigError
from agents.common.preferences import Preference
from agents.common.train import Pair
from dialogue_gym.conversation import DialogueError, count_assistant_turns, validate_messages
from dialogue_gym.generation import prompt_token_ids

Message = dict[str, str]


def _messages(value: Any, where: str) -> list[Message]:
    try:
        return [dict(m) for m in validate_messages(value, where)]
    except DialogueError as e:
        raise ConfigError(str(e)) from None


def _dialogue(value: Any, where: str) -> list[Message]:
    """A whole dialogue given as a message list or as Anthropic hh-rlhf text."""
    if isinstance(value, str):
        from dialogue_gym.tasks.anthropic_hh import parse_hh_text

        try:
            return parse_hh_text(value)
        except DialogueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(value, list):
        return [{"role": str(m.get("role")), "content": str(m.get("content") or "").strip()}
                if isinstance(m, dict) else m for m in value]
    raise ConfigError(f"{where} must be a reply string or a dialogue (list of messages or hh-rlhf text), "
                      f"got {type(value).__name__}")


def parse_record(record: Any, where: str) -> Preference | str:
    """A :class:`Preference` from one record in any accepted layout, or the reason it is dropped.

    Raises:
        ConfigError: the record is not in any accepted layout (naming ``where`` and the field).
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ConfigError(f"{where} has no field {missing[0]!r} (fields: {sorted(record)}); expected "
                          "{\"context\": [messages ending with a user turn], \"chosen\": str, \"rejected\": str}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "context" in record or ("prompt" in record and isinstance(chosen, str) and isinstance(rejected, str)):
        key = "context" if "context" in record else "prompt"
        prompt = record[key]
        context = [{"role": "user", "content": prompt}] if key == "prompt" and isinstance(prompt, str) else prompt
        context = _messages(context, f"{where} field {key!r}")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise ConfigError(f"{where} field {name!r} must be a string (the assistant reply), "
                                  f"got {type(value).__name__}")
    else:
        c, r = _dialogue(chosen, f"{where} field 'chosen'"), _dialogue(rejected, f"{where} field 'rejected'")
        if isinstance(record.get("prompt"), list):  # TRL conversational: the prompt, then the completions
            prompt = _messages(record["prompt"], f"{where} field 'prompt'")
            c = c if c[: len(prompt)] == prompt else prompt + c
            r = r if r[: len(prompt)] == prompt else prompt + r
        for name, d in (("chosen", c), ("rejected", r)):
            if not d or d[-1].get("role") != "assistant":
                raise ConfigError(f"{where} field {name!r}: a dialogue must end with the assistant reply")
        if c[:-1] != r[:-1]:
            return "contexts_differ"
        try:
            context = _messages(c[:-1], f"{where} context")
        except ConfigError:  # public dialogue data has rows with empty or non-alternating turns
            return "bad_context"
        chosen, rejected = c[-1]["content"], r[-1]["content"]
    if context[-1]["role"] != "user":
        raise ConfigError(f"{where}: the context must end with a user turn (the replies answer it), "
                          f"got a {context[-1]['role']!r} turn")
    if not chosen.strip() or not rejected.strip():
        return "empty_reply"
    if chosen.strip() == rejected.strip():
        return "identical_replies"
    return Preference(context, chosen, rejected)


def read_jsonl(path: str | Path) -> list[Any]:
    """Records of a JSON-lines file (blank lines skipped).

    Raises:
        ConfigError: unreadable file or a line that is not JSON (naming the line).
    """
    records = []
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"data.path {str(path)!r} cannot be read: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((f"data.path line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.path line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
    return records


def read_hub(hub_id: str, split: str) -> list[Any]:
    """Rows of a hub data set, read with ``datasets`` (only when a hub id was named)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, missing split: all reported the same way
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"data.hub_id={hub_id!r} (split {split!r}) could not be loaded: {type(e).__name__}: "
                          f"{first[:300]}. Offline, use a local JSON-lines file: data.source=file data.path=FILE"
                          ) from None
    return [(f"data.hub_id row {i}", dict(r)) for i, r in enumerate(ds)]


def load_preferences(source: str, path: str | None, hub_id: str | None, split: str = "train",
                     max_pairs: int = 0, keep: tuple[str, ...] = ()) -> tuple[list[Preference], dict[str, int]]:
    """Parse every record of a file or hub data set; returns the preferences and the counts of dropped records.

    A record's string ``kind`` and ``row`` fields (files written by the reward-model trainer) become the
    preference's; otherwise its kind is ``"data"``. ``keep``: record fields copied, when present, into each
    preference's ``meta``.

    Raises:
        ConfigError: unreadable data, a malformed record, or no usable preference at all.
    """
    records = read_jsonl(path) if source == "file" else read_hub(str(hub_id), split)
    kept: list[Preference] = []
    dropped: Counter[str] = Counter()
    for where, rec in records:
        parsed = parse_record(rec, where)
        if isinstance(parsed, str):
            dropped[parsed] += 1
        else:
            if isinstance(rec, dict):
                parsed.meta = {k: rec[k] for k in keep if k in rec}
                for name in ("kind", "row"):
                    if isinstance(rec.get(name), str):
                        setattr(parsed, name, rec[name])
            kept.append(parsed)
        if max_pairs and len(kept) >= max_pairs:
            break
    if not kept:
        raise ConfigError(f"no usable preference pair in data.{'path' if source == 'file' else 'hub_id'} "
                          f"({len(records)} records; dropped: {dict(dropped) or 'none'})")
    return kept, dict(dropped)


def tokenize_pair(pref: Preference, tokenizer: Any) -> Pair:
    """A training pair (chosen = ``a``, rejected = ``b``) with token-exact prompt and reply ids (module docstring).

    Rewards are the preference labels (1 for chosen, 0 for rejected); ``turn`` is the reply's assistant turn.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the policy's tokenizer has no EOS token to end a reply with")
    prompt = prompt_token_ids(tokenizer, pref.context)

    def reply(text: str) -> Reply:
        return Reply(list(prompt), list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos], text)

    return Pair(reply(pref.chosen), reply(pref.rejected), 1.0, 0.0, count_assistant_turns(pref.context) + 1)
