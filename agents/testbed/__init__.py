"""An exact testbed for the algorithms: a table policy over canned replies, a tiny clarify-shaped task, the closed
form of each agent's update, and a harness that runs the agents' own ``run(cfg)`` on them.

Why a table policy dressed as a language model. The agents take a policy by name (``policy.model``), sample it
through the :class:`~dialogue_gym.generation.hf.HFEngine` (``transformers``' ``generate``), and train it through
:mod:`agents.common.logprobs` (the model's ``get_decoder()`` and ``get_output_embeddings()``). So the testbed's
policy is a real ``transformers`` model (:class:`TablePolicy`, registered with the Auto classes and saved to a
directory) with a real fast tokenizer (a word-level ``tokenizers`` model with a chat template): every agent loads,
samples, scores and trains it exactly as it would SmolLM2, with no change to agent code. Inside, the "decoder"
reads two features of the conversation so far off the token ids -- the assistant turn ``h`` and whether the user
has revealed the number -- and outputs their one-hot code; the "LM head" is a learnable logit table indexed by that
state, restricted to the three canned replies (one token each), and after a reply it puts all mass on the
end-of-turn token. So ``log pi(reply | s)`` is ``table[s, reply] - logsumexp(table[s, :])``: a tabular softmax
policy, whose every update the closed forms below predict exactly.

The task (``task=testbed``, H = 2 assistant turns). The user thinks of a number and opens with "guess my number".
The canned replies are ``ask``, ``guess`` (a committed wrong guess) and ``answer`` (states the number the user gave).

- ``ask``: the user reveals the number ("it is seven"; ``known`` from then on), or says "i told you" if known;
- ``guess``: the user says "no";
- ``answer``: right when the number is known (the user ends the conversation), "you do not know it" otherwise.

The reward of a conversation is the score of its last reply: 1 for ``answer`` when the number is known, ``G`` =
0.2 for ``guess`` (a judge that likes committed answers gives partial credit), 0 otherwise. So at turn 1 the
immediate reward prefers guessing, and the return prefers asking: the clarify task's trap, with exact numbers.

The closed forms (exact, from the initial table pi_0; :class:`Testbed` computes them by enumeration over the MDP):

- ``r(s, a)``: immediate reward; ``Q_H'(s, a)``: the return of reply ``a`` at ``s`` with the dialogue completed by
  pi_0 to absolute turn ``H'``; REFUEL's branch target at turn ``h`` is ``Q_H'`` with ``H'`` drawn given ``h``
  (reference sampling: ``P(H' | h)`` proportional to ``1/H'`` for ``H' >= h``; uniform: ``H' = H``).
- REFUEL / REBEL (exact regression fit): the least-squares fit of ``(delta_a - delta_b)`` onto
  ``eta * (y_a - y_b)`` over pairs at each state, where ``delta = log pi_new - log pi_0``, is unbiased for
  ``delta(s, a) = eta * E[y | s, a] + c(s)`` (mirror descent), with ``y`` REFUEL's branch target or REBEL's
  immediate reward.
- Online DPO (immediate reward, exact fit of the cDPO loss with label smoothing ``eps``): at a state where every
  pair prefers the same reply ``w`` to each other reply ``l``, ``beta * (delta_w - delta_l) = log((1 - eps) /
  eps)`` for every ``l`` that appears; where the pair types cannot all be met (answer > guess > ask), the exact
  minimiser of the loss over the pair types in their exact proportions (:func:`cdpo_optimum`).
- PPO (one full-batch step, gamma = lambda = 1, value head at 0, no KL): the expected policy gradient on
  ``table[s, b]`` is ``d(s) pi_0(b|s) (Q(s, b) - V(s))`` (whitening shifts by a constant, whose expectation
  vanishes, and scales by a positive one), and AdamW's first step (zero moments, beta1 = 0) moves each entry by
  exactly ``lr`` in its gradient's sign: ``delta table[s, b] = lr * sign(Q(s, b) - V(s))``.

Where it runs: ``tests/agents/test_testbed.py`` (the default suite, about 20 s of CPU) and
``python -m benchmarks.testbed`` (the table of closed forms against trained tables, ``benchmarks/results/testbed.md``).
Importing this package registers the task as ``task=testbed`` and the policy's architecture with
``transformers``' Auto classes. Its modules: :mod:`~agents.testbed.policy` (vocabulary and table policy),
:mod:`~agents.testbed.task` (user, reward, task), :mod:`~agents.testbed.closed_forms` (:class:`Testbed`) and
:mod:`~agents.testbed.harness` (training runs, checks and the arms).

Adding an agent: an :class:`Arm` (its ``run``, its config on the testbed, and the :class:`Check` of its closed
form) and an entry in :func:`default_arms`; see ``docs/testbed.md``.
"""

from __future__ import annotations

from agents.testbed.closed_forms import Testbed, cdpo_optimum, centred, horizon_weights
from agents.testbed.harness import (
    DPO_BETA,
    DPO_EPS,
    DPO_N,
    ETA,
    FIT_EPOCHS,
    PI0,
    PPO_LR,
    Arm,
    Check,
    common_settings,
    default_arms,
    dpo_arm,
    grpo_arm,
    initial_policy_dir,
    one_thread,
    ppo_arm,
    rebel_arm,
    refuel_arm,
    refuel_scores_immediate_reward,
    train,
)
from agents.testbed.policy import (
    AFTER_REPLY,
    ANSWER,
    ASK,
    CHAT_TEMPLATE,
    GUESS,
    GUESS_CREDIT,
    HORIZON,
    OPENING,
    OTHER,
    REPLIES,
    REVEAL,
    REVEAL_TOKEN,
    SPECIAL,
    STATES,
    USER_TEXTS,
    StateDecoder,
    TableConfig,
    TableHead,
    TablePolicy,
    build_tokenizer,
    conversation_to,
    decision_state,
    log_policy,
    make_policy,
    save_policy,
    vocabulary,
)
from agents.testbed.task import TestbedReward, TestbedTask, TestbedUser, is_known, reward

__all__ = [
    "REPLIES", "ASK", "GUESS", "ANSWER", "OPENING", "REVEAL", "USER_TEXTS", "SPECIAL", "REVEAL_TOKEN",
    "HORIZON", "GUESS_CREDIT", "CHAT_TEMPLATE", "vocabulary", "build_tokenizer", "decision_state",
    "AFTER_REPLY", "OTHER", "STATES", "TableConfig", "StateDecoder", "TableHead", "TablePolicy",
    "make_policy", "save_policy", "log_policy", "conversation_to", "is_known", "TestbedUser", "TestbedReward",
    "reward", "TestbedTask", "horizon_weights", "Testbed", "centred", "cdpo_optimum", "PI0",
    "common_settings", "Check", "Arm", "one_thread", "initial_policy_dir", "train", "ETA", "FIT_EPOCHS",
    "DPO_BETA", "DPO_EPS", "DPO_N", "PPO_LR", "refuel_arm", "rebel_arm", "dpo_arm", "ppo_arm", "grpo_arm",
    "refuel_scores_immediate_reward", "default_arms",
]
