"""Validation during training, and the data cache as every rank sees it.

val/loss is per counted token over a fixed set of val windows: the same set for any world size, the same
number of forwards on every rank (ZeRO-3 forwards are collective: a rank with fewer would hang the others),
so a rank short of a window repeats one whose targets are then ignored.
"""

from __future__ import annotations

import math
import socket
from typing import Callable, Optional

import torch

from scaletrain.config import Config
from scaletrain.data.cache import find_cache, open_cache, prepare_data
from scaletrain.data.sampler import eval_window_count, eval_window_ids
from scaletrain.errors import UserError
from scaletrain.model.loss import IGNORE_INDEX
from scaletrain.train import finetune
from scaletrain.train.distributed import Dist, all_reduce_sum, main_rank_does, stop_all_if


def load_data(cfg: Config, dist: Dist):
    """Rank 0 builds the cache when missing (however long tokenising takes); the others wait for it, then open it.
    A rank that cannot see it -- another node without the shared filesystem, or other copies of the data files
    (the cache is named after their sizes and dates) -- stops every rank with one line instead of a traceback."""
    cache = main_rank_does(lambda: prepare_data(cfg, progress=True))
    problem = None
    if not dist.is_main:
        try:  # (data.tokenizer missing on this node, a damaged node-local copy: its reason, after the agreement)
            path = find_cache(cfg)
            cache = open_cache(path)
            if cache is None:
                problem = (f"rank {dist.rank} on {socket.gethostname()} cannot see the data cache {path} rank 0 prepared: "
                           "data.cache_dir and data.source must be the same files on every node (a shared filesystem)")
        except UserError as e:
            problem = str(e)
    stop_all_if(problem, "another rank cannot see the data cache rank 0 prepared (its own error says where): "
                "data.cache_dir and data.source must be the same files on every node (a shared filesystem)")
    return cache


def validate(engine, stream, cfg: Config, dist: Dist, loss_of: Callable) -> Optional[dict]:
    """Collective. {"val/loss", "val/ppl"} (+ "val/accuracy", "val/f1" for a classifier); None when no val
    window has a target. `loss_of(x, y)`: the training loss of one micro-batch (doc masks included).
    A data.mix: each source's val split on its own ("val/<name>/loss"), and val/loss their mean weighted as
    data.mix weighs them (its own weights, in every phase of data.mix_phases)."""
    parts = getattr(stream, "parts", None)
    if parts is None:
        return _validate_stream(engine, stream, cfg, dist, loss_of)
    metrics, total, weights = {}, 0.0, 0.0
    for name, weight, part in parts:
        got = _validate_stream(engine, part, cfg, dist, loss_of)
        if got is not None:  # (the same on every rank: the sums are all-reduced)
            metrics[f"val/{name}/loss"] = got["val/loss"]
            total, weights = total + weight * got["val/loss"], weights + weight
    if not weights:
        return None
    return {"val/loss": total / weights, "val/ppl": math.exp(min(total / weights, 50)), **metrics}


@torch.no_grad()
def _validate_stream(engine, stream, cfg: Config, dist: Dist, loss_of: Callable) -> Optional[dict]:
    t = cfg.train
    total = eval_window_count(t.eval_batches * t.micro_batch_size, stream.num_windows)
    if total == 0:
        return None
    ids, real = eval_window_ids(stream.num_windows, total, dist.rank, dist.world)
    engine.eval()
    loss_sum, n, k = 0.0, 0, cfg.model.num_labels
    conf = torch.zeros(k, k, dtype=torch.float64) if k else None  # classifier: [true, predicted] counts
    for i in range(0, len(ids), t.micro_batch_size):
        chunk = ids[i : i + t.micro_batch_size]
        x, y = stream.batch(chunk)
        if real - i < len(chunk):  # repeated windows (padding a rank to the others' count) count nothing
            y = y.clone()  # (a text window's targets share memory with its inputs)
            y[max(0, real - i):] = IGNORE_INDEX
        if conf is None:  # mean over counted tokens (prompt/completion windows count different numbers)
            counted = int((y != IGNORE_INDEX).sum())
            loss = loss_of(x, y).item()
            loss_sum, n = (loss_sum + loss * counted, n + counted) if counted else (loss_sum, n)
        else:
            logits = engine(x.to(dist.device)).float()
            keep = y != IGNORE_INDEX
            loss_sum += torch.nn.functional.cross_entropy(logits[keep], y[keep].to(logits.device), reduction="sum").item()
            finetune.confusion_update(conf, logits[keep], y[keep])
            n += int(keep.sum())
    engine.train()
    sums = all_reduce_sum([loss_sum, float(n)] + (conf.flatten().tolist() if conf is not None else []))
    loss_sum, n = sums[:2]
    if n == 0:  # no window of this val set has a target token
        return None
    metrics = {"val/loss": loss_sum / n, "val/ppl": math.exp(min(loss_sum / n, 50))}
    if conf is not None:
        scores = finetune.classification_metrics(torch.tensor(sums[2:]).view(k, k))
        metrics.update({"val/accuracy": scores["accuracy"], "val/f1": scores["f1"]})
    return metrics
