"""SwiGLU's elementwise part, silu(gate) * up, forward and backward on AVX-512 CPUs (swiglu.cpp).

Inductor's fused kernels for it are bound by Sleef's exp and a division (the backward computes exp twice);
ours computes sigmoid through a 10-instruction 2^x and a refined reciprocal, and rounds to bf16 with one
instruction: at [2048, 688] bf16, one thread, forward 0.49 -> 0.25 ms and backward 0.69 -> 0.35 ms
(README, issue 6). Applies on CPU to contiguous bf16 (with AVX-512-BF16) or fp32 tensors of one shape when
the kernels built; `SCALETRAIN_CPU_KERNELS=torch` turns it off. A torch custom op: torch.compile keeps it
as one node, and its backward saves gate and up (no recomputation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.kernels import build


_ready = build.ready


def applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (gate.device.type == "cpu" and gate.dtype in (torch.bfloat16, torch.float32) and up.dtype == gate.dtype
            and gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous()
            and _ready(gate.dtype == torch.bfloat16))


@torch.library.custom_op("scaletrain::silu_mul", mutates_args=())
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return build.extension().swiglu_forward(gate, up)


@_silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("scaletrain::silu_mul_backward", mutates_args=())
def _silu_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d_gate, d_up = build.extension().swiglu_backward(grad.contiguous(), gate, up)
    return d_gate, d_up


@_silu_mul_backward.register_fake
def _(grad, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grad(ctx, grad):
    gate, up = ctx.saved_tensors
    return _silu_mul_backward(grad, gate, up)


_silu_mul.register_autograd(_grad, setup_context=_setup)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, through the kernel where `applies`."""
    return _silu_mul(gate, up) if applies(gate, up) else F.silu(gate) * up
