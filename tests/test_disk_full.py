"""A disk that fills up under a run or a command, on a real (small) tmpfs: training goes on without its
TensorBoard events and checkpoints and resumes once space is back; commands that write outputs say so in one
line (exit 2) and leave nothing half-written. (Checkpoints always leave 64 MB free: disk_space.py.) Needs root to mount; skipped (saying so) elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from launch_utils import TINY, communicate_or_kill, run_cli, small_corpus, start_training


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1):  # then the last partial block
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def test_training_goes_on_when_the_disk_fills_and_resumes_when_space_is_back(small_disk, data_cache_dir, tmp_path):
    """The first TensorBoard flush after the disk filled up raised out of the loop: a traceback, and status.json
    still said "running". Now the run finishes its steps, says what it could not write, and the same command
    resumes from the last checkpoint that made it to disk."""
    run = small_disk / "run"
    overrides = [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={data_cache_dir}",
                 f"run.dir={run}", "train.max_steps=30", "train.save_every=5", "train.keep_last=1"]
    proc = start_training(1, overrides)
    try:
        while True:
            line = proc.stdout.readline()
            assert line, "training ended before its first checkpoint"
            if line.startswith("saved checkpoint"):
                break
        filler = fill(small_disk)
        out = line + communicate_or_kill(proc, 300, "training did not finish")[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-6000:]
    assert "warning: TensorBoard logging stopped" in out and "NOT saved" in out, out[-3000:]
    saved = (run / "checkpoints" / "latest").read_text()
    filler.unlink()
    again = start_training(1, overrides)
    out2 = communicate_or_kill(again, 300, "the resumed run did not finish")[0]
    assert again.returncode == 0 and f"resumed from {run / 'checkpoints' / saved}" in out2, out2[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 30), status


def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(small_disk, data_cache_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={data_cache_dir}",
                 f"run.dir={run}", "train.max_steps=2", "model.hidden_size=256", "model.intermediate_size=688",
                 "model.num_heads=4", "model.num_kv_heads=4"]
    trained = start_training(1, overrides)
    out = communicate_or_kill(trained, 300, "training did not finish")[0]
    assert trained.returncode == 0, out[-3000:]
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size - (1 << 20))  # 1 MB left: the export starts and runs out of space
    before = sorted(p.name for p in small_disk.iterdir())
    rc, _, stderr = run_cli("export-hf", str(run), "--out", str(small_disk / "hf"), timeout=300)  # ~11 MB of weights
    assert rc == 2 and "No space left on device" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in small_disk.iterdir()) == before  # no temp dir left behind


def test_a_data_cache_build_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path):
    """numpy's tofile reported a full disk as 'OSError: 9960 requested and 1897 written', with no errno: a traceback."""
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size - (200 << 10))  # room for the tokenizer, not for the tokens
    rc, _, stderr = run_cli("prepare-data", "--config", "configs/tiny.yaml", "--set",
                            f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={small_disk / 'cache'}",
                            "model.vocab_size=512", timeout=300)
    assert rc == 2 and "No space left on device" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_log_file_on_the_full_disk_does_not_stop_training(small_disk, data_cache_dir, tmp_path):
    """SLURM writes the job's output into run.dir (slurm-<job>.out), on the disk that fills up: the next step line
    raised ENOSPC out of print and the run died mid-line. Lines are dropped while the disk is full."""
    import time

    from launch_utils import REPO, env, train_cmd

    run, log = small_disk / "run", small_disk / "slurm.out"
    overrides = [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={data_cache_dir}",
                 f"run.dir={run}", "train.max_steps=30", "train.save_every=5", "train.keep_last=1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(1, overrides), cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        while "saved checkpoint" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        fill(small_disk)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run / "checkpoints" / "latest").is_file()
