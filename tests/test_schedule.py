"""The lr schedule (train.lr, min_lr, warmup_steps, max_steps; growth re-warmup): the values at its corners."""

from __future__ import annotations

import math

import pytest

from scaletrain.train.schedule import lr_at

LR, MIN = 1e-3, 1e-4


def test_warmup_then_cosine_reaches_min_lr_at_the_last_step():
    steps = [lr_at(s, LR, MIN, 2, 7) for s in range(7)]  # the 7 steps a max_steps=7 run takes (0-based)
    assert steps[:3] == pytest.approx([LR / 2, LR, LR])  # warmup ends at lr; the decay starts from it
    assert steps[-1] == pytest.approx(MIN)  # the last step trains at min_lr, as the config says
    assert steps[3] == pytest.approx(MIN + (LR - MIN) * (1 + math.cos(math.pi / 4)) / 2)  # a quarter of the way
    assert steps[4] == pytest.approx((LR + MIN) / 2)
    assert all(a > b for a, b in zip(steps[2:], steps[3:]))


def test_no_warmup_and_a_single_step():
    assert lr_at(0, LR, MIN, 0, 5) == pytest.approx(LR) and lr_at(4, LR, MIN, 0, 5) == pytest.approx(MIN)
    assert lr_at(0, LR, MIN, 0, 1) == pytest.approx(LR)  # one step: no room to decay


def test_rewarmup_after_a_growth_boundary_ramps_to_the_schedule():
    plain = lr_at(6, LR, MIN, 2, 20)
    assert lr_at(5, LR, MIN, 2, 20, restarts=(5,), rewarmup=2) == pytest.approx(lr_at(5, LR, MIN, 2, 20) / 2)
    assert lr_at(6, LR, MIN, 2, 20, restarts=(5,), rewarmup=2) == pytest.approx(plain)
