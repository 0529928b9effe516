"""TRL's ``GRPOTrainer`` on dialogue-gym: a ``rollout_func`` that plays whole multi-turn dialogues against the env.

    from trl import GRPOConfig, GRPOTrainer
    from dialogue_gym.integrations.trl import DialogueRollout

    rollout = DialogueRollout({"task": "clarify", "max_turns": 3})      # or base_url="http://127.0.0.1:8000"
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=GRPOConfig(...),
                          train_dataset=rollout.dataset(), reward_funcs=rollout.reward, rollout_func=rollout)

Why ``rollout_func`` and not ``environment_factory``: TRL 1.16's ``environment_factory`` exposes an environment's
methods as *tools* that the model calls inside its completion; in a dialogue the action is the model's plain reply
and the simulated user answers every reply, which is a rollout, not a tool call.

What one call does (``prompts``: the batch TRL hands over, each prompt already repeated ``num_generations`` times):
1. each prompt is mapped back to its task row (the rows :meth:`DialogueRollout.dataset` put in the dataset; any
   other conversation starts as a message prefix) and every dialogue is reset with its own seed;
2. turn by turn, the policy (``trainer.model``) samples a reply for every unfinished dialogue (one batched
   ``generate``, at ``args.temperature``, at most ``max_new_tokens`` tokens), the env steps them all (in process: one
   :class:`~dialogue_gym.vector.DialogueVectorEnv`, one user call and one reward call; remote: one OpenEnv session
   per dialogue, stepped concurrently so the server batches them);
3. a dialogue's ``completion_ids`` is every token after the opening prompt: the policy's reply tokens
   (``env_mask`` 1, with their sampling log-probs) and, between them, the user's turns as the chat template
   renders them (``env_mask`` 0, log-prob 0), so the loss sees the whole context and trains only the replies;
4. ``env_reward`` is the episode's return (the sum of the env's rewards; with ``reward_mode: terminal`` the final
   score); :meth:`DialogueRollout.reward` hands it to GRPO as the reward function.

Deviations and limits:
1. A reply that decodes to blank text is not sent (the env refuses blank messages); its dialogue ends there with
   the return collected so far (counted in :attr:`DialogueRollout.stats` as ``blank_replies``).
2. A reply cut at ``max_new_tokens`` without an end-of-turn token gets one appended, masked out (``env_mask`` 0), so
   the next user turn starts a well-formed chat turn.
3. GRPOConfig's ``max_completion_length`` does not cap a dialogue: the cap is ``max_turns * max_new_tokens``
   policy tokens plus the user's turns.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.conversation import DialogueError
from dialogue_gym.integrations import INSTALL_HINT

try:
    import datasets
    import trl  # noqa: F401  (the rollout is for trl's GRPOTrainer; fail here, with the install line, without it)
except ImportError as e:  # pragma: no cover - exercised by a subprocess test without the package
    raise ImportError(f"dialogue_gym.integrations.trl needs TRL (the `trl` package): {INSTALL_HINT}") from e

__all__ = ["DialogueRollout", "chat_glue"]


def _task_rows(env_kwargs: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The configured task and its split's rows, from the task alone (the configuration checked as the env does)."""
    from dialogue_gym.env import make_config
    from dialogue_gym.tasks import build_task

    config = make_config(dict(env_kwargs))
    config.validate()
    task = build_task(config.task, **config.task_kwargs)
    rows = list(task.rows(config.split))
    if not rows:
        raise DialogueError(f"task {config.task!r} has no rows in split {config.split!r}")
    return task, rows


def _key(messages: Sequence[Mapping[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages])


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_glue(tokenizer: Any, before: Sequence[Mapping[str, str]], user: str) -> str:
    """The text the chat template puts between an assistant reply's end-of-turn token and the next reply.

    Args:
        before: the conversation up to and including the assistant reply.
        user: the user's next message.

    Returns:
        e.g. ``"\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n"`` for ChatML templates.

    Raises:
        DialogueError: the template does not render a conversation as a prefix of its continuation.
    """
    eos = tokenizer.eos_token
    closed = _render(tokenizer, before, False)
    full = _render(tokenizer, [*before, {"role": "user", "content": user}], True)
    if not full.startswith(closed):
        raise DialogueError("the tokenizer's chat template does not render a conversation as a prefix of its "
                            "continuation; multi-turn token ids need a template that does (ChatML, Llama, ...)")
    reply_end = closed.rfind(before[-1]["content"] + eos) if eos else -1
    if reply_end < 0:
        raise DialogueError(f"the chat template does not end an assistant turn with the tokenizer's eos token "
                            f"{eos!r}; set tokenizer.eos_token to the template's end-of-turn token")
    return closed[reply_end + len(before[-1]["content"]) + len(eos):] + full[len(closed):]


class _Local:
    """Dialogues in process: one vector env per batch size (they share the engines through the model cache)."""

    def __init__(self, env_kwargs: Mapping[str, Any]):
        from gymnasium.vector import AutoresetMode

        from dialogue_gym.vector import DialogueVectorEnv

        self._make = lambda n: DialogueVectorEnv(n, autoreset_mode=AutoresetMode.DISABLED, **env_kwargs)
        self._envs: dict[int, Any] = {}
        self.env: Any = None

    def start(self, starts: list[dict[str, Any]], seed: int) -> list[list[dict[str, str]]]:
        n = len(starts)
        if n == 0:
            return []
        if n not in self._envs:  # one env per batch size, built once (task rows, user and reward with it)
            self._envs[n] = self._make(n)
        self.env = self._envs[n]
        rows = np.array(["task_index" in s for s in starts])
        # task rows and free-form prefixes may share a batch: each kind resets its own sub-envs
        for key, single, mask in (("task_indices", "task_index", rows), ("messages", "messages", ~rows)):
            if mask.any():
                values = [s.get(single, 0 if single == "task_index" else []) for s in starts]
                obs, _ = self.env.reset(seed=seed, options={key: values, "reset_mask": mask})
        return [list(o) for o in obs]

    def step(self, actions: list[str | None]) -> list[tuple[list[dict[str, str]], float, bool]]:
        obs, rewards, term, trunc, _ = self.env.step(actions)
        return [(list(o), float(r), bool(a or b)) for o, r, a, b in zip(obs, rewards, term, trunc)]

    def close(self) -> None:
        return None


class _Remote:
    """Dialogues on an OpenEnv server: one session each, stepped concurrently from a private event-loop thread (so
    the WebSocket keep-alive is answered while the policy generates)."""

    def __init__(self, base_url: str, rows: list[Any]):
        from dialogue_gym.integrations.openenv import DialogueGymClient

        self._client_cls = DialogueGymClient
        self.base_url = base_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._clients: list[Any] = []
        self._done: list[bool] = []
        self.rows = rows  # the task rows the dataset's prompts came from: each reset is checked against them

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self, starts: list[dict[str, Any]], seed: int) -> list[list[dict[str, str]]]:
        async def go() -> list[Any]:
            while len(self._clients) < len(starts):
                self._clients.append(await self._client_cls(base_url=self.base_url).connect())
            return await asyncio.gather(*[c.reset(seed=seed + i, **s) for i, (c, s) in
                                          enumerate(zip(self._clients, starts))])

        results = self._run(go())
        for s, r in zip(starts, results):  # the server must play the rows the dataset's prompts came from
            if "task_index" not in s:
                continue
            row = self.rows[s["task_index"]]
            got, opening = r.observation.info.get("task_row"), r.observation.messages
            if got != row.id or opening != [dict(m) for m in row.messages]:
                raise DialogueError(
                    f"the server at {self.base_url} plays another row for task_index {s['task_index']}: row "
                    f"{got!r} opening {json.dumps(opening)[:120]}, where this rollout's env_kwargs give row "
                    f"{row.id!r} opening {_key(row.messages)[:120]}; start the server with the same env "
                    "configuration (task, task_kwargs, split)")
        self._done = [False] * len(starts)
        return [r.observation.messages for r in results]

    def step(self, actions: list[str | None]) -> list[tuple[list[dict[str, str]], float, bool]]:
        async def one(i: int, a: str | None) -> tuple[list[dict[str, str]], float, bool] | None:
            if a is None:
                return None
            r = await self._clients[i].step(a)
            return r.observation.messages, float(r.reward or 0.0), bool(r.done)

        async def every() -> list[Any]:
            return await asyncio.gather(*[one(i, a) for i, a in enumerate(actions)])

        out = self._run(every())
        return [o if o is not None else ([], 0.0, True) for o in out]

    def close(self) -> None:
        async def go() -> None:
            for c in self._clients:
                await c.close()

        self._run(go())
        self._clients = []
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class DialogueRollout:
    """A ``rollout_func`` (and its dataset and reward function) for TRL's ``GRPOTrainer``.

    Args:
        env_kwargs: the env configuration (fields of :class:`~dialogue_gym.core.EnvConfig`); in process, and also
            where the dataset's openings come from when ``base_url`` is set (only the task is built then, no user or
            reward model; the server must run the same task configuration: a reset whose row or opening differs
            from the dataset's raises a DialogueError naming both).
        base_url: an OpenEnv server of ``python -m dialogue_gym.serve_env``; None plays in process.
        max_new_tokens: the policy's cap per reply, in tokens.
        seed: the first dialogue's seed; every dialogue gets its own: a batch starts after all the dialogues of
            the batches before it (of every process, under ``accelerate``: process ``r`` of ``W`` takes the
            ``r``-th slice of each round), dialogue ``i`` of a batch adds ``i``.
    """

    def __init__(self, env_kwargs: Mapping[str, Any] | None = None, *, base_url: str | None = None,
                 max_new_tokens: int = 64, seed: int = 0):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DialogueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.env_kwargs = dict(env_kwargs or {})
        self.task, self.rows = _task_rows(self.env_kwargs)  # the split's rows, from the task alone (no user/reward)
        # in process, the vector envs take this task as built (a dataset task reads its files once, not per env)
        self.backend: _Local | _Remote = (_Local({**self.env_kwargs, "task": self.task, "task_kwargs": {}})
                                          if base_url is None else _Remote(base_url, self.rows))
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self._rows: dict[str, int] = {}  # each opening of the split -> its first row
        for i, row in enumerate(self.rows):
            self._rows.setdefault(_key(row.messages), i)
        self._next_seed = 0  # dialogues started so far (by every process)
        self.stats = {"dialogues": 0, "turns": 0, "blank_replies": 0}
        self.last: list[list[dict[str, str]]] = []  # the dialogues of the latest call (final messages)

    # ---- dataset and reward ------------------------------------------------------------------------------------

    def dataset(self, n: int | None = None) -> datasets.Dataset:
        """A ``prompt`` column of the env split's openings (the first ``n`` distinct ones; every one if None), each
        played from its row (an opening shared by two rows: the first row stands for it). The same on every call.

        Raises:
            DialogueError: ``n`` is not a non-negative integer.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise DialogueError(f"dataset(n): n must be a non-negative integer or None (every opening), got {n!r}")
        firsts = sorted(set(self._rows.values()))
        prompts = [[dict(m) for m in self.rows[i].messages] for i in (firsts if n is None else firsts[:n])]
        return datasets.Dataset.from_dict({"prompt": prompts})

    @staticmethod
    def reward(completions: list[Any], env_reward: list[float], **kwargs: Any) -> list[float]:
        """GRPO's reward function: the env's episode return that the rollout put in ``env_reward``."""
        return [float(r) for r in env_reward]

    # ---- the rollout -------------------------------------------------------------------------------------------

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        """Play one dialogue per prompt with ``trainer.model``; TRL's ``rollout_func`` contract.

        Returns:
            ``prompt_ids`` / ``completion_ids`` / ``logprobs`` / ``env_mask``: one list per prompt (token ids,
            per-completion-token sampling log-probs, 1 for the policy's tokens and 0 for the user's), and
            ``env_reward`` (the episode return per prompt).
        """
        acc = trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        return self.play(model, trainer.processing_class, prompts, float(getattr(trainer.args, "temperature", 1.0)),
                         process=(int(acc.process_index), int(acc.num_processes)))

    def play(self, model: Any, tokenizer: Any, prompts: list[Any], temperature: float = 1.0,
             process: tuple[int, int] = (0, 1)) -> dict[str, list[Any]]:
        """Play one dialogue per prompt with ``model`` (what the rollout does; also for evaluation outside TRL).

        Args:
            process: ``(rank, world)``: under several processes each plays its slice of a round of batches of the
                same size, and takes its own seeds (TRL spreads a prompt's group over processes, so equal seeds
                would give group members the same user).

        Returns:
            as :meth:`__call__`.
        """
        rank, world = process
        starts = [self._start(p) for p in prompts]
        seed = self.seed + self._next_seed + rank * len(prompts)
        self._next_seed += world * len(prompts)
        convs = self.backend.start(starts, seed)
        n = len(convs)
        prompt_ids = [self._ids(tokenizer, _render(tokenizer, c, True)) for c in convs]
        completion: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        mask: list[list[int]] = [[] for _ in range(n)]
        returns = np.zeros(n)
        done = [False] * n
        eos = tokenizer.eos_token_id
        while not all(done):
            active = [i for i in range(n) if not done[i]]
            outs = self._generate(model, tokenizer, [prompt_ids[i] + completion[i] for i in active], temperature)
            actions: list[str | None] = [None] * n
            for i, (ids, lp) in zip(active, outs):
                completion[i] += ids
                logps[i] += lp
                mask[i] += [1] * len(ids)
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if text:
                    actions[i] = text
                else:
                    done[i] = True
                    self.stats["blank_replies"] += 1
            results = self.backend.step(actions)
            for i in active:
                if actions[i] is None:
                    continue
                messages, reward, finished = results[i]
                returns[i] += reward
                self.stats["turns"] += 1
                convs[i] = messages
                if finished:
                    done[i] = True
                    continue
                glue = [] if completion[i][-1] == eos else [eos]  # deviation 2: close a cut reply
                glue += self._ids(tokenizer, chat_glue(tokenizer, messages[:-1], messages[-1]["content"]))
                completion[i] += glue
                logps[i] += [0.0] * len(glue)
                mask[i] += [0] * len(glue)
        self.stats["dialogues"] += n
        self.last = convs
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "logprobs": logps, "env_mask": mask,
                "env_reward": returns.tolist()}

    def _start(self, prompt: Any) -> dict[str, Any]:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        key = _key(prompt)
        if key in self._rows:
            return {"task_index": self._rows[key]}
        return {"messages": [dict(m) for m in prompt]}

    @staticmethod
    def _ids(tokenizer: Any, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def _generate(self, model: Any, tokenizer: Any, contexts: list[list[int]], temperature: float
                  ) -> list[tuple[list[int], list[float]]]:
        """One reply per context: sampled token ids up to and including the end-of-turn token, and their
        log-probs under the sampling distribution (after temperature), shapes (T_i,)."""
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        attn = torch.zeros((len(contexts), width), dtype=torch.long)
        for b, c in enumerate(contexts):  # left padding
            ids[b, width - len(c):] = torch.tensor(c)
            attn[b, width - len(c):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=self.max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, output_scores=True,
                             return_dict_in_generate=True)
        new = out.sequences[:, width:]  # (B, T)
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B, T, V), after the temperature
        picked = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, T)
        replies = []
        for b in range(len(contexts)):
            row = new[b].tolist()
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            replies.append((row[:end], picked[b, :end].tolist()))
        return replies

    def close(self) -> None:
        """Close the server sessions (remote); nothing to do in process."""
        self.backend.close()
