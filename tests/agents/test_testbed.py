"""The exact algorithm testbed (agents/testbed/): each agent's real ``run(cfg)`` on a table policy over canned
replies, its trained table checked against the closed form of its update, over seeds, within the Monte-Carlo error.

The arms' runs are shared by the tests through a module-scoped cache (each arm runs once per seed list).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
import torch

import dialogue_gym  # noqa: F401  (registers MultiTurnDialogue-v0)
from agents import testbed as tb
from agents.common.batching import Reply, reply_logprobs
from agents.testbed import ANSWER, ASK, ETA, GUESS, PI0, REPLIES, STATES, Check, Testbed, centred
from dialogue_gym.generation.base import SamplingParams
from dialogue_gym.generation.hf import HFEngine
from dialogue_gym.models import load_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: the (seeds, states, replies) log-prob changes of an arm of ``default_arms``, computed once per
    module."""
    arms = tb.default_arms()
    done: dict[str, np.ndarray] = {}
    root = tmp_path_factory.mktemp("testbed")

    def get(name: str) -> np.ndarray:
        if name not in done:
            arm, seeds = arms[name]
            previous = logging.root.manager.disable
            logging.disable(logging.INFO)  # the agents' per-run logs
            try:
                done[name] = tb.train(arm, seeds, root / name)
            finally:
                logging.disable(previous)
        return done[name]

    return get


@pytest.fixture(scope="module")
def bed():
    return Testbed(PI0)


# ----------------------------------------------------------------------------------------------- the parts
def test_table_policy_is_a_language_model_the_engine_samples(tmp_path):
    """The saved table policy loads by path through load_model, the HF engine samples its replies (one token +
    end of turn) with the table's frequencies, and the engine's log-probs equal the trainer's."""
    model, tokenizer = load_model(str(tb.initial_policy_dir(tmp_path)), shared=False, device="cpu")
    engine = HFEngine((model, tokenizer))
    n = 1500
    with tb.one_thread():
        gens = engine.generate([[{"role": "user", "content": tb.OPENING}]] * n, SamplingParams(temperature=1.0),
                               seeds=list(range(n)), return_logprobs=True)
    counts = Counter(g.text for g in gens)
    assert set(counts) == set(REPLIES)
    for j, reply in enumerate(REPLIES):  # binomial: 5 standard errors
        p = PI0[0, j]
        assert abs(counts[reply] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (reply, counts)
    g = gens[0]
    assert g.finished and len(g.token_ids) == 2 and g.token_ids[1] == tokenizer.eos_token_id
    assert g.logprobs[1] == 0.0  # the end-of-turn token is certain after a reply
    trainer = reply_logprobs(model, [Reply.from_generation(x) for x in gens[:30]], tokenizer.pad_token_id)
    assert np.allclose(trainer.detach().numpy(), [sum(x.logprobs) for x in gens[:30]], atol=1e-6)
    assert np.allclose(tb.log_policy(model), np.log(PI0), atol=1e-6)


def test_decoder_reads_turn_and_known_number_off_the_tokens():
    """The state code of the generation prompt is (turn, number revealed), whatever padding precedes it."""
    model, tokenizer = tb.make_policy({s: p for s, p in zip(STATES, PI0)})
    for h, known in STATES:
        text = tokenizer.apply_chat_template(tb.conversation_to(h, known), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        padded = torch.tensor([[tokenizer.pad_token_id] * 3 + ids])
        attention = torch.tensor([[0] * 3 + [1] * len(ids)])
        code = model.get_decoder()(padded, attention).last_hidden_state[0, -1]
        assert int(code.argmax()) == tb.decision_state(h, known)
    with pytest.raises(ValueError, match=r"probs\[\(1, False\)\] must be 3 positive probabilities"):
        tb.make_policy({(1, False): [0.5, 0.5, 0.0]})


def test_env_is_exact_through_the_vector_env():
    """Scripted user and rewards through the real vector env: ask then answer scores 1 and ends the dialogue; a
    guess scores the partial credit; an answer without the number scores 0."""
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=3, autoreset_mode="Disabled", task="testbed",
                        max_turns=2, reward_mode="per_turn")
    venv.reset(seed=[0, 1, 2], options={"task_indices": [0, 1, 2]})
    obs, r, term, trunc, info = venv.step(["ask", "guess", "answer"])
    assert r.tolist() == [0.0, tb.GUESS_CREDIT, 0.0] and not term.any()
    assert [o[-1]["content"] for o in obs] == [tb.REVEAL, "no", "you do not know it"]
    obs, r, term, trunc, info = venv.step(["answer", "answer", "guess"])
    assert r.tolist() == [1.0, 0.0, tb.GUESS_CREDIT]
    assert term.tolist() == [True, False, False] and trunc.tolist() == [False, True, True]
    venv.close()


def test_testbed_parts_reject_what_they_cannot_read():
    """A reply that is not canned is an error naming it and the allowed ones; so is a conversation longer than the
    table's horizon."""
    with pytest.raises(ValueError, match="got the reply 'hello'; allowed: ask, guess, answer"):
        tb.TestbedUser().respond([[{"role": "user", "content": tb.OPENING}, {"role": "assistant", "content": "hello"}]],
                                 [{}], [0])
    model, tokenizer = tb.make_policy({})
    text = tokenizer.apply_chat_template(tb.conversation_to(2, False) + [{"role": "assistant", "content": "guess"},
                                                                         {"role": "user", "content": "no"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match="more than max_turns=2 assistant turns"):
        model.get_decoder()(ids)


def test_closed_forms_by_hand(bed):
    """The enumerated closed forms equal the numbers worked out by hand from pi0 (module docstring of testbed)."""
    q = bed.q_table()
    # after ask at turn 1 the number is known: answer (p 0.5) scores 1, guess (p 0.25) scores 0.2
    assert q[0, ASK] == pytest.approx(0.5 * 1 + 0.25 * 0.2)
    assert q[0, GUESS] == pytest.approx(q[0, ANSWER]) == pytest.approx(0.2 / 3)  # unknown at turn 2: guess 1/3
    assert np.allclose(q[1:], [[0, 0.2, 0], [0, 0.2, 1]])
    assert np.allclose(bed.immediate()[0], [0, 0.2, 0])
    # reference sampling at h = 1: P(H' = 1 | h = 1) = (1/1) / (1/1 + 1/2) = 2/3
    assert tb.horizon_weights(1, "reference") == pytest.approx({1: 2 / 3, 2: 1 / 3})
    assert bed.refuel_target("reference")[0] == pytest.approx([0.55 / 3, 0.4 / 3 + 0.2 / 9, 0.2 / 9])
    assert bed.refuel_target("uniform")[0] == pytest.approx(q[0])
    # DPO at turn 1, n = 2: pairs (guess, ask) with 2 * 0.4 * 0.4 and (guess, answer) with 2 * 0.4 * 0.2
    freq = bed.pair_frequencies(2)[0]
    assert freq == pytest.approx({(GUESS, ASK): 0.32, (GUESS, ANSWER): 0.16})
    d = tb.cdpo_optimum(freq, beta=1.0, eps=0.1)
    assert d[GUESS] - d[ASK] == pytest.approx(math.log(9)) and d[GUESS] - d[ANSWER] == pytest.approx(math.log(9))
    with pytest.raises(ValueError, match="turn_sampling is 'later'; allowed: reference, uniform"):
        tb.horizon_weights(1, "later")


def test_check_rejects_what_it_should():
    """The comparison itself: a mean off by more than z SE + atol fails and names the entry; a sign check fails
    on a wrong sign or an insignificant move."""
    expected = np.zeros((len(STATES), len(REPLIES)))
    expected[0] = [1.0, -0.5, -0.5]
    good = np.stack([expected + 0.01 * s for s in range(-2, 3)])
    assert Check(expected).failures(good) == []
    bad = good.copy()
    bad[:, 0] = [0.5, -0.25, -0.25]
    assert any("state (1, False) reply 'ask'" in f for f in Check(expected).failures(bad))
    assert Check(expected, kind="sign", atol=0.1).failures(good) == []
    assert len(Check(expected, kind="sign", atol=0.1).failures(-good)) == 3
    with pytest.raises(ValueError, match="deltas must be"):
        Check(expected).failures(good[:1])


# ----------------------------------------------------------------------------------------------- the agents
def test_refuel_moves_log_pi_by_eta_q(runs, bed):
    """REFUEL, turn_sampling=uniform, exact regression fit: ``delta log pi(a|s) = eta * Q(s, a) + c(s)``.

    Derivation: the log-ratio difference of two replies at one state is ``delta_a - delta_b`` (the table's
    normaliser cancels), regressed onto ``eta * (Q_hat_a - Q_hat_b)``; ``Q_hat`` is an unbiased return given
    (s, a) (H' = H, branches completed by pi0), so the least-squares fit is unbiased for ``eta * Q(s, a) + c(s)``.
    Tolerance: 5 standard errors of the mean over 8 seeds (turn 1's Monte-Carlo returns) + 0.02 (optimiser).
    """
    check = Check(ETA * centred(bed.refuel_target("uniform")))
    assert check.failures(runs("refuel")) == []


def test_refuel_reference_sampling_dilutes_turn_1_credit(runs, bed):
    """REFUEL with its reference turn sampling (H' ~ U{1..H}, h ~ U{1..H'}) matches its own closed form, in which
    two thirds of the turn-1 pairs end at H' = 1 and are scored by their immediate reward: ``E[Q_hat | s1, a] =
    2/3 r(s1, a) + 1/3 Q(s1, a)``. The ask-guess gap shrinks from 0.48 to 0.03 (the issue's horizon dilution),
    and the trained table is told apart from the uniform closed form (a branch completed to H instead of H')."""
    deltas = runs("refuel_reference")
    assert Check(ETA * centred(bed.refuel_target("reference"))).failures(deltas) == []
    assert any("state (1, False)" in f for f in Check(ETA * centred(bed.refuel_target("uniform"))).failures(deltas))
    gap = {m: bed.refuel_target(m)[0, ASK] - bed.refuel_target(m)[0, GUESS] for m in ("reference", "uniform")}
    assert gap["reference"] == pytest.approx(0.55 / 3 - 0.4 / 3 - 0.2 / 9) and gap["uniform"] == pytest.approx(
        0.55 - 0.2 / 3)


def test_refuel_check_rejects_immediate_reward_credit(runs, bed):
    """The mutant REFUEL whose branches are scored by their immediate reward (REBEL's credit) fails the REFUEL
    check: at turn 1 it moves towards the guess's partial credit instead of towards asking."""
    check = Check(ETA * centred(bed.refuel_target("uniform")))
    failures = check.failures(runs("refuel_mutant"))
    assert any("state (1, False)" in f for f in failures), failures
    assert all("state (2," not in f for f in failures)  # at the last turn, Q is the immediate reward
    assert Check(ETA * centred(bed.immediate())).failures(runs("refuel_mutant")) == []  # it learns REBEL's update


def test_rebel_moves_log_pi_by_eta_r(runs, bed):
    """REBEL, exact regression fit on immediate rewards: ``delta log pi(a|s) = eta * r(s, a) + c(s)``.

    Same derivation as REFUEL's with the reply's own score as the target (no future); the targets are exact, so
    the tolerance is the optimiser's.
    """
    assert tb.rebel_arm().check(bed).failures(runs("rebel")) == []


def test_dpo_fits_the_cdpo_optimum_at_each_turn(runs, bed):
    """Online DPO (immediate reward, best vs worst of 3, cDPO eps = 0.1), fitted to convergence, reaches the exact
    minimiser of its loss over the pair types in their exact proportions: at turn 1 and at (2, unknown), every
    pair prefers the guess, so ``beta * (delta_guess - delta_other) = log 9``; at (2, known) answer > guess > ask."""
    deltas = runs("dpo")
    assert tb.dpo_arm().check(bed).failures(deltas) == []
    d = centred(deltas).mean(0)
    assert d[0, GUESS] - d[0, ASK] == pytest.approx(math.log(9) / tb.DPO_BETA, abs=0.02)
    assert d[2, ANSWER] > d[2, GUESS] > d[2, ASK]


def test_ppo_moves_each_reply_by_its_advantage_sign(runs, bed):
    """PPO (one full-batch step from pi0, gamma = lambda = 1, no KL, whitened advantages): the expected gradient on
    ``table[s, b]`` is ``d(s) pi0(b|s) (Q(s, b) - V(s))`` and AdamW's first step (beta1 = 0) moves every entry by
    exactly ``lr`` in its sign, so ``delta table = lr * sign(Q - V)``: every reply moves by its advantage's sign."""
    deltas = runs("ppo")
    assert tb.ppo_arm().check(bed).failures(deltas) == []
    assert (np.sign(centred(deltas).mean(0)) == np.sign(bed.advantage())).all()
    assert Check(tb.PPO_LR * centred(-np.sign(bed.advantage())), atol=0.002).failures(deltas)  # a flipped sign fails


@pytest.mark.parametrize("credit", ["turn", "trajectory"])
def test_grpo_moves_each_reply_by_its_centred_q_sign(runs, bed, credit):
    """GRPO (one full-batch step from pi0, no KL, scale=none, uniform turns): turn credit centres each forked
    reply's return on its group at s_h, trajectory credit broadcasts the dialogue's centred return to every reply;
    both have expected gradient ``(1 - 1/G) d(s) pi0(b|s) (Q(s, b) - V(s))`` on ``table[s, b]``, so AdamW's first
    step (beta1 = 0) moves every entry by ``lr * sign(Q - V)``."""
    name = "grpo_turn" if credit == "turn" else "grpo_trajectory"
    deltas = runs(name)
    assert tb.grpo_arm(credit).check(bed).failures(deltas) == []
    assert (np.sign(centred(deltas).mean(0)) == np.sign(bed.advantage("uniform"))).all()
    assert Check(tb.PPO_LR * centred(-np.sign(bed.advantage("uniform"))), atol=0.002).failures(deltas)


def test_task_level_refuel_learns_to_ask_and_rebel_does_not(runs):
    """The clarify-shaped prediction: REFUEL's turn-1 asking rises, REBEL's does not (it falls: the guess's
    immediate partial credit is all REBEL sees at turn 1)."""
    ask_before = PI0[0, ASK]
    refuel = np.exp(np.log(ask_before) + runs("refuel")[:, 0, ASK])  # pi(ask | turn 1) after, per seed
    rebel = np.exp(np.log(ask_before) + runs("rebel")[:, 0, ASK])
    se = refuel.std(ddof=1) / math.sqrt(len(refuel))
    assert refuel.mean() - ask_before > 5 * se, (refuel, ask_before)
    assert rebel.max() < ask_before, (rebel, ask_before)
