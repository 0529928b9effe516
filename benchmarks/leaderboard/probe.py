"""The turn-1 log-prob probe: a low-variance read of whether training moved the mechanism, beside task success.

Success at the last turn is a noisy 0/1 outcome of greedy dialogues. The probe asks the policy directly: on each
stored test opening, how much more likely is a reply that asks for the missing number than one that guesses? It
is computed by forward passes on two *fixed* canned replies per state (the task's ``probe_replies``: clarify's
"Could you tell me how many apples Maya has at the start?" vs "The answer is 10."), so it has no sampling noise:

    probe(s) = log pi(ask | s) - log pi(guess | s)      (nats; summed over each reply's tokens, EOS included)

The leaderboard reports, per trained policy and state, the change from the initial policy's value on the same
state, as a (seeds, states) matrix with crossed intervals (:mod:`.stats`). REFUEL's claim predicts a rise (a
turn-1 ask is credited with the later answer); REBEL's immediate reward at turn 1 is 0 for both, so it predicts no
change beyond noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agents.common.batching import Reply, reply_logprobs
from dialogue_gym.generation import prompt_token_ids
from dialogue_gym.rollouts import StateRecord


def has_probe(task: Any) -> bool:
    """Whether the task defines the canned replies of the probe (``probe_replies(profile) -> (ask, guess)``)."""
    return callable(getattr(task, "probe_replies", None))


def probe_values(model_name: str, states: list[StateRecord], task: Any, batch_size: int = 8) -> np.ndarray:
    """(states,) ``log pi(ask | s) - log pi(guess | s)`` of the policy ``model_name`` (a name ``load_model``
    knows, or an exported policy's directory) at every stored state, in nats.

    Raises:
        ValueError: the task has no ``probe_replies``.
    """
    if not has_probe(task):
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no probe_replies(profile); the probe needs the "
                         "two canned replies (ask, guess) of a state")
    from dialogue_gym.models import load_model

    model, tokenizer = load_model(model_name, shared=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer of {model_name!r} has no EOS token to end a canned reply with")
    replies = []
    for s in states:
        prompt = prompt_token_ids(tokenizer, s.state.messages)
        for text in task.probe_replies(s.state.profile):
            replies.append(Reply(list(prompt), list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos],
                                 text))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    with torch.no_grad():
        logp = reply_logprobs(model, replies, pad, temperature=1.0, batch_size=batch_size).float().cpu().numpy()
    return logp[0::2] - logp[1::2]  # (states,) ask - guess
