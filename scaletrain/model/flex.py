"""FlexAttention backend: `torch.nn.attention.flex_attention` with block-sparse masks.

flex_attention is only fast when compiled; we compile it once per process (class-level, like
torchtitan) so every layer and every step reuses one kernel instead of recompiling. Fully masked
blocks (above the diagonal, other documents) are skipped, which is where it wins over a dense mask.

CPU: torch's CPU flex kernel (inductor C++) has a forward but no backward (torch 2.13 raises
NotImplementedError), so on CPU flex is usable for evaluation/inference only; training raises a
UserError up front instead of a traceback deep inside a step.
"""

from __future__ import annotations

import functools
import warnings

import torch

from scaletrain.errors import UserError

CPU_NO_BACKWARD = (
    "model.attention=flex cannot train on CPU: torch {ver}'s CPU flex_attention has no backward pass "
    "(it runs on CUDA, and for no-grad evaluation on CPU); use model.attention=sdpa on CPU"
)


class FlexAttention:
    _compiled = None  # one compiled flex_attention for the whole process

    @classmethod
    def kernel(cls, device_type: str = "cuda"):
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cpu" and not cpu_kernel_trusted():
            return flex_attention  # torch's unfused reference path: correct, slower
        if cls._compiled is None:
            cls._compiled = torch.compile(flex_attention, dynamic=False)
        return cls._compiled


def cpu_kernel_trusted() -> bool:
    """Whether the compiled CPU flex kernel gives right answers here. On a CPU without AVX-512 (inductor's
    AVX2 code) torch 2.13's kernel returned garbage rows, NaN among them, for some lengths that are multiples
    of 8 but not of 16 (8, 24, 40, 56; not every time: it reads memory it never wrote) against SDPA — measured
    on an AVX2 AMD EPYC, 2026-12-06. The uncompiled flex_attention matched at every length."""
    from scaletrain.kernels.build import cpu_has_avx512

    return cpu_has_avx512()



def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise UserError(CPU_NO_BACKWARD.format(ver=torch.__version__))
    # GQA natively: K/V heads are indexed, never repeated.
    kernel = FlexAttention.kernel(q.device.type)
    with warnings.catch_warnings():  # the uncompiled path on purpose (cpu_kernel_trusted): no advice to compile
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return kernel(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.lru_cache(maxsize=16)
def causal_block_mask(t_q: int, t_k: int, device: str):
    """Causal mask (query i sees keys <= i + t_k - t_q, so a query after a KV cache sees it all);
    cached because it depends only on the lengths."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, t_q, t_k, device=device)


def document_block_mask(doc_ids: torch.Tensor):
    """Causal AND same-document BlockMask for packed windows (built once per forward, shared by
    every layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = doc_ids.shape

    def doc_causal(bi, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[bi, q_idx] == doc_ids[bi, kv_idx])

    return create_block_mask(doc_causal, b, None, t, t, device=str(doc_ids.device))
