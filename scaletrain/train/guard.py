"""NaN/Inf guard: a step whose loss or gradient norm is not finite changes nothing and is counted.

Why the checks live where they do:
- The loss is all-reduced *before* the optimizer step of the last micro-batch (the mean is computed
  anyway; only its place moved), so every rank sees the same verdict even when one rank's batch alone
  went bad.
- The gradient norm is global by construction (DeepSpeed all-reduces it under ZeRO-1/2/3; under ZeRO-0
  every rank holds the same averaged gradients), so every rank agrees on it too.
- Skipping has to happen inside DeepSpeed's step, which is collective and must still run on all ranks.
  DeepSpeed's ZeRO optimizers already drop a step whose norm is inf/NaN (they treat it as an fp16
  overflow); ZeRO-0 fp32 would apply it. So the base torch optimizer's `step` is wrapped: it does
  nothing when this step is bad. Either way the fp32 masters, Adam moments and Adam's step count stay
  as they were (the test compares checkpoints before and after a skipped step).
- A skipped step still consumes its data and its slot of the lr schedule (as Megatron counts skipped
  iterations): the schedule is stepped here when DeepSpeed's overflow path did not.
In fp16 a finite loss with an inf/NaN gradient norm is a loss-scale overflow: DeepSpeed's dynamic loss scaler
skips that step and lowers the scale (routinely at the start, and after each scale-up), so it is counted in
`train/skipped_steps` but not towards divergence.
After `train.max_skipped` consecutive skipped steps the run stops with `TrainingDiverged` (exit code 1,
status "failed"). Skipped steps change no weights, so any checkpoint saved during a bad streak holds the
last good weights, and nothing is saved after the abort.

Testing hook: SCALETRAIN_INJECT_NAN_AT_STEP=3,5 multiplies the loss of the first micro-batch of those
optimizer steps (1-based) by NaN on rank 0 only (SCALETRAIN_INJECT_NAN_RANK to choose another rank).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from scaletrain.errors import UserError, heard_elsewhere

INJECT_ENV, INJECT_RANK_ENV = "SCALETRAIN_INJECT_NAN_AT_STEP", "SCALETRAIN_INJECT_NAN_RANK"


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: not the user's input, so not exit code 2."""

    exit_code = 1


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(float(x))


def _fp16(engine) -> bool:
    enabled = getattr(engine, "fp16_enabled", None)
    return bool(enabled()) if callable(enabled) else False


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class StepGuard:
    def __init__(self, engine, max_skipped: int, rank: int, norm_fallback: Callable[[], Optional[float]], log=print):
        self.max_skipped, self.rank, self.log = max_skipped, rank, log
        self.norm_fallback = norm_fallback  # the trainer's own ZeRO-0 norm (DeepSpeed records none there)
        self.total = 0  # skipped steps in the whole run (kept in checkpoints)
        self.consecutive = 0
        self._loss_ok = True
        self._engine = None
        spec = os.environ.get(INJECT_ENV, "")
        self.inject_at = {int(s) for s in spec.replace(" ", "").split(",") if s}
        self.inject_rank = int(os.environ.get(INJECT_RANK_ENV, "0"))
        self.attach(engine)

    def detach(self) -> None:
        """Let go of the engine (growth frees it before building the next one)."""
        self._engine = None

    def attach(self, engine) -> None:
        """Wrap the base optimizer's step (again after growth builds a new engine)."""
        self._engine = engine
        opt = _base_optimizer(engine)
        if getattr(opt, "_scaletrain_guarded", False):
            return
        original = opt.step

        def guarded_step(*args, **kwargs):
            if not self.update_allowed():
                return None
            return original(*args, **kwargs)

        opt.step = guarded_step
        opt._scaletrain_guarded = True

    # -- per step ----------------------------------------------------------------------------------
    def inject(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        if step in self.inject_at and micro == 0 and self.rank == self.inject_rank:
            return loss * float("nan")
        return loss

    def before_update(self, engine, global_loss: float) -> None:
        """Called with the all-reduced mean loss before the optimizer step of the last micro-batch."""
        if engine is not self._engine:  # in-run growth built a new engine
            self.attach(engine)
        self._loss_ok = math.isfinite(global_loss)

    def grad_norm(self) -> Optional[float]:
        opt = self._engine.optimizer
        norm = getattr(opt, "_global_grad_norm", None) if not isinstance(opt, torch.optim.Optimizer) else None
        return self.norm_fallback() if norm is None else float(norm)

    def update_allowed(self) -> bool:
        return self._loss_ok and _finite(self.grad_norm())

    def after_update(self, step: int, loss: float) -> bool:
        """Bookkeeping after the step; returns whether it was skipped. Raises after max_skipped in a row."""
        engine = self._engine
        norm = engine.get_global_grad_norm()
        norm = self.norm_fallback() if norm is None else norm
        skipped = not (self._loss_ok and _finite(norm))
        overflow = skipped and self._loss_ok and _fp16(engine)  # the loss scaler's business, not divergence
        self._loss_ok = True
        if not skipped:
            self.consecutive = 0
            return False
        if not getattr(engine, "_step_applied", True) and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # DeepSpeed's overflow path left the schedule behind our step counter
        self.total += 1
        if overflow:
            self.log(f"step {step} skipped: fp16 gradient overflow (DeepSpeed lowers the loss scale); {self.total} "
                     "skipped in this run")
            return True
        self.consecutive += 1
        self.log(f"warning: step {step} skipped: loss {loss:.4g}, grad norm {float(norm) if norm is not None else float('nan'):.4g} "
                 f"(not finite); weights and optimizer unchanged ({self.consecutive} in a row, {self.total} in this run)")
        if self.consecutive >= self.max_skipped:
            raise heard_elsewhere(TrainingDiverged(
                f"training stopped at step {step}: the last {self.consecutive} steps all had a non-finite loss or "
                f"gradient norm (train.max_skipped={self.max_skipped}); skipped steps change no weights, so the newest "
                "checkpoint holds the last good ones: lower train.lr or raise train.warmup_steps (or check the data), then resume"),
                self.rank != 0)  # every rank reaches the same verdict (the norm and the loss check are global)
        return True
