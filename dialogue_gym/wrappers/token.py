"""Token-level dialogue: one step is one token of the assistant's reply (RL4LMs' formulation).

Observation (one sub-env): ``{"tokens": Box(0, vocab - 1, (window,), int64), "length": Box(0, window, (1,),
int64)}``, the last ``window`` token ids of the conversation rendered with the tokenizer's chat template (the
assistant's generation prompt added), followed by the reply's tokens so far; positions from ``length`` on hold
the pad id. User tokens appear in observations, never as actions.

Action: ``Discrete(vocab)``, the next token of the reply. The end-of-turn token (the tokenizer's EOS,
``<|im_end|>`` for ChatML models) ends the assistant message; so does reaching ``max_reply_tokens``. The message
(decoded without special tokens) then goes to the dialogue env: the simulated user answers and the reward model
scores it, so the step that ends a turn carries the turn's reward and every other step 0.

At each turn boundary the observation is the whole conversation rendered again with the chat template (the
reply's text re-tokenised), as a policy that reads the conversation would see it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from dialogue_gym.conversation import DialogueError
from dialogue_gym.wrappers.base import BatchedWrapper, Conversation, SingleEnv, make_dialogue_vec


class TokenLevel(BatchedWrapper):
    """N dialogues stepped one token at a time.

    Args:
        venv: the native vector env (autoreset disabled).
        tokenizer: the policy's tokenizer (with a chat template), or a model name for
            :func:`dialogue_gym.models.load_tokenizer` (``"tiny"`` and ``"embedded"`` share SmolLM2's).
        window: observation length in tokens (the conversation's last ``window`` tokens).
        max_reply_tokens: a reply that reaches this many tokens ends the turn.
        end_token_id: the end-of-turn token; default the tokenizer's EOS.
        blank_reward: reward when a reply decodes to blank text (the episode ends).
    """

    def __init__(self, venv: Any, tokenizer: Any = "tiny", window: int = 256, max_reply_tokens: int = 64,
                 end_token_id: int | None = None, blank_reward: float = -1.0):
        super().__init__(venv, blank_reward)
        if isinstance(tokenizer, str):
            from dialogue_gym.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        for name, v in (("window", window), ("max_reply_tokens", max_reply_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DialogueError(f"{name} must be a positive integer, got {v!r}")
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.window, self.max_reply_tokens = window, max_reply_tokens
        self.end_token_id = tokenizer.eos_token_id if end_token_id is None else int(end_token_id)
        if self.end_token_id is None or not 0 <= self.end_token_id < self.vocab:
            raise DialogueError(f"end_token_id must be a token id in [0, {self.vocab - 1}], got {self.end_token_id!r}")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.observation_space = spaces.Dict({
            "tokens": spaces.Box(0, self.vocab - 1, (window,), dtype=np.int64),
            "length": spaces.Box(0, window, (1,), dtype=np.int64),
        })
        self.action_space = spaces.Discrete(self.vocab)
        self.prompts: list[list[int]] = [[] for _ in range(self.num_envs)]  # rendered conversation + gen prompt
        self.replies: list[list[int]] = [[] for _ in range(self.num_envs)]  # this turn's tokens so far

    def render_ids(self, conversation: Conversation, generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation under the chat template."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _begin(self, rows: np.ndarray) -> None:
        for i in rows:
            self.prompts[i] = self.render_ids(self.conversations[i])
            self.replies[i] = []

    def _texts(self, actions: np.ndarray) -> list[str | None]:
        out: list[str | None] = [None] * self.num_envs
        for i in np.flatnonzero(~self.done):
            token = int(actions[i])
            if not 0 <= token < self.vocab:
                raise DialogueError(f"actions[{i}] is {token}; a token id in [0, {self.vocab - 1}] is allowed")
            if token == self.end_token_id:
                out[i] = self.tokenizer.decode(self.replies[i], skip_special_tokens=True).strip()
                continue
            self.replies[i].append(token)
            if len(self.replies[i]) >= self.max_reply_tokens:
                out[i] = self.tokenizer.decode(self.replies[i], skip_special_tokens=True).strip()
        return out

    def _ids_obs(self, ids: list[int]) -> tuple[np.ndarray, int]:
        ids = ids[-self.window:]
        tokens = np.full(self.window, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        return tokens, len(ids)

    def _observe(self, terminal: dict[int, Conversation]) -> tuple[dict[str, np.ndarray], dict[int, Any]]:
        tokens = np.zeros((self.num_envs, self.window), dtype=np.int64)
        length = np.zeros((self.num_envs, 1), dtype=np.int64)
        for i in range(self.num_envs):
            if self.done[i]:  # an ended row shows its final conversation
                tokens[i], length[i, 0] = self._ids_obs(self.render_ids(self.conversations[i], False))
            else:
                tokens[i], length[i, 0] = self._ids_obs(self.prompts[i] + self.replies[i])
        final = {}
        for i, conv in terminal.items():
            t, n = self._ids_obs(self.render_ids(conv, False))
            final[i] = {"tokens": t, "length": np.array([n], dtype=np.int64)}
        return {"tokens": tokens, "length": length}, final


class TokenEnv(SingleEnv):
    """One dialogue stepped one token at a time (see :class:`TokenLevel` for the arguments).

    ``TokenEnv(tokenizer="tiny", window=128, max_reply_tokens=32, task="arithmetic")``: wrapper arguments first,
    every other keyword goes to the dialogue env (:class:`~dialogue_gym.core.EnvConfig`).
    """

    def __init__(self, tokenizer: Any = "tiny", window: int = 256, max_reply_tokens: int = 64,
                 end_token_id: int | None = None, blank_reward: float = -1.0, render_mode: str | None = None,
                 **env_kwargs: Any):
        batched = TokenLevel(make_dialogue_vec(1, **env_kwargs), tokenizer, window, max_reply_tokens, end_token_id,
                             blank_reward)
        super().__init__(batched, render_mode)
