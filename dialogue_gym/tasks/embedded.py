"""The embedded task: opening user prompts written for this project, with a fixed train/test split."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from dialogue_gym.conversation import validate_messages
from dialogue_gym.tasks.base import SPLITS, TaskRow

DATA_FILE = "embedded_prompts.jsonl"


class EmbeddedTask:
    """Open-ended opening prompts (coding, math, explanation, advice, writing, ...) shipped with the package.

    Each line of ``tasks/data/embedded_prompts.jsonl`` is ``{"id", "category", "split", "prompt"}``; the split is
    fixed in the file, so it never changes between runs or machines. The simulated user is the LLM user and the
    reward is the LLM judge.
    """

    name = "embedded"
    default_user = "llm"
    default_reward = "judge"

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt
        text = resources.files("dialogue_gym.tasks").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
        self._rows: dict[str, list[TaskRow]] = {s: [] for s in SPLITS}
        for line in text.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            messages = [{"role": "user", "content": rec["prompt"]}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            validate_messages(messages)
            self._rows[rec["split"]].append(
                TaskRow(id=rec["id"], messages=messages, profile={"category": rec["category"]})
            )

    def rows(self, split: str = "train") -> list[TaskRow]:
        if split not in SPLITS:
            raise ValueError(f"split is {split!r}; allowed: {', '.join(SPLITS)}")
        return self._rows[split]

    def make_user(self, spec: str, engine: Any) -> None:
        return None

    def make_reward(self, spec: str) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "data": DATA_FILE, "system_prompt": self.system_prompt,
                "rows": {s: len(r) for s, r in self._rows.items()}}
