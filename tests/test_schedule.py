"""The lr schedule (train.lr, min_lr, warmup_steps, max_steps, lr_schedule, decay_steps; growth re-warmup): the
values at its corners."""

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


def test_linear_constant_and_warmup_stable_decay():
    linear = [lr_at(s, LR, MIN, 2, 7, kind="linear") for s in range(7)]
    assert linear[:3] == pytest.approx([LR / 2, LR, LR]) and linear[-1] == pytest.approx(MIN)
    assert linear[4] == pytest.approx((LR + MIN) / 2)  # halfway, on a straight line
    assert [lr_at(s, LR, MIN, 2, 7, kind="constant") for s in range(7)] == pytest.approx([LR / 2] + [LR] * 6)
    wsd = [lr_at(s, LR, MIN, 2, 12, kind="wsd", decay_steps=4) for s in range(12)]
    assert wsd[:8] == pytest.approx([LR / 2] + [LR] * 7)  # warmup, then stable until the last 4 steps
    assert wsd[8:] == pytest.approx([LR + (MIN - LR) * q for q in (0.25, 0.5, 0.75, 1.0)])
    # extending a run still in its stable phase leaves every step taken so far as it was
    longer = [lr_at(s, LR, MIN, 2, 20, kind="wsd", decay_steps=4) for s in range(20)]
    assert longer[:8] == pytest.approx(wsd[:8]) and longer[-1] == pytest.approx(MIN)
    # decay_steps 0: the last 20 % of the steps after warmup (here 2 of 10)
    default = [lr_at(s, LR, MIN, 2, 12, kind="wsd") for s in range(12)]
    assert default[9] == pytest.approx(LR) and default[10] == pytest.approx((LR + MIN) / 2) and default[11] == pytest.approx(MIN)


def test_the_scheduler_deepspeed_steps_follows_the_config():
    import torch

    from scaletrain.config import load_config
    from scaletrain.train.schedule import LrSchedule, train_lr_at

    t = load_config(None, ["train.lr_schedule=wsd", "train.decay_steps=3", "train.max_steps=10", "train.warmup_steps=2"]).train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = LrSchedule.of(opt, t)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([train_lr_at(s, t) for s in range(10)])
    assert seen[6] == pytest.approx(t.lr) and seen[7] < t.lr and seen[9] == pytest.approx(t.min_lr)


@pytest.mark.parametrize("sets, message", [
    (["train.decay_steps=5"], "train.decay_steps is the decay of train.lr_schedule=wsd"),
    (["train.lr_schedule=wsd", "train.max_steps=10", "train.warmup_steps=4", "train.decay_steps=7"], "exceeds the 6 steps"),
    (["train.lr_schedule=step"], "lr_schedule"),
])
def test_schedule_settings_that_cannot_hold(sets, message):
    from scaletrain.config import load_config
    from scaletrain.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(None, sets)


def test_the_last_step_takes_min_lr_exactly():
    """lr + (min_lr - lr) * 1.0 landed a hair above min_lr (6.000000000000005e-05), and the start's warning,
    which asks whether the last step reaches min_lr, fired on every linear and wsd run of 6e-4 -> 6e-5."""
    for kind in ("linear", "wsd", "cosine"):
        for steps in range(3, 300, 7):
            assert lr_at(steps - 1, 6e-4, 6e-5, 1, steps, kind=kind) == 6e-5, (kind, steps)
