"""The interchangeable pieces behind the architecture switches: norms, FFNs, RoPE frequencies, ALiBi slopes.

Names and numerics follow the Hugging Face models they are exported as (see scaletrain/hf/arch_map.py):
RMSNorm and LayerNorm compute their statistics in fp32 whatever the compute dtype; `weight` / `bias`
parameter names; FFNs `gate_proj`/`up_proj`/`down_proj` (SwiGLU, Llama) or `up_proj`/`down_proj` (plain,
Arcee's names; renamed to c_fc/c_proj etc. only at export).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.kernels import cpu_matmul, swiglu
from scaletrain.model.variants import rope_scaling_kind


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the compute dtype (same order of operations as HF).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm's function with fp32 statistics under bf16 (as RMSNorm above); `bias` optional."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        h = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), b, self.eps)
        return h.to(x.dtype)


NORMS = (RMSNorm, LayerNorm)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose fp32 CPU matmuls go through oneDNN where
    that beats MKL (AMD CPUs; kernels/cpu_matmul.py). Everywhere else it is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_matmul.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its initialiser on the meta device (a model built for its shapes only):
    torch's meta `normal_` imports dynamo, ~1.7 s in a process (a CLI command, an error path) that never
    compiles. On real devices it draws exactly what nn.Embedding draws."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def make_norm(s, dim: int) -> nn.Module:
    """`s`: a LlamaShape. LayerNorm carries a bias exactly when the model's linears do (GPT-2 / MPT convention)."""
    return LayerNorm(dim, s.norm_eps, s.bias) if s.norm == "layernorm" else RMSNorm(dim, s.norm_eps)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(swiglu.silu_mul(self.gate_proj(x), self.up_proj(x)))


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Primer); HF's ACT2FN['relu2']."""
    return torch.square(F.relu(x))


class PlainMLP(nn.Module):
    """up -> activation -> down (GPT-2 style, no gate). gelu is the exact (erf) GELU."""

    def __init__(self, d: int, f: int, bias: bool, act: str):
        super().__init__()
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        self.act = F.gelu if act == "gelu" else relu2

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


def make_ffn(s) -> nn.Module:
    if s.ffn == "swiglu":
        return SwiGLU(s.hidden_size, s.intermediate_size, s.bias)
    return PlainMLP(s.hidden_size, s.intermediate_size, s.bias, s.ffn)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32), HF's computation for rope types default, linear and llama3."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    kind = rope_scaling_kind(scaling)
    if kind == "linear":  # positions / factor == frequencies / factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.; identical to HF Bloom's and MPT's with alibi_bias_max=8): a geometric
    sequence for the largest power of two <= heads, then every other slope of the next power of two."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = torch.arange(1, p + 1, dtype=torch.float32)
    slopes = torch.pow(2.0, -8.0 * base / p)
    if p < num_heads:
        extra = torch.pow(2.0, -8.0 * torch.arange(1, 2 * (num_heads - p), 2, dtype=torch.float32) / (2 * p))
        slopes = torch.cat([slopes, extra])
    return slopes
