"""Fixed-length windows over the packed token stream, shuffled per epoch, sharded by rank.

The data position is one integer: `consumed` = windows already used by all ranks together. A global
step takes the next `global_batch` windows from one deterministic stream (a permutation per epoch
seeded by `seed` and the epoch), so the same global batch is seen whatever the world size or grad
accumulation — the basis for exact resume and for 1-rank vs N-rank parity.
"""

from __future__ import annotations

import numpy as np
import torch

from scaletrain.errors import UserError


def seq_len_name(split: str) -> str:
    """The knob a user turns to change the window length: `scaletrain eval` reads windows of --seq-len."""
    return "--seq-len" if split == "eval" else "train.seq_len"


class WindowStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, split: str = "train"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(
                f"the {split} split has {len(tokens)} tokens, fewer than {seq_len_name(split)}+1 = {seq_len + 1}; "
                f"lower {seq_len_name(split)} or add data"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def fit_note(self) -> str | None:
        """A line for the log when some of the split does not fit the window (packed text always does)."""
        return None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window ids of global samples start .. start+count-1 (may cross an epoch boundary)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            g = start + i
            out[i] = self._permutation(g // self.num_windows)[g % self.num_windows]
        return out

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [len(window_ids), seq_len] int64; targets are inputs shifted by one."""
        t = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * t : w * t + t + 1], dtype=np.int64) for w in window_ids])
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


def micro_batch_ids(consumed: int, micro_step: int, rank: int, world: int, micro_batch: int) -> tuple[int, int]:
    """(start, count) in the global stream of the `micro_step`-th micro-batch of `rank` within the
    step that begins at `consumed`. Micro-batches interleave across ranks: (a * world + rank)."""
    return consumed + (micro_step * world + rank) * micro_batch, micro_batch


def eval_window_count(requested: int, num_windows: int) -> int:
    """How many val windows to evaluate: `requested`, at most what the split has (any world size: the same)."""
    return min(max(requested, 1), num_windows)


def eval_window_ids(num_windows: int, total: int, rank: int, world: int) -> tuple[np.ndarray, int]:
    """A fixed, evenly spread set of `total` val windows (the same for any world size), split round-robin:
    (this rank's window ids, how many of them count). Every rank gets ceil(total / world) ids, so every rank
    runs the same number of forwards (ZeRO-3's are collective); the ranks short of a window repeat their first
    one, which does not count."""
    total = min(total, num_windows)
    ids = np.linspace(0, num_windows - 1, total).round().astype(np.int64)
    mine, per_rank = ids[rank::world], -(-total // world)
    pad = np.full(per_rank - len(mine), ids[0] if total else 0, dtype=np.int64)
    return np.concatenate([mine, pad]), len(mine)
