"""PPO's dialogue-to-token bookkeeping, with hand-computed numbers: rewards on each turn's last token, the KL
penalty on every assistant token, GAE chained across the turns of one dialogue and never across dialogues, and
the row layout that maps per-turn tensors onto collate's left-padded batches."""

from __future__ import annotations

import pytest
import torch

from agents.common.batching import Reply, collate, pack_right, unpack_right
from agents.ppo.__main__ import Turn, assign_advantages


def turn(dialogue: int, n_tokens: int, score: float, logp: list[float] | None = None, ref: list[float] | None = None,
         value: list[float] | None = None) -> Turn:
    t = Turn(Reply([1, 2, 3], list(range(10, 10 + n_tokens)), "x"), dialogue, score)
    t.logp = torch.tensor(logp if logp is not None else [-1.0] * n_tokens)
    t.ref = torch.tensor(ref if ref is not None else [-1.0] * n_tokens)
    t.value = torch.tensor(value if value is not None else [0.0] * n_tokens)
    return t


def test_terminal_score_flows_back_across_turns_with_lambda():
    # dialogue 0: turn 1 has 2 tokens (score 0), turn 2 has 1 token (terminal score 1); V = 0, no KL.
    # Action tokens in order t1 t2 | t3:  A3 = 1,  A2 = 0 + γλ·A3 = 0.5,  A1 = γλ·A2 = 0.25  (γ = 1, λ = 0.5).
    turns = [turn(0, 2, 0.0), turn(0, 1, 1.0)]
    assign_advantages(turns, 1, kl_coef=0.0, gamma=1.0, lam=0.5, whiten=False)
    assert torch.allclose(turns[0].advantage, torch.tensor([0.25, 0.5]))
    assert torch.allclose(turns[1].advantage, torch.tensor([1.0]))
    assert torch.allclose(turns[0].ret, turns[0].advantage)  # returns = A + V, V = 0


def test_kl_penalty_on_every_token_and_per_turn_scores_on_last_tokens():
    # logp − ref = 0.1 on every token, β = 0.5 → each token's reward −0.05; per-turn scores 2 (turn 1) and 1.
    # λ = γ = 1, V = 0: A is the sum of the rewards from the token on.
    #   t3: 1 − 0.05 = 0.95;  t2: 2 − 0.05 + 0.95 = 2.9;  t1: −0.05 + 2.9 = 2.85
    turns = [turn(0, 2, 2.0, logp=[-0.9, -0.9]), turn(0, 1, 1.0, logp=[-0.9])]
    stats = assign_advantages(turns, 1, kl_coef=0.5, gamma=1.0, lam=1.0, whiten=False)
    assert torch.allclose(turns[0].advantage, torch.tensor([2.85, 2.9]))
    assert torch.allclose(turns[1].advantage, torch.tensor([0.95]))
    assert stats["policy/kl_ref"] == pytest.approx(0.3)  # Σ (logp − ref) over the dialogue's 3 tokens
    assert stats["policy/entropy"] == pytest.approx(0.9)  # −mean log-prob of the sampled tokens
    assert stats["policy/kl_coef"] == 0.5


def test_values_bootstrap_between_turns_and_dialogues_stay_apart():
    # dialogue 0: tokens with V = [1, 2 | 3], rewards only at the end (score 4), γ = 1, λ = 0 (one-step TD):
    #   δ1 = 0 + V2 − V1 = 1;  δ2 = 0 + V3 − V2 = 1 (turn 1's last token bootstraps from turn 2's first);
    #   δ3 = 4 + 0 − 3 = 1.
    # dialogue 1: one token, V = 5, score 1: δ = 1 − 5 = −4 (no value leaks in from dialogue 0).
    turns = [turn(0, 2, 0.0, value=[1.0, 2.0]), turn(0, 1, 4.0, value=[3.0]), turn(1, 1, 1.0, value=[5.0])]
    stats = assign_advantages(turns, 2, kl_coef=0.0, gamma=1.0, lam=0.0, whiten=False)
    assert torch.allclose(turns[0].advantage, torch.tensor([1.0, 1.0]))
    assert torch.allclose(turns[1].advantage, torch.tensor([1.0]))
    assert torch.allclose(turns[2].advantage, torch.tensor([-4.0]))
    assert torch.allclose(turns[0].ret, torch.tensor([2.0, 3.0]))  # R = A + V
    assert torch.allclose(turns[2].ret, torch.tensor([1.0]))
    # explained variance: R = [2, 3, 4, 1], V = [1, 2, 3, 5] → residual [1, 1, 1, −4]: Var 4.6875 / Var(R) 1.25
    assert stats["loss/explained_variance"] == pytest.approx(1 - 4.6875 / 1.25)


def test_whitened_advantages_have_zero_mean_and_unit_variance_over_all_tokens():
    turns = [turn(0, 2, 0.0), turn(0, 1, 1.0), turn(1, 3, 3.0)]
    assign_advantages(turns, 2, kl_coef=0.0, gamma=1.0, lam=1.0, whiten=True)
    a = torch.cat([t.advantage for t in turns])
    assert a.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert a.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(turns[2].ret, torch.tensor([3.0, 3.0, 3.0]))  # returns are not whitened


def test_pack_and_unpack_follow_collate_left_padding():
    replies = [Reply([1, 2, 3, 4], [5, 6], "a"), Reply([1], [7, 8, 9], "b")]
    ids, _, mask = collate(replies, pad_id=0)
    values = [torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])]
    packed = pack_right(values, mask)
    assert torch.equal(packed != 0, mask.bool())  # exactly the reply positions
    assert torch.equal(ids[mask.bool()], torch.tensor([5, 6, 7, 8, 9]))
    assert all(torch.equal(a, b) for a, b in zip(unpack_right(packed, [2, 3]), values))
