"""`staged()`: how export-hf, import-hf and grow put their output dirs in place. A failure leaves nothing (not
even the parent dirs it made); a killed earlier write's temp dir is swept; a checkpoint dir is sealed by a
manifest of its weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from scaletrain.errors import UserError
from scaletrain.weights.checkpoint_dir import staged


def test_a_failed_write_removes_the_parent_dirs_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with pytest.raises(RuntimeError):
        with staged(out) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ went too (they were left behind)


def test_a_killed_writers_temp_is_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "model"
    abandoned = tmp_path / f".model.tmp-{host}-{dead.pid}-0badc0de"
    live = tmp_path / f".model.tmp-{host}-{os.getpid()}-0000feed"
    for d in (abandoned, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
        for p in (d / "model.safetensors", d):
            os.utime(p, (1_000_000_000, 1_000_000_000))  # quiet for years
    with staged(out) as tmp:
        (tmp / "config.yaml").write_text("model: {}\n")
    assert not abandoned.exists() and live.exists()
    assert (out / "config.yaml").is_file()


def test_a_sealed_dir_lists_its_weights_only(tmp_path):
    out = tmp_path / "ck"
    with staged(out, seal=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 10)
        (tmp / "optimizer" / "exp_avg").mkdir(parents=True)
        (tmp / "optimizer" / "exp_avg" / "model.safetensors").write_bytes(b"m")
        (tmp / "optimizer" / "state.json").write_text('{"adam_step": 3}')
        (tmp / "config.yaml").write_text("model: {}\n")
        (tmp / "lineage.json").write_text("{}")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "optimizer/exp_avg/model.safetensors", "optimizer/state.json"]
    assert files["model.safetensors"]["bytes"] == 10


def test_an_existing_output_is_never_replaced(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        with staged(out):
            pass
    assert (out / "mine").read_text() == "keep"


def test_a_result_file_that_appears_meanwhile_is_not_overwritten(tmp_path):
    """`bench --out` checks at its start that the file is new, then benchmarks for minutes: a file written there
    meanwhile (another bench with the same --out) was replaced."""
    from scaletrain.durable import write_text_new

    out = tmp_path / "bench.json"
    write_text_new(out, "first\n")
    with pytest.raises(FileExistsError):
        write_text_new(out, "second\n")
    assert out.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
