"""The fine-tune path shared by every task (LM, prompt/completion, classification): parameter groups with a
lower body lr and frozen parts, starting a classifier from a language model, val accuracy/F1, early stopping, and
the per-token weighting of prompt/completion micro-batches.

Freezing (`train.freeze`) gives the parameters lr 0 and a gradient hook that zeroes their gradient, so they
never move (AdamW's step and decay are both multiplied by lr) and do not count in gradient clipping, while
they stay in the optimizer: every ZeRO stage's checkpoint then holds them like any other parameter, and
export, growth and resume read them unchanged.

Parameter groups are consecutive runs (in parameter order) of matrices, then of vectors, with the same lr
scale, so the groups concatenated list the matrices then the vectors in parameter order -- the layout the
ZeRO-0 checkpoint readers rely on (weights/zero.py, growth/ds_reader.py) -- whatever is frozen.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from scaletrain.config import Config
from scaletrain.errors import UserError
from scaletrain.model.variants import parse_freeze_item

HEADS = ("lm_head.weight", "score.weight")


def frozen_names(model: torch.nn.Module, cfg: Config) -> set[str]:
    names = set()
    parts = [parse_freeze_item(item, cfg.model.num_layers) for item in cfg.train.freeze]
    for name, _ in model.named_parameters():
        for part, layers in parts:
            if (part == "embeddings" and name.startswith("model.embed_tokens.")) \
                    or (part == "norm" and name.startswith("model.norm.")) \
                    or (part == "head" and name in HEADS) \
                    or (part == "layers" and name.startswith("model.layers.") and int(name.split(".")[2]) in layers):
                names.add(name)
    return names


def lr_scale(name: str, frozen: set[str], cfg: Config) -> float:
    if name in frozen:
        return 0.0
    return 1.0 if name in HEADS else cfg.train.body_lr_scale  # a tied lm_head is the embedding: body


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: weight decay on matrices only; `lr_scale` per group (schedule.LrSchedule applies it)."""
    frozen = frozen_names(model, cfg)
    groups: list[dict] = []
    for matrices in (True, False):
        for name, p in model.named_parameters():
            if (p.ndim >= 2) != matrices:
                continue
            scale = lr_scale(name, frozen, cfg)
            if not groups or groups[-1]["lr_scale"] != scale or groups[-1]["matrices"] != matrices:
                groups.append({"params": [], "weight_decay": cfg.train.weight_decay if matrices else 0.0,
                               "lr_scale": scale, "matrices": matrices})
            groups[-1]["params"].append(p)
    for g in groups:
        del g["matrices"]
    return groups


def freeze(model: torch.nn.Module, cfg: Config) -> int:
    """Zero the gradients of frozen parameters (before DeepSpeed wraps the model); returns how many."""
    frozen = frozen_names(model, cfg)
    for name, p in model.named_parameters():
        if name in frozen:
            p.register_hook(torch.zeros_like)
    return len(frozen)


def load_body(model: torch.nn.Module, src) -> None:
    """A classifier started from a language model: every body tensor is copied, the LM head is dropped and
    `score` keeps its fresh init. Shape mismatches are one line, nothing copied."""
    from scaletrain.weights.sources import shape_problems, summarise

    own = {n: t for n, t in model.state_dict().items() if n != "score.weight"}
    specs = [s for s in src.specs() if s[0] != "lm_head.weight"]
    problems = shape_problems(specs, {n: tuple(t.shape) for n, t in own.items()})
    if problems:
        raise UserError(f"init.from {src.path} does not match the model: {summarise(problems)}")
    with torch.no_grad():
        for name, t in src.tensors():
            if name in own:
                own[name].copy_(t)


# ---- validation metrics of a classifier ------------------------------------------------------------


def check_labels(cfg: Config, *streams) -> None:
    """Every label id must be < model.num_labels (found at start, not as a cross-entropy error mid-run)."""
    for stream in streams:
        top = getattr(stream, "max_label", None)
        if top is not None and top >= cfg.model.num_labels:
            raise UserError(f"data.source {cfg.data.source} has label {top}, but model.num_labels is "
                            f"{cfg.model.num_labels} (labels are class ids 0..num_labels-1)")


def confusion_update(conf: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """conf[true, predicted] += counts."""
    pred = logits.argmax(-1).cpu()
    k = conf.shape[0]
    conf += torch.bincount(labels.cpu() * k + pred, minlength=k * k).view(k, k).to(conf.dtype)


def classification_metrics(conf: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 (mean over classes present in labels or predictions) from a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    support, predicted = conf.sum(1), conf.sum(0)
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    present = (support + predicted) > 0
    total = float(conf.sum())
    return {"accuracy": float(tp.sum()) / max(total, 1.0), "f1": float(f1[present].mean()) if present.any() else 0.0}


class EarlyStop:
    """Stop after `patience` evaluations without improvement of `metric` (lower loss, higher accuracy/F1)."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.patience = t.early_stop_patience
        self.metric = t.early_stop_metric or ("val/accuracy" if t.task == "classify" else "val/loss")
        self.best: Optional[float] = None
        self.bad = 0

    def update(self, values: dict) -> bool:
        """Record one evaluation; True when training should stop."""
        value = values.get(self.metric)
        if not self.patience or value is None or math.isnan(value):
            return False
        better = self.best is None or (value < self.best if self.metric == "val/loss" else value > self.best)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.stopped()

    def stopped(self) -> bool:
        """Whether the evaluations so far (restored on resume) already ended the run."""
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "bad_evals": self.bad}

    def load(self, state: Optional[dict]) -> None:
        if state and state.get("metric") == self.metric:
            self.best, self.bad = state.get("best"), int(state.get("bad_evals", 0))


def token_weights(cfg: Config, targets: list[torch.Tensor], world: int) -> Optional[list[float]]:
    """Collective. Prompt/completion windows count different numbers of tokens. Each micro-batch's loss is a mean
    over its own tokens, and DeepSpeed averages micro-batches and ranks with equal weight: scaled by
    tokens · micro-batches · ranks / the step's tokens, every counted token of the global batch weighs the same
    however the batch is split (grad_accum, ranks), and the logged loss is the per-token mean, as val/loss is.
    None where every window counts the same (text, classification)."""
    if cfg.data.format != "prompt_completion":
        return None
    from scaletrain.model.loss import IGNORE_INDEX
    from scaletrain.train.distributed import all_reduce_sum

    counts = [float((y != IGNORE_INDEX).sum()) for y in targets]
    step_tokens = all_reduce_sum([sum(counts)])[0]
    scale = len(targets) * world / max(step_tokens, 1.0)
    return [c * scale for c in counts]
