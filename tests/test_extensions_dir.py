"""DeepSpeed's JIT op builds: a directory per venv, a lock left by a killed build does not hang runs, and
CPU ranks neither build nor leak the shared-memory comm op."""

import os
import subprocess
import sys
import time
from pathlib import Path

from scaletrain.train.extensions_dir import STALE_LOCK_S, use_private_extensions_dir


def test_private_dir_per_venv_and_stale_locks_removed(tmp_path, monkeypatch, capsys):
    # setenv first so monkeypatch records the real value (or its absence) and restores it: delenv of an unset
    # variable records nothing, and the directory set below leaked into every later test's subprocesses
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
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


def test_cpu_process_group_leaves_no_shared_memory_file(tmp_path):
    """DeepSpeed's shm comm op maps /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> and never
    unlinks it (66 MB a process); scaletrain's CPU ranks must not create one."""
    port = "29731"
    env = {**os.environ, "MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1", "HOME": str(tmp_path)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "TORCH_EXTENSIONS_DIR"):
        env.pop(key, None)
    code = ("from scaletrain.train.distributed import setup; import deepspeed.comm.comm as c; setup(threads=1); "
            "print('shm op:', c.cdb.shm_comm_op)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for p in leaked:
        p.unlink()  # do not leave this machine worse off when the test fails
    assert out.returncode == 0, out.stderr[-2000:]
    assert not leaked
    assert "shm op: None" in out.stdout
