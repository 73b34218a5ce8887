"""`model.fused_ops: liger`: Liger-Kernel's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA only).

The model keeps its modules, parameter names and checkpoints; `use_liger` only changes the class of the
RMSNorm, SwiGLU and attention modules to subclasses whose forward calls the fused kernel. Liger computes
the same functions (RMSNorm with fp32 statistics, "llama" casting; SiLU(gate) * up; rotate-half RoPE).
"""

from __future__ import annotations

import torch

from scaletrain.errors import UserError
from scaletrain.model.blocks import RMSNorm, SwiGLU
from scaletrain.model.llama import Attention

_ops: dict = {}


def check_fused_ops(name: str, cuda: bool) -> None:
    """One line when the configured fused ops cannot run here."""
    if name == "none":
        return
    if not cuda:
        raise UserError("model.fused_ops=liger needs a CUDA GPU (Liger's kernels are Triton); set model.fused_ops=none here")
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        raise UserError("model.fused_ops=liger needs the liger-kernel package: pip install -e '.[gpu]' "
                        "(or set model.fused_ops=none)") from None
    _ops.update(rms_norm=LigerRMSNormFunction, rope=LigerRopeFunction, silu_mul=LigerSiLUMulFunction)
    global _call
    # Measured on an H100 (torch 2.11, liger 0.8.5): Liger's autograd Functions traced by torch.compile give
    # wrong gradients (loss 10.24 instead of 8.05 after one step of a 4-layer model; NaN at 1B). Kept out of
    # the graph, they match the reference; the rest of each compiled block still fuses around them. Wrapped
    # here, not at import: `torch.compiler.disable` imports dynamo (~1.7 s), which no other process needs.
    _call = torch.compiler.disable(_apply)


def _apply(name: str, *args):
    return _ops[name].apply(*args)


_call = _apply  # the Liger modules below only run after check_fused_ops loaded Liger (and set this)


class LigerRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (X, W, eps, offset, casting_mode, in_place): "llama" = statistics in fp32, cast back before the gain
        return _call("rms_norm", x, self.weight, self.eps, 0.0, "llama", False)


class LigerSwiGLU(SwiGLU):
    def forward(self, x):
        return self.down_proj(_call("silu_mul", self.gate_proj(x), self.up_proj(x)))


class LigerRopeAttention(Attention):
    def rope(self, q, k, cos, sin):
        # Liger wants cos/sin [1 or B, T, D]; ours are [T, D], or [B, 1, T, D] with per-document positions.
        cos, sin = (cos.unsqueeze(0), sin.unsqueeze(0)) if cos.dim() == 2 else (cos.squeeze(1), sin.squeeze(1))
        return _call("rope", q.contiguous(), k.contiguous(), cos, sin)


_SWAPS = {RMSNorm: LigerRMSNorm, SwiGLU: LigerSwiGLU, Attention: LigerRopeAttention}


def use_fused_ops(model: torch.nn.Module, name: str, cuda: bool) -> int:
    """Switch the model's modules to the fused kernels; returns how many modules changed."""
    check_fused_ops(name, cuda)
    if name == "none":
        return 0
    changed = 0
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
            changed += 1
    return changed
