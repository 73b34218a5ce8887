"""Causal attention on AVX-512 CPUs, forward and backward: our flash-style kernel (cpu_attention.cpp), in bf16
where the CPU has AVX-512-BF16 (AMX CPUs included) and in fp32.

PyTorch's CPU flash attention uses neither AMX nor AVX-512-BF16 dot products: at the bench's shape its
backward took six times its own forward on an AMX Xeon, and forward + backward 43 % of the training step on
an AVX-512-BF16 EPYC; its fp32 GEMMs are MKL's, AVX2 code on AMD. Ours does every GEMM through oneDNN's
micro-kernels (README, issue 6).

It applies to: CPU, causal self-attention (Tq == Tk, no mask), head size a multiple of 64, a compiler to
build the kernel (~1 min, once per machine; see build.py), and training (without autograd PyTorch's
forward alone runs). `applies(...)` says whether it does; the caller falls back to plain SDPA otherwise.
`SCALETRAIN_CPU_KERNELS=torch` turns it off. It is a torch custom op, so torch.compile treats it as one
opaque node with its own backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from scaletrain.kernels import build


kernel_ready = build.ready  # (bf16): the build and AVX-512-BF16 (every AMX CPU has it); fp32: the build


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` can take these [B, H, T, D] tensors (else use SDPA)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[2] == k.shape[2] and q.shape[-1] % 64 == 0
            and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
            and q.shape[1] % k.shape[1] == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and kernel_ready(q.dtype == torch.bfloat16))


@torch.library.custom_op("scaletrain::cpu_causal_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor],
             sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = build.extension().attention_forward(q, k, v, 1.0 / math.sqrt(q.shape[-1]), cos, sin)
    return out, lse


@_forward.register_fake
def _(q, k, v, cos, sin):
    b, h, t, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, t), dtype=torch.float32)  # (like the kernel: q's layout)


@torch.library.custom_op("scaletrain::cpu_causal_attention_backward", mutates_args=())
def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, cos: Optional[torch.Tensor],
              sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = build.extension().attention_backward(dout, q, k, v, out, lse, scale, cos, sin)
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, cos, sin):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _grad(ctx, dout, _dlse):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    return (*_backward(dout, q, k, v, out, lse, cos, sin), None, None)


_forward.register_autograd(_grad, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor] = None,
              sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention, q: [B, H, T, D], k/v: [B, K, T, D] (GQA: H % K == 0); check `applies` first.
    With `cos`/`sin` ([T, D], q's dtype) q and k are RoPE-rotated inside the kernel (rotate-half form, as
    model/llama.py's apply_rope) and their gradients are w.r.t. the unrotated inputs. The output and the
    gradients come in their inputs' layout (the model's [B, T, H, D] memory seen as [B, H, T, D]: no
    transposing copies between the projections and the kernel)."""
    return _forward(q, k, v, cos, sin)[0]


def rope_applies(q: torch.Tensor, cos: Optional[torch.Tensor]) -> bool:
    """Whether `cos`/`sin` can go into the kernel: one [T, D] table for every row (not per-document
    positions), contiguous, in q's dtype."""
    return (cos is not None and cos.dim() == 2 and cos.shape == (q.shape[2], q.shape[3]) and cos.is_contiguous()
            and cos.dtype == q.dtype)
