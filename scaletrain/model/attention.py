"""Causal grouped-query attention behind one function, four backends (`model.attention`):

  sdpa   torch SDPA: on CPU its fused flash kernel (bf16/fp32, fwd+bwd), on CUDA the best fused
         kernel that fits (default). CPU training on AVX-512 CPUs runs scaletrain's flash kernel
         instead, forward and backward: fp32, and bf16 where the CPU has AVX-512-BF16 (AMX ones too)
         (kernels/cpu_attention.py; README "Performance")
  flash  CUDA only: the flash-attn package when installed (varlen for packed documents), else SDPA
         restricted to its flash/cuDNN kernels; a UserError where neither applies (e.g. on CPU)
  flex   torch.nn.attention.flex_attention, compiled once, block-sparse masks (see flex.py)
  eager  explicit softmax(QK^T/sqrt(d))V: the numerical reference the others are tested against

GQA: every backend except eager reads K/V heads in place (no repeat_interleave copy).
`mask` is None (plain causal) or what `build_mask` made once per forward for packed documents.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from scaletrain.errors import UserError
from scaletrain.kernels import cpu_attention
from scaletrain.model import docmask
from scaletrain.model.flex import CPU_NO_BACKWARD, causal_block_mask, document_block_mask, flex_attention

BACKENDS = ("sdpa", "flash", "flex", "eager")

FLASH_NEEDS_CUDA = ("model.attention=flash needs an NVIDIA GPU (flash-attn package, or SDPA's flash/cuDNN "
                    "kernels); on CPU use model.attention=sdpa, which runs PyTorch's fused CPU flash kernel")


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_mask_problem(shape) -> str | None:
    """Why model.attention=flash cannot run `shape` (a LlamaShape / ModelConfig) here, or None: a sliding
    window or ALiBi goes through flash-attn's own arguments, which SDPA's flash kernel does not have."""
    window, alibi = getattr(shape, "attention_window", None), getattr(shape, "position", "rope") == "alibi"
    if not (window or alibi) or has_flash_attn():
        return None
    what = " and ".join(x for x, on in (("model.attention_window", window), ("model.position=alibi", alibi)) if on)
    other = "sdpa" if alibi else "sdpa or flex"
    return (f"model.attention=flash with {what} needs the flash-attn package (SDPA's flash kernel takes neither a "
            f"window nor ALiBi): install flash-attn, or use model.attention={other}")


def check_backend(backend: str, device: torch.device, training: bool = True, doc_mask: bool = False, shape=None,
                  precision: str | None = None) -> None:
    """Fail at start-up, with a one-line reason, for a backend that cannot run here. `shape` (LlamaShape or
    ModelConfig): also check the switches the backend must support (window / ALiBi with flash); `precision`
    (fp32/bf16/fp16): the dtypes the backend's kernels take."""
    if backend == "flash":
        if device.type != "cuda":
            raise UserError(FLASH_NEEDS_CUDA)
        if precision == "fp32":  # flash-attn and SDPA's flash/cuDNN kernels take 16-bit inputs only
            raise UserError("model.attention=flash runs in bf16 or fp16 only: set train.precision=bf16 (or fp16), "
                            "or use model.attention=sdpa for fp32")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # FlashAttention-2 and cuDNN's fused attention start at Ampere
            raise UserError(f"model.attention=flash needs an Ampere or newer GPU (sm80+); this one is sm{major}{minor}: "
                            "use model.attention=sdpa")
        if doc_mask and not has_flash_attn():
            raise UserError("data.doc_mask with model.attention=flash needs the flash-attn package (varlen "
                            "kernel); SDPA's flash kernel takes no mask. Use model.attention=flex or sdpa")
        why = None if shape is None else flash_mask_problem(shape)
        if why:
            raise UserError(why)
    if backend == "flex" and device.type == "cpu" and training:
        raise UserError(CPU_NO_BACKWARD.format(ver=torch.__version__))


def build_mask(backend: str, doc_ids: torch.Tensor | None):
    """The document mask in the form `backend` consumes, built once per forward."""
    if doc_ids is None:
        return None
    if backend == "flex":
        return document_block_mask(doc_ids)
    if backend == "flash":
        if doc_ids.device.type != "cuda":
            raise UserError(FLASH_NEEDS_CUDA)
        return docmask.varlen_offsets(doc_ids)
    return docmask.dense_mask(doc_ids)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, K, T, D] -> [B, K*groups, T, D]; query head i reads kv head i // groups (HF's layout)."""
    if groups == 1:
        return x
    b, k, t, d = x.shape
    return x[:, :, None].expand(b, k, groups, t, d).reshape(b, k * groups, t, d)


def _causal(t_q: int, t_k: int, device) -> torch.Tensor:
    # Offset so a query at the end of a KV cache still sees every earlier key.
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def eager_attention(q, k, v, mask=None) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(d))V; the numerical reference for the other backends."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype != torch.bool:  # additive (ALiBi, see masks.py): -inf where not allowed
        scores = scores + mask
    else:
        allowed = _causal(q.shape[2], k.shape[2], q.device) if mask is None else mask
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def sdpa_attention(q, k, v, mask=None) -> torch.Tensor:
    """PyTorch's fused attention; GQA without materialising repeated K/V (enable_gqa)."""
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and cpu_attention.applies(q, k, v):
        return cpu_attention.attention(q, k, v)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # one decode step attends to the whole cache
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(t_q, t_k, q.device), enable_gqa=gqa)


def flash_attention(q, k, v, mask=None) -> torch.Tensor:
    if q.device.type != "cuda":
        raise UserError(FLASH_NEEDS_CUDA)
    if hasattr(mask, "run"):  # masks.FlashMask: sliding window / ALiBi through flash-attn's own arguments
        return mask.run(q, k, v)
    if has_flash_attn():
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        b, h, t, d = q.shape
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn layout [B, T, H, D]
        if mask is None:  # causal=True aligns bottom-right, so a KV cache works too
            return flash_attn_func(q_, k_, v_, causal=True).transpose(1, 2)
        cu, max_len = mask
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q_, k_, v_)]
        out = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, causal=True)
        return out.view(b, t, h, d).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mask is not None:
        raise UserError("document masking with model.attention=flash needs the flash-attn package")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], set_priority=True):
        return sdpa_attention(q, k, v)


def flex(q, k, v, mask=None) -> torch.Tensor:
    block_mask = mask if mask is not None else causal_block_mask(q.shape[2], k.shape[2], str(q.device))
    return flex_attention(q, k, v, block_mask)


_IMPL = {"sdpa": sdpa_attention, "flash": flash_attention, "flex": flex, "eager": eager_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", mask=None) -> torch.Tensor:
    """q: [B, H, Tq, D]; k, v: [B, K, Tk, D] with H % K == 0. Returns [B, H, Tq, D]."""
    return _IMPL[backend](q, k, v, mask)
