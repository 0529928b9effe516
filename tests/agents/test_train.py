"""The learning-rate schedule shared by every agent (no zero-learning-rate step, numbers worked by hand) and the
minibatches of the pair update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.common.config import OptimSettings
from agents.common.train import lr_factor, make_optimizer, minibatches


def test_lr_factor_by_hand():
    # 10 steps, 2 of warm-up: 1/3, 2/3, then cosine over the 8 remaining steps: 0.5 * (1 + cos(pi * k / 8))
    got = [lr_factor(s, 2, 10) for s in range(10)]
    want = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert got == pytest.approx(want)
    assert got[2] == 1.0 and min(got) > 0 and got[-1] == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))
    assert [lr_factor(s, 0, 2) for s in range(2)] == pytest.approx([1.0, 0.5])  # no warm-up
    assert lr_factor(0, 1, 1) == 0.5 and lr_factor(5, 1, 1) > 0  # one step in all; past the end stays above 0


def test_the_first_optimizer_step_has_a_positive_learning_rate():
    """REFUEL's cpu preset made 5 optimizer steps with warm-up 0.1: the old schedule gave the first one lr 0."""
    model = torch.nn.Linear(3, 1)
    for p in model.parameters():
        p.requires_grad_(True)
    opt, sched = make_optimizer(model, OptimSettings(lr=1e-3, warmup_ratio=0.1), total_steps=5)
    before = model.weight.detach().clone()
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step uses
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if len(lrs) == 1:
            assert not torch.equal(model.weight, before)  # the first step moved the weights
    # warm-up ceil(0.1 * 5) = 1 step at 1/2, then cosine over 4: 1, cos^2(pi/8), 1/2, sin^2(pi/8)
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 4)), 5e-4,
                                 1e-3 * 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_minibatches_are_epochs_of_permutations_or_exactly_steps():
    by_epochs = minibatches(5, 2, 2, 0, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    first, second = rng.permutation(5).tolist(), rng.permutation(5).tolist()
    assert by_epochs == [first[0:2], first[2:4], first[4:], second[0:2], second[2:4], second[4:]]
    # steps=4 over 5 items at batch 2: 3 minibatches per pass, so 2 passes cut after the 4th minibatch; epochs ignored
    assert minibatches(5, 2, 7, 4, np.random.default_rng(0)) == by_epochs[:4]
    assert minibatches(5, 2, 1, 9, np.random.default_rng(0))[6:] != []  # passes repeat as needed
    assert len(minibatches(5, 2, 1, 9, np.random.default_rng(0))) == 9
    assert minibatches(0, 2, 3, 4, np.random.default_rng(0)) == []  # no items: no update, not a loop
