"""A Llama-style decoder: pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

Parameter names and shapes equal Hugging Face `LlamaForCausalLM`'s state-dict keys
(`model.layers.0.self_attn.q_proj.weight`, ...), so import, export and growth are name maps.
Nothing here knows about DeepSpeed: parallelism is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.model.attention import attention

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LlamaShape:
    """The architecture; built from `ModelConfig` by `LlamaShape.from_config`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    norm_eps: float = 1e-5
    attention: str = "sdpa"
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, model_cfg) -> "LlamaShape":
        return cls(**{name: getattr(model_cfg, name) for name in cls.__dataclass_fields__})

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
        total = self.num_layers * per_layer + d
        if include_embedding:
            total += v * d * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            total += v * d  # the output head still does matmul work
        return total


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


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, head_dim] (fp32) for integer `positions` [T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        d, hd = s.hidden_size, s.head_dim
        self.q_proj = nn.Linear(d, s.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, s.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, s.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(s.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, cache: Optional[list] = None):
        b, t, _ = x.shape
        hd = self.s.head_dim
        q = self.q_proj(x).view(b, t, self.s.num_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.s.num_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.s.num_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # [k, v] of earlier positions, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        out = attention(q, k, v, self.s.attention)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.model = LlamaBody(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.shape.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: torch.Tensor, caches: Optional[list] = None, start_pos: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden]."""
        t = input_ids.shape[1]
        positions = torch.arange(start_pos, start_pos + t, device=input_ids.device)
        cos, sin = rope_tables(self.shape.head_dim, self.shape.rope_theta, positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, caches=None, start_pos: int = 0):
        """Without targets: logits [B, T, V]. With targets (same shape as input_ids, already shifted,
        IGNORE_INDEX where no loss): the mean cross-entropy over counted tokens."""
        h = self.hidden_states(input_ids, caches, start_pos)
        logits = self.lm_head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)

    def new_caches(self) -> list:
        return [[] for _ in self.model.layers]
