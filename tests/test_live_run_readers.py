"""Reading a run while it trains: `export-hf` and `eval` of a run dir whose trainer saves and prunes every step
(train.keep_last=1). They failed nearly every time: the tag they had picked was pruned mid-read and they
called the checkpoint damaged. A read lock on the tag now keeps it until a later save."""

from __future__ import annotations

import pytest

from launch_utils import TINY, kill_group, run_cli, run_training, small_corpus, start_training, wait_for

pytestmark = pytest.mark.slow


def test_export_eval_and_init_from_of_a_run_that_prunes_every_step(tmp_path, data_cache_dir):
    run = tmp_path / "run"
    data = [f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={data_cache_dir}", "train.precision=fp32"]
    proc = start_training(1, [*TINY, *data, f"run.dir={run}", "train.max_steps=100000", "train.save_every=1",
                              "train.keep_last=1"])
    try:
        assert wait_for((run / "checkpoints" / "latest").exists, timeout=180)
        assert any((run / "checkpoints").glob("global_step*/reading.lock"))  # a file: NFS shares locks on files only
        rc, out, err = run_cli("export-hf", str(run), "--out", str(tmp_path / "hf"))  # (failed nearly every time)
        assert rc == 0, err[-2000:]
        rc, out, err = run_cli("eval", str(run), "--max-batches", "1")
        assert rc == 0, err[-2000:]
        # a child run started from it: rank 0 pins the newest tag, which must last until the weights are loaded
        run_training(1, [*TINY, *data, f"run.dir={tmp_path / 'child'}", f"init.from={run}", "train.max_steps=2"])
        assert proc.poll() is None, "the training stopped"
    finally:
        kill_group(proc)
