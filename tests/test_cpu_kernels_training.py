"""End to end: a 2-rank ZeRO-2 run with scaletrain's CPU kernels (attention + cross-entropy + SwiGLU), in
bf16 (AVX-512-BF16 / AMX) and in fp32 (AVX-512 or AVX2 build), follows the same run with PyTorch's kernels
(SCALETRAIN_CPU_KERNELS=torch), step for step, within the precision's noise. The oracle is PyTorch's own
kernels on the same data, init and schedule."""

from __future__ import annotations

import pytest
from launch_utils import TINY, run_training, small_corpus, tb_scalars

from scaletrain.kernels import cpu_attention

STEPS = 16


# (precision, loss at step 1 within, every step within): the first step differs by rounding only
TOLERANCES = {"bf16": (5e-3, 3e-2), "fp32": (1e-5, 1e-3)}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_run_with_our_kernels_tracks_pytorch_kernels(precision, tmp_path, monkeypatch):
    if not cpu_attention.kernel_ready(bf16=precision == "bf16"):
        pytest.skip("needs AMX or AVX-512-BF16 and a C++ compiler" if precision == "bf16"
                    else "needs AVX2 or AVX-512 and a C++ compiler")
    corpus = small_corpus(tmp_path / "corpus")
    base = [*TINY, "model.hidden_size=128", "model.num_heads=2", "model.num_kv_heads=1",  # head size 64
            "model.intermediate_size=256", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.precision={precision}", "train.loss_chunk=48", f"train.max_steps={STEPS}", "train.lr=3e-3"]
    ours = run_training(2, [*base, f"run.dir={tmp_path / 'ours'}"])
    kernels = next(line for line in ours.stdout.splitlines() if line.startswith("CPU kernels: "))
    assert "attention" in kernels and "cross-entropy" in kernels and "not used" not in kernels, kernels
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    theirs = run_training(2, [*base, f"run.dir={tmp_path / 'torch'}"])
    assert "CPU kernels: off" in theirs.stdout
    a, b = tb_scalars(tmp_path / "ours", "train/loss"), tb_scalars(tmp_path / "torch", "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    first, every = TOLERANCES[precision]
    assert a[1] == pytest.approx(b[1], rel=first)  # same weights and batch: forward differs by rounding only
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=every), step
    assert a[STEPS] < a[1] - 0.5  # and it learns
