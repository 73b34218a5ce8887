"""Hot-path settings of the training step, each one there because the profile said so (see README
"Performance"). Shared by the trainer and `scaletrain bench`, so the benchmark times the real thing.

- CPU allocator: glibc serves every allocation above its mmap threshold (<= 32 MB) with a fresh
  mmap and unmaps it on free, so each large activation is page-faulted and zeroed again every
  step. On the reference shape that made copies/fills/elementwise ops 2-4x slower than memory
  bandwidth allows. `tune_cpu_allocator` makes glibc keep freed memory in the heap (what
  jemalloc/tcmalloc, the usual LD_PRELOAD advice, achieve) at the price of RSS staying at its peak.
- Compile: decoder blocks, final norm and head+loss are compiled in place (`nn.Module.compile`), so
  norms, RoPE, SwiGLU, residual adds and the loss's softmax fuse, while parameter names, state dicts
  and checkpoints stay exactly those of the eager model (no `_orig_mod.` prefix): compiled and
  eager runs resume from each other's checkpoints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory for reuse instead of returning it to the kernel (glibc only; a no-op
    elsewhere or with SCALETRAIN_NO_MALLOC_TUNING=1). Returns whether it was applied."""
    global _tuned
    if _tuned or os.environ.get("SCALETRAIN_NO_MALLOC_TUNING") == "1":
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # No mmap'd chunks: big blocks come from the heap and are reused after free ...
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # ... and the heap top is not trimmed back to the kernel between steps.
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _tuned = ok
    return ok


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) in place, module by module; returns the same module object.

    Every decoder block (one graph serves all layers), the final norm, and the output head, whose
    forward with targets is the loss: inductor fuses the fp32 log-softmax, target pick, softmax
    gradient and casts over the [tokens, vocab] logits (or over each chunk with train.loss_chunk)
    into one or two passes instead of ~6 eager ones. The embedding and the KV-cache plumbing stay
    eager. Whole-model compile measured the same step time at twice the compile time."""
    for layer in model.model.layers:
        layer.compile()
    model.model.norm.compile()
    if hasattr(model, "lm_head"):  # the sequence classifier has a small `score` head instead
        model.lm_head.compile()
    return model
