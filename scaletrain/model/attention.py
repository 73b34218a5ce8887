"""Causal grouped-query attention behind one function: `sdpa` (fused, default) or `eager` (reference)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, K, T, D] -> [B, K*groups, T, D]; query head i reads kv head i // groups (HF's layout)."""
    if groups == 1:
        return x
    b, k, t, d = x.shape
    return x[:, :, None].expand(b, k, groups, t, d).reshape(b, k * groups, t, d)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V with a causal mask; the numerical reference for other backends."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    t_q, t_k = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    # Offset so a query at the end of a KV cache still sees every earlier key.
    causal = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention; GQA without materialising repeated K/V (enable_gqa)."""
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # one decode step attends to the whole cache
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
    causal = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)


BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """q: [B, H, Tq, D]; k, v: [B, K, Tk, D] with H % K == 0. Returns [B, H, Tq, D]."""
    return BACKENDS[backend](q, k, v)
