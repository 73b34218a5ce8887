"""Build (once per machine, cached) and load scaletrain's C++ CPU kernels: the attention forward and
backward (cpu_attention.cpp), the row-wise softmax cross-entropy (cross_entropy.cpp) and SwiGLU's
elementwise part (swiglu.cpp).

Two builds of the same sources (vec_utils.h is the only place that knows the vector width): on AVX-512
CPUs 16 lanes, fp32 and bf16 (bf16 also needs AVX-512-BF16, which every AMX CPU has); on AVX2 + FMA CPUs
8 lanes and fp32 only (there oneDNN has no bf16 matmuls either, and `train.precision: auto` picks fp32).
Both need a C++ compiler; `extension()` returns None where the CPU has neither ISA, or the compiler is
missing or the build fails (a one-line warning says why), and callers use PyTorch's kernels instead.
`SCALETRAIN_CPU_KERNELS=torch` turns them all off (A/B runs, or to rule them out).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).parent
SOURCES = [_HERE / "bindings.cpp", _HERE / "cpu_attention.cpp", _HERE / "cross_entropy.cpp", _HERE / "swiglu.cpp"]
_HEADERS = [_HERE / "vec_utils.h", _HERE / "attention_panels.h", _HERE / "attention_rope.h"]
_COMMON = ["-O3", "-fopenmp"]  # at::parallel_for is inline: without -fopenmp the kernels run on one thread
ISA_FLAGS = {  # -DCPU_CAPABILITY*: which path of ATen's vector headers (at::vec) the sources see
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-DSCALETRAIN_AVX2"],
}


def enabled() -> bool:
    return os.environ.get("SCALETRAIN_CPU_KERNELS", "ours") != "torch"


def cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def cpu_fp16_training() -> bool:
    """Whether oneDNN has fp16 kernels here (AVX512-FP16 / AMX-FP16: Sapphire Rapids and later), which is where
    DeepSpeed's CPU accelerator trains fp16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def isa() -> str | None:
    """Which build runs here: "avx512", "avx2" (AVX2 + FMA, as PyTorch's own AVX2 kernels need), or None."""
    if cpu_has_avx512():
        return "avx512"
    return "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX2" else None


def flags(which: str) -> list[str]:
    return _COMMON + ISA_FLAGS[which]


def build_dir(which: str) -> Path:
    digest = hashlib.sha256()
    for part in SOURCES + _HEADERS:
        digest.update(part.read_bytes())
    # and where the sources and torch's headers are: torch's build file names them by path, so two checkouts
    # (or two environments) sharing one dir would rebuild each other's objects on every switch
    digest.update(" ".join(flags(which) + [torch.__version__, sys.version, str(_HERE), sys.prefix]).encode())
    return Path.home() / ".cache" / "scaletrain" / "kernels" / f"cpu-{which}-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _ninja_beside_python():
    """torch's loader runs whichever `ninja` PATH finds first, and two versions of it (pip's, installed in the
    venv with DeepSpeed, and the system's) take each other's build log for stale: every process whose PATH
    found the other one rebuilt the kernels (~45 s here; a job started with a bare PATH, e.g. by SLURM, did
    it every time). So the build uses the ninja beside this Python where there is one."""
    here = str(Path(sys.executable).parent)
    before = os.environ.get("PATH", "")
    if not (Path(here) / "ninja").is_file() or before.split(os.pathsep)[0] == here:
        yield
        return
    os.environ["PATH"] = here + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


@functools.cache
def _load(which: str):
    from torch.utils.cpp_extension import load

    where = build_dir(which)
    try:
        where.mkdir(parents=True, exist_ok=True)
        held = open(where / "build.flock", "w")
    except OSError as e:  # a read-only or missing home: train on, with PyTorch's kernels
        print(f"warning: scaletrain's CPU kernels cannot be built in {where} ({e.strerror or e}); using PyTorch's",
              file=sys.stderr, flush=True)
        return None
    # One builder at a time across ranks and runs. flock dies with its holder, unlike torch's own `lock`
    # file, which a killed build leaves behind (every later load would wait on it forever): holding the
    # flock, any such file is stale and can go.
    with held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            (where / "lock").unlink(missing_ok=True)
        except OSError:  # no locks on this file system (NFS without lockd, some Lustre): torch's own lock file
            pass  # alone serialises the builders; a killed build's stale one then needs removing by hand
        if not any(where.glob("*.so")):
            print(f"building scaletrain's CPU kernels in {where} (once per machine, ~1 min)", file=sys.stderr,
                  flush=True)
        try:
            with _ninja_beside_python():
                return load(f"scaletrain_cpu_{which}_{where.name[-12:]}", [str(s) for s in SOURCES],
                            extra_cflags=flags(which), extra_ldflags=["-fopenmp"], build_directory=str(where),
                            verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use PyTorch's kernels
            why = next((line for line in str(e).splitlines() if "error" in line), str(e)[-300:]).strip()
            print(f"warning: scaletrain's CPU kernels did not build ({why}); using PyTorch's", file=sys.stderr,
                  flush=True)
            return None


def extension():
    """The compiled module for this CPU's ISA, or None where the kernels cannot run here."""
    which = isa()
    if not (enabled() and which):
        return None
    return _load(which)


def bf16_ready() -> bool:
    """Whether the bf16 kernels can run: the kernels built, and the CPU has AVX512_BF16 (they round with its
    conversion instruction; the attention kernel's GEMMs run oneDNN's brgemm on its dot products or, where
    present, AMX tiles; every AMX CPU has AVX512_BF16). Their fp32 versions need only AVX-512 or AVX2."""
    return isa() == "avx512" and extension() is not None and torch.cpu._is_avx512_bf16_supported()


def constant_while_compiling(fn):
    """`torch.compiler.assume_constant_result` (torch.compile calls `fn` once while tracing, not inside the
    graph) without its import of dynamo (~1.7 s) in the processes that never compile: CLI commands and every
    error path. The decorator only sets this mark, which dynamo reads when it traces a call;
    tests/test_kernel_build.py checks that it is still exactly what torch's decorator does."""
    fn._dynamo_marked_constant = True
    return fn


@constant_while_compiling
def ready(bf16: bool = False) -> bool:
    """Whether the kernels that come in both dtypes (cross-entropy, SwiGLU) can run: bf16 needs
    `bf16_ready`, fp32 only the build."""
    return bf16_ready() if bf16 else extension() is not None


def bf16_engine() -> str:
    """What the attention kernel's GEMMs run on here: "AMX" (oneDNN packs for tiles) or "AVX-512-BF16"."""
    ext = extension()
    return "AMX" if ext is not None and torch.cpu._is_amx_tile_supported() and ext.amx_available() else "AVX-512-BF16"


def status() -> str:
    """Which of the kernels run here, in words (for `scaletrain bench`'s JSON)."""
    if not enabled():
        return "off (SCALETRAIN_CPU_KERNELS=torch)"
    which = isa()
    if which is None:
        return "not used (no AVX2 or AVX-512): PyTorch's kernels"
    if _load(which) is None:
        return "not used (the build failed): PyTorch's kernels"
    if bf16_ready():
        return f"attention (fp32, bf16 on {bf16_engine()}) + cross-entropy + SwiGLU"
    if which == "avx2":
        return "attention, cross-entropy, SwiGLU in fp32 (AVX2 build; no bf16 kernels without AVX-512)"
    return "attention, cross-entropy, SwiGLU in fp32 (bf16 is PyTorch's: no AVX-512-BF16)"
