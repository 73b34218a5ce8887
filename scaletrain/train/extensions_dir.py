"""Where DeepSpeed JIT-builds its C++ ops (CPU Adam for optimizer offload), stale build locks, and the
start-up costs of DeepSpeed we skip (its CPU comm op) or defer (compiling Muon).

torch builds extensions under one directory per Python/torch version (`~/.cache/torch_extensions/py311_cpu`)
whatever the venv or the CPU (DeepSpeed compiles its ops with -march=native). Two venvs then rebuild each
other's op (the sources' paths differ) and wait on each other's lock; a rank killed during the build leaves
its `lock` file behind and every later run waits on it forever.
So each venv (and CPU) gets a directory of its own, and a lock older than any build is reported and removed.
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
        from scaletrain.cpuinfo import cpuinfo_field

        # DeepSpeed builds CPU Adam with -march=native: a home shared by nodes of different CPUs needs one per CPU
        venv = hashlib.sha1(f"{sys.prefix}|{cpuinfo_field('flags') or ''}".encode()).hexdigest()[:10]
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


def skip_cpu_shm_comm_op() -> None:
    """Stop DeepSpeed from building and starting its CPU shared-memory comm op in this process.

    DeepSpeed builds it for every CPU process group, but only its inference all-reduce (tensor-parallel
    serving) uses it: ZeRO training goes through torch.distributed (gloo) either way. It costs a ~1 min C++
    build on first use, and each process maps a 66 MB `/dev/shm/deepspeed_allreduce_buffer_*` file that is
    never unlinked: on a dev or CI machine that runs many jobs those files fill the RAM-backed /dev/shm
    (22 GB measured here after a day of runs) until the machine swaps and builds get OOM-killed.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # what DeepSpeed checks before building


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_lazily() -> None:
    """Import DeepSpeed's Muon optimizer with its `@torch.compile` decorators deferred to the first call.

    ZeRO imports Muon on every start (its optimizer check) and every gradient reduction (an isinstance test)
    even for AdamW, and at import Muon's decorators import inductor: 1.7 s per process measured on the 2-core
    dev machine, on each start of a run that compiles nothing. Imported here first, each decorated function
    compiles when it is first called, as it would have on that call anyway."""
    if MUON in sys.modules:
        return
    import functools
    import importlib

    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    eager_compile = compiler.compile

    def deferred_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                compiled = compiled or eager_compile()(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = deferred_compile
    try:
        importlib.import_module(MUON)
    except ImportError:  # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        compiler.compile = eager_compile
