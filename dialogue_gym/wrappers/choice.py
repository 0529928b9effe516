"""Candidate choice: each turn a frozen engine proposes K replies and the agent picks one (as text games let an
agent choose among admissible commands).

Observation (one sub-env): ``Box(-FEATURE_BOUND, FEATURE_BOUND, ((K + 1) * (D + 3),), float32)``, a flat
vector (what Stable-Baselines3's MLP policies expect) that reshapes to (K + 1, D + 3), values clipped to the
bound. Row 0 describes the conversation: the frozen model's mean-pooled last hidden state (D values) over the
conversation's last ``max_context_tokens`` tokens (chat template applied), then the turn as a share of
``max_turns``, the context length as a share of ``max_context_tokens``, and 0. Row k (1..K) describes candidate
k - 1: the mean-pooled hidden state of its own tokens, its mean sampled log-probability per token, its length as
a share of ``max_new_tokens``, and 1 when it ended on a stop token (0 when cut). A row whose episode ended shows
its final conversation in row 0 and zeros for the candidates.

Action: ``Discrete(K)``, the candidate to send as the assistant's message. The step is one dialogue turn: one
batched user call and one batched reward call for every row, then one batched generate call (N x K prompts,
each with its own seed drawn from the row's stream, so row i equals a single env seeded with seed + i) and one
batched forward for the features. A blank candidate, if chosen, ends the episode with ``blank_reward``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from dialogue_gym.conversation import DialogueError
from dialogue_gym.generation import SamplingParams, prompt_token_ids
from dialogue_gym.wrappers.base import BatchedWrapper, Conversation, SingleEnv, make_dialogue_vec

EXTRA_FEATURES = 3
FEATURE_BOUND = 1e4


class CandidateChoice(BatchedWrapper):
    """N dialogues where the action picks one of K candidate replies from a frozen engine.

    Args:
        venv: the native vector env (autoreset disabled).
        engine: the frozen generation engine (an :class:`~dialogue_gym.generation.hf.HFEngine`: its model also
            computes the features), or a model name for one (``"embedded"``, ``"tiny"``, a path).
        k: candidates per turn.
        temperature: candidates' sampling temperature.
        top_p: candidates' nucleus mass.
        max_new_tokens: candidates' length cap in tokens.
        max_context_tokens: the conversation's features read its last this many tokens.
        blank_reward: reward when the chosen candidate is blank (the episode ends).
    """

    def __init__(self, venv: Any, engine: Any = "embedded", k: int = 4, temperature: float = 0.7,
                 top_p: float = 1.0, max_new_tokens: int = 48, max_context_tokens: int = 256,
                 blank_reward: float = -1.0):
        super().__init__(venv, blank_reward)
        if isinstance(engine, str):
            from dialogue_gym.generation.hf import HFEngine

            engine = HFEngine(engine)
        for name, v in (("k", k), ("max_context_tokens", max_context_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DialogueError(f"{name} must be a positive integer, got {v!r}")
        self.engine, self.k, self.max_context_tokens = engine, k, max_context_tokens
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.model, self.tokenizer = engine.model, engine.tokenizer
        self.hidden = int(self.model.config.hidden_size)
        self.max_turns = venv.core.config.max_turns
        self.feature_shape = (k + 1, self.hidden + EXTRA_FEATURES)
        self.observation_space = spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (int(np.prod(self.feature_shape)),),
                                            dtype=np.float32)
        self.action_space = spaces.Discrete(k)
        self.candidates: list[list[Any]] = [[] for _ in range(self.num_envs)]  # Generation objects per row
        self._stale = np.zeros(self.num_envs, dtype=bool)
        self._features = np.zeros((self.num_envs, *self.feature_shape), dtype=np.float32)
        self.generate_calls = 0  # batched generate calls (one per step at most)

    def _begin(self, rows: np.ndarray) -> None:
        self._stale[rows] = True

    def _texts(self, actions: np.ndarray) -> list[str | None]:
        out: list[str | None] = [None] * self.num_envs
        for i in np.flatnonzero(~self.done):
            a = int(actions[i])
            if not 0 <= a < self.k:
                raise DialogueError(f"actions[{i}] is {a}; a candidate index in [0, {self.k - 1}] is allowed")
            out[i] = self.candidates[i][a].text.strip()
        return out

    def candidate_texts(self, row: int) -> list[str]:
        """The K candidate replies row ``row`` is choosing among now."""
        return [g.text for g in self.candidates[row]]

    def _observe(self, terminal: dict[int, Conversation]) -> tuple[np.ndarray, dict[int, Any]]:
        rows = [int(i) for i in np.flatnonzero(self._stale & ~self.done)]
        if rows:  # one batched generate call for every row that needs new candidates
            prompts, seeds = [], []
            for i in rows:
                prompts += [self.conversations[i]] * self.k
                seeds += [int(s) for s in self.rngs[i].integers(0, 2**63 - 1, size=self.k)]
            gens = self.engine.generate(prompts, self.params, seeds=seeds, return_logprobs=True)
            self.generate_calls += 1
            for j, i in enumerate(rows):
                self.candidates[i] = gens[j * self.k:(j + 1) * self.k]
        ended = [int(i) for i in np.flatnonzero(self.done)]
        # one batched forward: contexts of new rows, ended rows and terminal conversations, and new candidates
        contexts = [self.conversations[i] for i in rows + ended] + list(terminal.values())
        texts = [g.token_ids for i in rows for g in self.candidates[i]]
        pooled = self._pooled([self._context_ids(c) for c in contexts] + texts)
        for j, i in enumerate(rows):
            self._features[i] = 0.0
            self._features[i, 0] = self._context_row(pooled[j], self.conversations[i])
            for c, g in enumerate(self.candidates[i]):
                self._features[i, c + 1] = self._candidate_row(pooled[len(contexts) + j * self.k + c], g)
        for j, i in enumerate(ended):
            self._features[i] = 0.0
            self._features[i, 0] = self._context_row(pooled[len(rows) + j], self.conversations[i])
        self._stale[rows] = False
        final = {}
        for j, (i, conv) in enumerate(terminal.items()):
            f = np.zeros(self.feature_shape, dtype=np.float32)
            f[0] = self._context_row(pooled[len(rows) + len(ended) + j], conv)
            final[i] = np.clip(f.reshape(-1), -FEATURE_BOUND, FEATURE_BOUND)
        obs = np.clip(self._features.reshape(self.num_envs, -1), -FEATURE_BOUND, FEATURE_BOUND)
        return obs, final

    def _context_ids(self, conversation: Conversation) -> list[int]:
        return prompt_token_ids(self.tokenizer, conversation)[-self.max_context_tokens:]

    def _context_row(self, pooled: np.ndarray, conversation: Conversation) -> np.ndarray:
        turns = sum(1 for m in conversation if m["role"] == "assistant")
        n = min(len(prompt_token_ids(self.tokenizer, conversation)), self.max_context_tokens)
        return np.concatenate([pooled, [turns / self.max_turns, n / self.max_context_tokens, 0.0]])

    def _candidate_row(self, pooled: np.ndarray, g: Any) -> np.ndarray:
        logps = g.logprobs or []
        mean_logp = float(np.mean(logps)) if logps else 0.0
        return np.concatenate([pooled, [mean_logp, len(g.token_ids) / self.params.max_new_tokens,
                                        float(g.finished)]])

    @torch.inference_mode()
    def _pooled(self, sequences: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Mean-pooled last hidden states, (len(sequences), D); an empty sequence gives zeros."""
        out = np.zeros((len(sequences), self.hidden), dtype=np.float32)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted((i for i, s in enumerate(sequences) if s), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)  # (B, T)
            mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
            for r, i in enumerate(chunk):
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long, device=device)
                mask[r, : len(sequences[i])] = 1
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)  # (B, D)
            out[chunk] = pooled.float().cpu().numpy()
        return out


class ChoiceEnv(SingleEnv):
    """One dialogue where the action picks one of K candidate replies (see :class:`CandidateChoice`).

    ``ChoiceEnv(engine="tiny", k=4, task="arithmetic")``: wrapper arguments first, every other keyword goes to
    the dialogue env (:class:`~dialogue_gym.core.EnvConfig`).
    """

    def __init__(self, engine: Any = "embedded", k: int = 4, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 48, max_context_tokens: int = 256, blank_reward: float = -1.0,
                 render_mode: str | None = None, **env_kwargs: Any):
        batched = CandidateChoice(make_dialogue_vec(1, **env_kwargs), engine, k, temperature, top_p, max_new_tokens,
                                  max_context_tokens, blank_reward)
        super().__init__(batched, render_mode)
