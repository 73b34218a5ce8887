"""Variants in real DeepSpeed runs: 2 ranks under ZeRO-3 (with activation checkpointing) / ZeRO-1 equal 1 rank with
the same global batch, resume from a checkpoint is exact, and `scaletrain grow` of a variant run's checkpoint is
exact."""

from __future__ import annotations

import json
import shutil

import pytest

from launch_utils import run_cli
from launch_utils import TINY, run_training, small_corpus, tb_scalars

pytestmark = pytest.mark.slow

# everything that changes the block at once (LayerNorm with biases, relu2, qk-norm, window, parallel) ...
BLOCK = ["model.norm=layernorm", "model.ffn=relu2", "model.bias=true", "model.qk_norm=true",
         "model.attention_window=16", "model.parallel_block=true"]
# ... and the position switch (ALiBi, with the MPT-compatible LayerNorm + GELU)
ALIBI = ["model.position=alibi", "model.norm=layernorm", "model.ffn=gelu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("variant_runs")
    corpus = small_corpus(root / "corpus")
    return [*TINY, f"data.source={corpus}", f"data.cache_dir={root / 'cache'}", "train.precision=fp32"]


@pytest.mark.parametrize("switches,stage", [(BLOCK, 3), (ALIBI, 1)], ids=["block-zero3", "alibi-zero1"])
def test_two_ranks_equal_one_and_resume_is_exact(base, tmp_path, switches, stage):
    common = [*base, *switches, "train.max_steps=4"]
    ref = tmp_path / "ref"
    run_training(1, [*common, f"run.dir={ref}", "zero.stage=0", "train.grad_accum=2", "train.save_every=0"])
    run = tmp_path / "run"
    # the ZeRO-3 run also recomputes its layers in the backward (train.activation_checkpointing): the same numbers
    recompute = ["train.activation_checkpointing=true"] if stage == 3 else []
    args = [*common, f"run.dir={run}", f"zero.stage={stage}", "train.save_every=2", *recompute]
    run_training(2, args)
    expected, got = tb_scalars(ref, "train/loss"), tb_scalars(run, "train/loss")
    ref_grad, grad = tb_scalars(ref, "train/grad_norm"), tb_scalars(run, "train/grad_norm")
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1]
    for s in expected:
        assert got[s] == pytest.approx(expected[s], rel=2e-5), f"ZeRO-{stage} loss differs at step {s}"
        assert grad[s] == pytest.approx(ref_grad[s], rel=1e-4), f"ZeRO-{stage} grad-norm differs at step {s}"
    # resume: drop the last checkpoint, run the same command again -> steps 3, 4 are recomputed identically
    shutil.rmtree(run / "checkpoints" / "global_step4")
    proc = run_training(2, args)
    assert "resumed from" in proc.stdout and "global_step2" in proc.stdout
    again = tb_scalars(run, "train/loss")
    assert [again[s] for s in (3, 4)] == [got[s] for s in (3, 4)]


def test_grow_a_variant_run_is_exact(base, tmp_path):
    run = tmp_path / "parent"
    run_training(2, [*base, *BLOCK, "train.max_steps=3", "zero.stage=2", f"run.dir={run}"])
    child = tmp_path / "child"
    rc, out, err = run_cli("grow", str(run), "--out", str(child), "--set", "model.hidden_size=128", "model.num_heads=8",
                           "model.num_kv_heads=4", "model.intermediate_size=344", "model.num_layers=3",
                           "--check-seq-len", "48", timeout=300)
    assert rc == 0, err[-2000:]
    check = json.loads((child / "lineage.json").read_text())["grow"]["check"]
    print(f"grown layernorm/relu2/bias/qk-norm/window/parallel run: max |dlogits| {check['max_abs_dlogits']:.2e}")
    assert check["max_abs_dlogits"] < 1e-4 and check["child_loss"] == pytest.approx(check["parent_loss"], abs=1e-4)
    rc, out, err = run_cli("grow", str(run), "--out", str(tmp_path / "bad"), "--set", "model.norm=rmsnorm", "model.num_layers=4")
    assert rc == 2 and "growth keeps the architecture" in err
