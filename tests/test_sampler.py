"""The window sampler: contiguous windows with shifted targets, a per-epoch permutation fixed by seed and epoch,
and the same global batch (and val set) for any rank count and gradient accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaletrain.data.sampler import WindowStream, eval_window_ids, micro_batch_ids
from scaletrain.errors import UserError


def test_windows_are_contiguous_and_targets_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowStream(tokens, seq_len=16, seed=0)
    assert s.num_windows == (1000 - 1) // 16
    ids = np.array([0, 5, s.num_windows - 1])
    x, y = s.batch(ids)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    for row, w in enumerate(ids):
        assert x[row].tolist() == list(range(w * 16, w * 16 + 16))
        assert y[row].tolist() == list(range(w * 16 + 1, w * 16 + 17))


def test_too_short_split_is_a_user_error():
    with pytest.raises(UserError, match="seq_len"):
        WindowStream(np.arange(16), seq_len=16, seed=0, split="val")
    assert WindowStream(np.arange(17), seq_len=16, seed=0).num_windows == 1


def test_permutation_deterministic_per_seed_and_epoch():
    tokens = np.arange(50 * 8 + 1)
    a, b, c = WindowStream(tokens, 8, seed=1), WindowStream(tokens, 8, seed=1), WindowStream(tokens, 8, seed=2)
    n = a.num_windows
    assert n == 50
    e0, e1 = a.window_ids(0, n), a.window_ids(n, n)
    assert sorted(e0) == sorted(e1) == list(range(n))  # each epoch is a permutation
    assert not np.array_equal(e0, e1)  # reshuffled per epoch
    assert np.array_equal(b.window_ids(n, n), e1) and np.array_equal(b.window_ids(0, n), e0)  # any access order
    assert not np.array_equal(c.window_ids(0, n), e0)  # another seed, another order
    # Crossing an epoch boundary continues into the next epoch's permutation.
    assert np.array_equal(a.window_ids(n - 3, 7), np.concatenate([e0[-3:], e1[:4]]))
    assert np.array_equal(a.window_ids(3 * n + 5, 2), a.window_ids(3 * n, 10)[5:7])


def _step_windows(stream, consumed, world, accum, micro):
    ids = []
    for rank in range(world):
        for micro_step in range(accum):
            start, count = micro_batch_ids(consumed, micro_step, rank, world, micro)
            ids.extend(stream.window_ids(start, count).tolist())
    return ids


@pytest.mark.parametrize("micro", [1, 3])
def test_global_batch_same_for_any_world_and_accum(micro):
    stream = WindowStream(np.arange(37 * 4 + 1), 4, seed=3)  # 37 windows: steps cross epochs
    layouts = [(1, 2), (2, 1)] if micro == 3 else [(1, 4), (2, 2), (4, 1)]
    per_step = micro * layouts[0][0] * layouts[0][1]
    for step in range(15):
        consumed = step * per_step
        sets = []
        for world, accum in layouts:
            ids = _step_windows(stream, consumed, world, accum, micro)
            assert len(ids) == per_step
            sets.append(sorted(ids))
        assert all(s == sets[0] for s in sets), f"step {step}: {sets}"
        assert sets[0] == sorted(stream.window_ids(consumed, per_step).tolist())


def test_eval_windows_same_for_any_world():
    """The val set does not depend on the world size (8 windows of 100 on 3 ranks: the same 8, not 6 others)."""
    from scaletrain.data.sampler import eval_window_count

    for num_windows, requested in [(100, 8), (5, 8), (1, 3), (64, 64), (1000, 7), (100, 1)]:
        total = eval_window_count(requested, num_windows)
        assert total == min(requested, num_windows)
        ref, real = eval_window_ids(num_windows, total, 0, 1)
        ref = ref.tolist()
        assert real == len(ref) == total == len(set(ref)) and all(0 <= w < num_windows for w in ref)
        for world in (2, 3, 4, 6):
            parts = [eval_window_ids(num_windows, total, r, world) for r in range(world)]
            assert sorted(sum((ids[:n].tolist() for ids, n in parts), [])) == sorted(ref), (num_windows, total, world)
            assert len({len(ids) for ids, _ in parts}) == 1, "every rank runs the same number of forwards"
