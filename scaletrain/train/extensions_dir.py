"""Where DeepSpeed JIT-builds its C++ ops (the CPU shared-memory comm op), and stale build locks.

torch builds extensions under one directory per Python/torch version (`~/.cache/torch_extensions/py311_cpu`)
whatever the venv. Two venvs then rebuild each other's op (the sources' paths differ) and wait on each other's
lock; a rank killed during the build leaves its `lock` file behind and every later run waits on it forever.
So each venv gets a directory of its own, and a lock older than any build is reported and removed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

STALE_LOCK_S = 900  # a build takes ~1 min (several on a loaded machine): older locks have no builder left


def use_private_extensions_dir() -> Path:
    """Set TORCH_EXTENSIONS_DIR for this venv (unless the user set it) and clear stale locks in it."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "scaletrain" / f"torch_extensions-{venv}")
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    for lock in root.glob("*/lock"):  # torch puts each op in <root>/<op name>/ when the variable is set
        _remove_if_stale(lock)
    return root


def _remove_if_stale(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            lock.unlink()
            print(f"warning: removed a stale build lock {lock} ({age / 60:.0f} min old: its build was killed)",
                  file=sys.stderr, flush=True)
    except FileNotFoundError:
        pass  # another rank removed it, or the build finished


def build_cpu_comm_op() -> None:
    """Build (or load, once built) DeepSpeed's CPU shared-memory comm op ahead of time, e.g. before a test
    session, so that the first multi-rank run does not spend its time budget compiling (~1 min, more on a
    loaded machine). No-op where a GPU is present."""
    import torch

    if torch.cuda.is_available():
        return
    use_private_extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
