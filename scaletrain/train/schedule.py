"""Learning rate: linear warmup to `lr`, then (train.lr_schedule) down to `min_lr`, which the last step takes
(but `constant`'s):

    cosine    half a cosine from lr to min_lr over the steps after warmup (the default)
    linear    a straight line from lr to min_lr
    constant  lr to the end (min_lr unused)
    wsd       warmup-stable-decay: lr until the last `decay_steps` steps, then a straight line to min_lr. Raising
              train.max_steps of a run still in its stable phase extends it without changing a step already
              taken (cosine and linear would stretch the whole decay), which suits continued and staged training.
"""

from __future__ import annotations

import math

WSD_DECAY_SHARE = 0.2  # decay_steps 0: the last 20 % of the steps after warmup


def wsd_decay_steps(warmup: int, max_steps: int, decay_steps: int) -> int:
    after = max(1, max_steps - warmup)
    return min(after, decay_steps or max(1, round(WSD_DECAY_SHARE * after)))


def check_schedule(t) -> None:
    """Config rules of the train section's schedule keys (config.py calls this)."""
    if t.decay_steps and t.lr_schedule != "wsd":
        raise ValueError(f"train.decay_steps is the decay of train.lr_schedule=wsd (this run's is {t.lr_schedule}); "
                         "set train.lr_schedule=wsd or leave decay_steps at 0")
    if t.decay_steps and t.warmup_steps >= t.max_steps:
        raise ValueError(f"train.decay_steps needs steps after warmup: train.warmup_steps ({t.warmup_steps}) >= "
                         f"train.max_steps ({t.max_steps}); lower train.warmup_steps")
    if t.decay_steps and t.decay_steps > t.max_steps - t.warmup_steps:
        raise ValueError(f"train.decay_steps ({t.decay_steps}) exceeds the {t.max_steps - t.warmup_steps} steps after "
                         f"warmup (train.max_steps {t.max_steps} - train.warmup_steps {t.warmup_steps}); lower it")


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int,
          restarts: tuple[int, ...] = (), rewarmup: int = 0, kind: str = "cosine", decay_steps: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken). `restarts`: growth
    boundaries (growth.schedule); for `rewarmup` steps after each the lr ramps up again linearly to the
    value the schedule has reached (the schedule itself continues)."""
    if warmup and step < warmup:
        value = lr * (step + 1) / warmup
    elif kind == "constant":
        value = lr
    elif kind == "wsd":
        decay = wsd_decay_steps(warmup, max_steps, decay_steps)
        start = max_steps - decay  # steps start .. max_steps - 1 decay; the last takes min_lr
        done = min(1.0, (step - start + 1) / decay)
        value = lr if step < start else (min_lr if done >= 1 else lr + (min_lr - lr) * done)  # (exactly min_lr: the
        # warmup warning compares with it, and lr + (min_lr - lr) * 1.0 lands a hair above)
    else:
        span = max(1, max_steps - 1 - warmup)  # step warmup takes lr, step max_steps - 1 (the last) min_lr
        progress = min(1.0, (step - warmup) / span)
        if kind == "linear":
            value = min_lr if progress >= 1 else lr + (min_lr - lr) * progress
        else:
            value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    last = max((b for b in restarts if b <= step), default=None)
    if rewarmup and last is not None and step - last < rewarmup:
        value *= (step - last + 1) / rewarmup
    return value


def _args_of(t, restarts: tuple[int, ...], rewarmup: int) -> tuple:
    """`lr_at`'s arguments after the step, from the train section `t` of a config."""
    return t.lr, t.min_lr, t.warmup_steps, t.max_steps, tuple(restarts), rewarmup, t.lr_schedule, t.decay_steps


def train_lr_at(step: int, t, restarts: tuple[int, ...] = (), rewarmup: int = 0) -> float:
    """`lr_at` for the train section `t` of a config."""
    return lr_at(step, *_args_of(t, restarts, rewarmup))


class LrSchedule:
    """Scheduler object DeepSpeed steps after each optimizer step (and saves in its checkpoints)."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup: int, max_steps: int,
                 restarts: tuple[int, ...] = (), rewarmup: int = 0, kind: str = "cosine", decay_steps: int = 0):
        self.optimizer = optimizer
        self.args = (lr, min_lr, warmup, max_steps, tuple(restarts), rewarmup, kind, decay_steps)
        self.steps_done = 0
        self._apply()

    @classmethod
    def of(cls, optimizer, t, restarts: tuple[int, ...] = (), rewarmup: int = 0) -> "LrSchedule":
        """The schedule of the train section `t` of a config."""
        return cls(optimizer, *_args_of(t, restarts, rewarmup))

    def _apply(self) -> None:
        value = lr_at(self.steps_done, *self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)  # train.body_lr_scale / train.freeze (finetune.py)

    def step(self, *_, **__) -> None:
        self.steps_done += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self._apply()
