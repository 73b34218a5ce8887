"""Attention masks for the switches that change who sees whom: a sliding window (`model.attention_window`)
and ALiBi (`model.position: alibi`), on top of causality and, optionally, document masking.

Built once per forward in the form the backend consumes:
  sdpa / eager   a dense mask [1 or B, 1, Tq, Tk] (bool) or, with ALiBi, an additive float mask
                 [1 or B, H, Tq, Tk] (-inf where not allowed, -slope*distance elsewhere)
  flex           a BlockMask with the window in its mask_mod (blocks outside the window are skipped)
  flash          a `FlashMask`: flash-attn's own window_size / alibi_slopes arguments (CUDA only)
Without a window or ALiBi this defers to attention.build_mask, i.e. the plain paths stay untouched.

Window semantics (HF's sliding_window): query i sees keys j with i - window < j <= i, i.e. itself and the
window-1 tokens before it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from scaletrain.errors import UserError
from scaletrain.model.attention import build_mask, flash_mask_problem
from scaletrain.model.blocks import alibi_slopes


def attention_mask(s, doc_ids: Optional[torch.Tensor], t_q: int, start_pos: int, device, dtype):
    """The mask for `t_q` queries at positions start_pos.. against start_pos + t_q keys (`s`: LlamaShape)."""
    window, alibi = s.attention_window, s.position == "alibi"
    if not window and not alibi:
        return build_mask(s.attention, doc_ids)
    t_k = start_pos + t_q
    if s.attention == "flex":  # alibi + flex is refused by config validation
        return flex_window_mask(doc_ids, window, t_q, t_k, str(device))
    slopes = alibi_slopes(s.num_heads).to(device) if alibi else None
    if s.attention == "flash":
        why = flash_mask_problem(s)  # normally refused at start-up already (attention.check_backend)
        if why:
            raise UserError(why)
        return FlashMask(window, slopes, build_mask("flash", doc_ids))
    allowed = dense_allowed(doc_ids, window, t_q, t_k, device)
    if not alibi:
        return allowed
    q = torch.arange(start_pos, t_k, device=device)
    k = torch.arange(t_k, device=device)
    bias = slopes[:, None, None] * (k[None, None, :] - q[None, :, None]).float()  # [H, Tq, Tk], <= 0 in the past
    return torch.where(allowed, bias[None], float("-inf")).to(dtype)


def dense_allowed(doc_ids: Optional[torch.Tensor], window: Optional[int], t_q: int, t_k: int, device) -> torch.Tensor:
    """Bool [1 or B, 1, Tq, Tk]: causal (queries offset to the end of a KV cache), within the window, same document."""
    q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k = torch.arange(t_k, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed = allowed & (k > q - window)
    if doc_ids is None:
        return allowed[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (allowed[None] & same_doc)[:, None]


def flex_window_mask(doc_ids: Optional[torch.Tensor], window: Optional[int], t_q: int, t_k: int, device: str):
    if doc_ids is None:
        return _flex_window(t_q, t_k, window, device)
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = doc_ids.shape

    def doc_window(bi, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window) & (doc_ids[bi, q_idx] == doc_ids[bi, kv_idx])

    return create_block_mask(doc_window, b, None, t, t, device=device)


@functools.lru_cache(maxsize=16)
def _flex_window(t_q: int, t_k: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q

    def causal_window(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx < window)

    return create_block_mask(causal_window, None, None, t_q, t_k, device=device)


@dataclass
class FlashMask:
    """What flash-attn needs for a window / ALiBi: (left, 0) window sizes and fp32 slopes; `varlen` is the
    document mask's (cu_seqlens, max_len) or None. flash-attn's ALiBi bias is -slope*|i-j|, which is ours
    under causality."""

    window: Optional[int]
    slopes: Optional[torch.Tensor]
    varlen: Optional[tuple]

    def run(self, q, k, v) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        b, h, t, d = q.shape
        kw = {"causal": True, "window_size": (self.window - 1 if self.window else -1, 0),
              "alibi_slopes": None if self.slopes is None else self.slopes.float()}
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn layout [B, T, H, D]
        if self.varlen is None:
            return flash_attn_func(q_, k_, v_, **kw).transpose(1, 2)
        cu, max_len = self.varlen
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q_, k_, v_)]
        return flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, **kw).view(b, t, h, d).transpose(1, 2)
