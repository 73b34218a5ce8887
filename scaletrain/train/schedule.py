"""Learning rate: linear warmup to `lr`, then cosine decay to `min_lr`, which the last step takes."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int,
          restarts: tuple[int, ...] = (), rewarmup: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken). `restarts`: growth
    boundaries (growth.schedule); for `rewarmup` steps after each the lr ramps up again linearly to the
    value the schedule has reached (the schedule itself continues)."""
    if warmup and step < warmup:
        value = lr * (step + 1) / warmup
    else:
        span = max(1, max_steps - 1 - warmup)  # step warmup takes lr, step max_steps - 1 (the last) min_lr
        progress = min(1.0, (step - warmup) / span)
        value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    last = max((b for b in restarts if b <= step), default=None)
    if rewarmup and last is not None and step - last < rewarmup:
        value *= (step - last + 1) / rewarmup
    return value


class WarmupCosine:
    """Scheduler object DeepSpeed steps after each optimizer step (and saves in its checkpoints)."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup: int, max_steps: int,
                 restarts: tuple[int, ...] = (), rewarmup: int = 0):
        self.optimizer = optimizer
        self.args = (lr, min_lr, warmup, max_steps, tuple(restarts), rewarmup)
        self.steps_done = 0
        self._apply()

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
