"""Reuse DeepSpeed's built CPU Adam op when the install it was built from is only reinstalled, not changed.

DeepSpeed JIT-builds CPU Adam (the optimizer ZeRO-Offload steps with) through torch's extension builder,
and ninja rebuilds whatever has a source newer than its output. A reinstall of the same deepspeed and torch
(a fresh venv at the same path, which CI makes for every run) gives every source and header a new time, so
each such run compiled the same two files again: ~45 s on 2 cores, measured. Touching the outputs does not
help: ninja's log keeps the times it built them at.

So after a build we write a stamp beside it: what the op was built from (the contents of DeepSpeed's C++
sources and op builders, the torch, deepspeed and Python versions, the compiler, the CPU: DeepSpeed builds
with -march=native) and the built library's size and time. A later start that finds the same stamp loads
that library itself, the way torch's builder does, and DeepSpeed's loader returns it. Anything else (no
stamp, a changed install or CPU, a library rebuilt since, a DeepSpeed installed with the op prebuilt) goes
to DeepSpeed's own loader, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

STAMP = "scaletrain-build.json"


@contextlib.contextmanager
def reuse_cpu_adam_build():
    """Around building DeepSpeedCPUAdam: load the op from an unchanged earlier build, or stamp a new one."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    build_dir = None if _prebuilt(builder.name) else _build_dir(builder.name)
    reused = build_dir is not None and _load_if_unchanged(builder, build_dir)
    yield
    library = build_dir / f"{builder.name}.so" if build_dir is not None else None
    loaded = getattr(_loaded_ops().get(builder.name), "__file__", None)
    if library is not None and not reused and loaded and Path(loaded) == library:  # (built here, not elsewhere)
        _write_stamp(builder, build_dir)


def _prebuilt(name: str) -> bool:
    """DeepSpeed was installed with the op compiled in (DS_BUILD_CPU_ADAM=1): its loader uses that."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(name, False))


def _build_dir(name: str) -> Path | None:
    """Where torch builds the op: `use_private_extensions_dir` sets the variable for every training start."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) / name if root else None


def _loaded_ops() -> dict:
    """DeepSpeed's table of loaded ops (`OpBuilder.load` returns an entry without building); {} if absent."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    return getattr(OpBuilder, "_loaded_ops", {})


def _load_if_unchanged(builder, build_dir: Path) -> bool:
    library = build_dir / f"{builder.name}.so"
    loaded = _loaded_ops()
    if builder.name in loaded:
        return True
    try:
        stamp = json.loads((build_dir / STAMP).read_text())
        if stamp != _describe(builder, library):
            return False
        spec = importlib.util.spec_from_file_location(builder.name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ValueError, ImportError):  # no stamp or library, or one that will not load: build as before
        return False
    loaded[builder.name] = module
    return True


def _write_stamp(builder, build_dir: Path) -> None:
    """Atomically, so ranks that built (or waited for) the op together each leave a whole stamp."""
    tmp = build_dir / f"{STAMP}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(_describe(builder, build_dir / f"{builder.name}.so")))
        os.replace(tmp, build_dir / STAMP)
    except OSError:  # a read-only or full cache: the next start builds, as it always did
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _describe(builder, library: Path) -> dict:
    """What decides the built library: the op's inputs, and which build of it is on disk."""
    import platform

    import deepspeed
    import torch

    from scaletrain.cpuinfo import cpuinfo_field

    digest = hashlib.sha256()
    ops = Path(builder.deepspeed_src_path("csrc")).parent  # deepspeed/ops: csrc/ (C++) and op_builder/ (flags)
    for part in ("csrc", "op_builder"):
        for path in sorted((ops / part).rglob("*")):
            if path.is_file() and path.suffix != ".pyc":
                digest.update(f"{path.relative_to(ops)}\0".encode() + path.read_bytes() + b"\0")
    st = library.stat()
    cpu = hashlib.sha256(f"{platform.machine()} {cpuinfo_field('flags')}".encode()).hexdigest()
    return dict(sources=digest.hexdigest(), torch=torch.__version__, deepspeed=deepspeed.__version__,
                python=sys.version, cxx=os.environ.get("CXX", "c++"), cpu=cpu, library=[st.st_size, st.st_mtime_ns])
