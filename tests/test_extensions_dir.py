"""DeepSpeed's JIT op builds: a directory per venv, and a lock left by a killed build does not hang runs."""

import os
import sys
import time

from scaletrain.train.extensions_dir import STALE_LOCK_S, use_private_extensions_dir


def test_private_dir_per_venv_and_stale_locks_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    root = use_private_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(root) and root.is_relative_to(tmp_path)
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert use_private_extensions_dir() != root  # another venv, another directory

    stale, fresh = root / "deepspeed_shm_comm" / "lock", root / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))  # the user's choice is kept
    assert use_private_extensions_dir() == root
    assert not stale.exists() and fresh.exists()  # a build in progress keeps its lock
    assert "stale build lock" in capsys.readouterr().err
