"""The turn-1 probe: a low-variance read of whether training moved the mechanism, beside task success.

Success at the last turn is a noisy 0/1 outcome of greedy dialogues. The probe asks the policy directly: on each
stored test opening, did training make asking more likely relative to guessing? It is computed by forward passes on
*fixed* replies (sampled once, from the initial policy), so a trained policy adds no sampling noise of its own:

1. Once per leaderboard run, before any job starts, the initial policy pi_0 samples ``samples`` turn-1 replies at
   every test opening, at the training temperature T (seeded from the evaluation seed). The task's behaviour test
   (``task.asks``: clarify's "asks or holds back its answer") sorts them into A (asks) and G (the rest: replies
   that state an answer); the first ``keep`` of each class are kept, with their log-probs under pi_0 at T.
2. For a policy pi, at every state that has replies of both classes, with every log-prob taken at T (pi_T: the
   policy as the agents sample it):

       probe(s) = log mean_{y in A} pi_T(y|s)/pi_0,T(y|s) - log mean_{y in G} pi_T(y|s)/pi_0,T(y|s)      (nats)

   The kept replies of a class are draws from pi_0,T given that class, so each mean is an importance-sampling
   estimate of pi_T(A|s)/pi_0,T(A|s), and the probe estimates the change of the log-odds log pi_T(A|s)/pi_T(G|s)
   from pi_0's: 0 for pi_0 itself, > 0 when pi asks more (relative to guessing) than pi_0 did. The log of a mean of
   ``keep`` ratios is biased towards 0 from above and below alike as the ratios spread (Jensen), more for a policy
   that moved further, so the probe understates large changes; its sign is what the decision rules read. States
   with no reply of one class are left out (None), the same states for every policy.

Why the policy's own replies and not canned ones: a canned "Could you tell me ...?" measures one wording, and a
policy can learn to ask in its own words while that wording becomes *less* likely (the first clarify leaderboard saw
GRPO's turn-1 asking rise from 0.34 to 0.89 while the canned probe fell). REFUEL's claim predicts a rise (a turn-1
ask is credited with the later answer); REBEL's immediate reward at turn 1 is 0 for asking and guessing alike, so it
predicts no change beyond noise.

The same estimate has a limit of its own: it only sees replies pi_0 would write. A policy that moved far and
holds back its answer in words pi_0 rarely uses puts little probability on pi_0's asking replies and reads as asking
less while it asks more (last-turn DPO at some seeds of the clarify leaderboard's run 4). Read the probe beside the
report's greedy asking rate.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from agents.common.batching import Reply, reply_logprobs
from dialogue_gym.generation import SamplingParams, prompt_token_ids
from dialogue_gym.rollouts import StateRecord

SAMPLES = 8  # turn-1 replies the initial policy samples per state
KEEP = 2  # replies of each class kept per state (forward passes per policy: at most 2 * KEEP per state)
SEED_STREAM = 7919  # the probe's sampling seeds: (eval seed, state, sample, this stream), apart from the eval's own


def replies_digest(probe: dict[str, Any]) -> str:
    """A digest of the probe's replies (every state's id and the token ids of its kept replies, in order): two run
    directories of one design measured their probe changes on the same replies exactly when their digests agree.
    The initial policy's log-probs are left out: each run's probe change is taken against the log-probs stored in its
    own directory, so what must agree between directories is which replies were scored."""
    h = hashlib.sha256()
    for st in probe["states"]:
        h.update(json.dumps([st["id"], [y["token_ids"] for y in st["ask"]],
                             [y["token_ids"] for y in st["guess"]]]).encode())
    return h.hexdigest()[:16]


def has_probe(task: Any) -> bool:
    """Whether the task has the behaviour test the probe sorts replies with (``asks(reply) -> bool``)."""
    return callable(getattr(task, "asks", None))


def sample_probe_replies(model_name: str, states: Sequence[StateRecord], asks: Callable[[str], bool],
                         temperature: float, max_new_tokens: int, seed: int, samples: int = SAMPLES,
                         keep: int = KEEP) -> dict[str, Any]:
    """Step 1 of the module docstring with the initial policy ``model_name``.

    Returns:
        ``{"samples", "keep", "temperature", "states": [{"id", "ask": [...], "guess": [...], "asked": a, "sampled": n,
        "prompt_token_ids"}]}`` (JSON-ready; ``id``: the stored state's id), each reply ``{"text", "token_ids",
        "logp0"}`` (``logp0``: its log-prob under the initial policy at ``temperature``); ``asked`` of the
        ``sampled`` replies asked.

    Raises:
        ValueError: ``samples`` or ``keep`` below 1, or a temperature of 0 (greedy replies are all alike).
    """
    if samples < 1 or keep < 1:
        raise ValueError(f"samples and keep must be >= 1, got {samples} and {keep}")
    if temperature <= 0:
        raise ValueError(f"the probe samples its replies; temperature must be > 0, got {temperature}")
    from dialogue_gym.generation.hf import HFEngine

    engine = HFEngine(model_name, seed=seed)
    tokenizer = engine.tokenizer
    prompts = [s.state.messages for s in states for _ in range(samples)]
    seeds = [int(np.random.default_rng([seed, i, j, SEED_STREAM]).integers(2**62)) for i in range(len(states))
             for j in range(samples)]
    gens = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens), seeds)
    out = []
    for i, s in enumerate(states):
        mine = gens[i * samples:(i + 1) * samples]
        classes: dict[str, list[dict[str, Any]]] = {"ask": [], "guess": []}
        for g in mine:
            group = classes["ask" if asks(g.text) else "guess"]
            if len(group) < keep:
                group.append({"text": g.text, "token_ids": list(g.token_ids)})
        out.append({"id": s.id, **classes, "asked": sum(asks(g.text) for g in mine), "sampled": samples,
                    "prompt_token_ids": prompt_token_ids(tokenizer, s.state.messages)})
    logp0 = _logprobs(engine.model, tokenizer, out, temperature)
    for st, values in zip(out, logp0):
        for y, lp in zip(st["ask"] + st["guess"], values):
            y["logp0"] = lp
    return {"samples": samples, "keep": keep, "temperature": temperature, "states": out}


def _logprobs(model: Any, tokenizer: Any, states: list[dict[str, Any]], temperature: float, batch_size: int = 8
              ) -> list[list[float]]:
    """Per state, the summed log-probs (at ``temperature``) of its kept replies, asks first, under ``model``."""
    replies = [Reply(list(st["prompt_token_ids"]), list(y["token_ids"]), y["text"])
               for st in states for y in st["ask"] + st["guess"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        flat = reply_logprobs(model, replies, pad, temperature=temperature,
                              batch_size=batch_size).float().cpu().tolist() if replies else []
    out, k = [], 0
    for st in states:
        n = len(st["ask"]) + len(st["guess"])
        out.append(flat[k:k + n])
        k += n
    return out


def _log_mean_exp(xs: list[float]) -> float:
    top = max(xs)
    if not math.isfinite(top):  # every ratio 0 (a policy that gives the class's replies probability 0) or broken
        return top
    return top + math.log(sum(math.exp(x - top) for x in xs) / len(xs))


def check_states(probe: dict[str, Any], states: Sequence[StateRecord]) -> None:
    """The probe's replies were sampled at exactly these stored states, in this order.

    Raises:
        ValueError: they were not (a run directory reused with other ``eval.states`` or ``eval.seed``).
    """
    got = [st.get("id") for st in probe["states"]]
    if got != [s.id for s in states]:
        raise ValueError(f"the probe's replies were sampled at {len(got)} other states than the {len(states)} stored "
                         "test states; delete probe_replies.json from the run directory to sample them again")


def probe_values(model_name: str, probe: dict[str, Any]) -> list[float | None]:
    """Step 2 of the module docstring: (states,) probe values of the policy ``model_name`` (a name ``load_model``
    knows, or an exported policy's directory) on the replies of :func:`sample_probe_replies`, at their sampling
    temperature; None where a state lacks replies of one class."""
    from dialogue_gym.models import load_model

    model, tokenizer = load_model(model_name, shared=False)
    return probe_from_logprobs(probe, _logprobs(model, tokenizer, probe["states"], probe["temperature"]))


def probe_from_logprobs(probe: dict[str, Any], logp: list[list[float]]) -> list[float | None]:
    """The probe at every state from the policy's log-probs of its kept replies (asks first, as stored)."""
    out: list[float | None] = []
    for st, values in zip(probe["states"], logp):
        if not st["ask"] or not st["guess"]:
            out.append(None)
            continue
        ratios = [lp - y["logp0"] for y, lp in zip(st["ask"] + st["guess"], values)]
        n = len(st["ask"])
        value = _log_mean_exp(ratios[:n]) - _log_mean_exp(ratios[n:])
        if not math.isfinite(value):
            raise ValueError(f"probe at state {st.get('id')}: a reply's log-prob is not finite ({values}); the policy "
                             "gives a sampled reply probability 0 or its weights are broken")
        out.append(value)
    return out
