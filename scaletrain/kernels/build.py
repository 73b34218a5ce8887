"""Build (once per machine, cached) and load scaletrain's C++ CPU kernels: the attention forward and
backward (cpu_attention.cpp), the row-wise softmax cross-entropy (cross_entropy.cpp) and SwiGLU's
elementwise part (swiglu.cpp).

They need an AVX-512 CPU (the attention kernel in bf16 also AVX-512-BF16, which every AMX CPU has) and
a C++ compiler; `extension()` returns None
where either is missing or the build fails (a one-line warning says why), and callers use PyTorch's
kernels instead. `SCALETRAIN_CPU_KERNELS=torch` turns them all off (A/B runs, or to rule them out).
"""

from __future__ import annotations

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
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",  # the vector headers' AVX-512 path
         "-fopenmp"]  # at::parallel_for is inline: without it the kernels run on one thread (torch's libgomp)


def enabled() -> bool:
    return os.environ.get("SCALETRAIN_CPU_KERNELS", "ours") != "torch"


def cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def build_dir() -> Path:
    digest = hashlib.sha256()
    for part in SOURCES + _HEADERS:
        digest.update(part.read_bytes())
    digest.update(" ".join(FLAGS + [torch.__version__, sys.version]).encode())
    return Path.home() / ".cache" / "scaletrain" / "kernels" / f"cpu-{digest.hexdigest()[:12]}"


@functools.cache
def _load():
    from torch.utils.cpp_extension import load

    where = build_dir()
    where.mkdir(parents=True, exist_ok=True)
    # One builder at a time across ranks and runs. flock dies with its holder, unlike torch's own `lock`
    # file, which a killed build leaves behind (every later load would wait on it forever): holding the
    # flock, any such file is stale and can go.
    with open(where / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (where / "lock").unlink(missing_ok=True)
        if not any(where.glob("*.so")):
            print(f"building scaletrain's CPU kernels in {where} (once per machine, ~1 min)", file=sys.stderr,
                  flush=True)
        try:
            return load(f"scaletrain_cpu_{where.name[-12:]}", [str(s) for s in SOURCES], extra_cflags=FLAGS,
                        extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use PyTorch's kernels
            why = next((line for line in str(e).splitlines() if "error" in line), str(e)[-300:]).strip()
            print(f"warning: scaletrain's CPU kernels did not build ({why}); using PyTorch's", file=sys.stderr,
                  flush=True)
            return None


def extension():
    """The compiled module, or None where the kernels cannot run here."""
    if not (enabled() and cpu_has_avx512()):
        return None
    return _load()


def bf16_ready() -> bool:
    """Whether the bf16 kernels can run: the kernels built, and the CPU has AVX512_BF16 (they round with its
    conversion instruction; the attention kernel's GEMMs run oneDNN's brgemm on its dot products or, where
    present, AMX tiles; every AMX CPU has AVX512_BF16). Their fp32 versions need only AVX-512."""
    ext = extension()
    return ext is not None and torch.cpu._is_avx512_bf16_supported()


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing, not inside the graph
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
    if not cpu_has_avx512():
        return "not used (no AVX-512): PyTorch's kernels"
    if _load() is None:
        return "not used (the build failed): PyTorch's kernels"
    if bf16_ready():
        return f"attention (fp32, bf16 on {bf16_engine()}) + cross-entropy + SwiGLU"
    return "attention, cross-entropy, SwiGLU in fp32 (bf16 is PyTorch's: no AVX-512-BF16)"
