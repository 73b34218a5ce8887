"""fp32 matmuls through oneDNN instead of MKL on AMD CPUs with AVX-512.

PyTorch's fp32 `mm` on CPU is MKL's sgemm, and MKL runs AVX2 code on AMD processors: on this project's
AMD EPYC (Zen 5, AVX-512) a 2048² fp32 product ran at 105 GFLOP/s a core through `torch.mm` and at 232
through oneDNN (the library PyTorch already uses for bf16 matmuls), and the training step's GEMMs at
[2048, 256] x [256, 688]: 107 vs 238 (forward), 105 vs 250 (input gradient), 107 vs 157 (weight gradient).
Without AVX-512 both libraries run AVX2 code and oneDNN gains nothing: on an AVX2-only EPYC (Zen 2) the
step's GEMMs ran at 41–42 GFLOP/s a core either way forward, and the weight gradient (transposed operands,
which oneDNN copies first) at 26–37 through oneDNN vs 38–43 through MKL; the eager reference-shape step took
2.40 s with oneDNN and 2.36 s with MKL (medians of 8, alternating). So MKL keeps fp32 there.

`linear(x, w, b)` is F.linear, computed by oneDNN where `preferred(x)` (CPU, fp32, an AMD CPU with AVX-512,
PyTorch built with oneDNN; `SCALETRAIN_CPU_KERNELS=torch` turns it off) — forward and both gradients. It is a
torch custom op, so torch.compile keeps it as one node. The choice is by CPU, not by a timing race, so every
rank and every resumed run makes the same one (bitwise-reproducible runs stay so). On Intel CPUs MKL keeps fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from scaletrain.cpuinfo import cpuinfo_field
from scaletrain.kernels import build


def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id") or ""


def _onednn_faster() -> bool:
    """An AMD CPU with AVX-512: oneDNN's AVX-512 code against MKL's AVX2 (see the module's docstring)."""
    return _cpu_vendor() == "AuthenticAMD" and build.cpu_has_avx512()


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@build.constant_while_compiling
def onednn_fp32_ready() -> bool:
    """Whether fp32 CPU matmuls go to oneDNN here (AMD CPU with AVX-512, oneDNN present, not switched off)."""
    return build.enabled() and _onednn_faster() and onednn_available()


def preferred(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and onednn_fp32_ready()


# Custom ops, not direct calls: inductor would lower `mkldnn._linear_pointwise` itself, and its lowering
# is for inference with frozen (constant) weights only.
@torch.library.custom_op("scaletrain::onednn_mm_nt", mutates_args=())
def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D fp32 CPU tensors through oneDNN (any strides), no autograd."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@mm_nt.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]))


@torch.library.custom_op("scaletrain::onednn_linear", mutates_args=())
def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@_linear.register_fake
def _(x, w, b):
    return x.new_empty((x.shape[0], w.shape[0]))


def _setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w)


def _grad(ctx, dy):
    x, w = ctx.saved_tensors
    dx = mm_nt(dy, w.t()) if ctx.needs_input_grad[0] else None  # dY W
    dw = mm_nt(dy.t(), x.t()) if ctx.needs_input_grad[1] else None  # dYᵀ X
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_linear.register_autograd(_grad, setup_context=_setup)


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, w, b), through oneDNN where `preferred(x)` (see the module's docstring)."""
    if not (preferred(x) and w.dtype == x.dtype):
        return F.linear(x, w, b)
    return _linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D tensors (no autograd), through oneDNN where `preferred(a)`."""
    return mm_nt(a, b) if preferred(a) and b.dtype == a.dtype else a @ b.t()


def kernels_status() -> str:
    """Every CPU kernel choice in one line (trainer start-up, bench JSON): the C++ kernels and fp32 matmuls."""
    return f"{build.status()}; fp32 matmuls: {'oneDNN' if onednn_fp32_ready() else 'torch.mm'}"
