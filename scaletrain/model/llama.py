"""A Llama-style decoder: pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

Parameter names and shapes equal Hugging Face `LlamaForCausalLM`'s state-dict keys
(`model.layers.0.self_attn.q_proj.weight`, ...), so import, export and growth are name maps.
Architecture switches (LayerNorm, GELU/relu2 FFN, qk-norm, sliding window, ALiBi/NoPE, RoPE scaling,
parallel blocks, biases; see variants.py) swap pieces from blocks.py / masks.py; the defaults are Llama.
Nothing here knows about DeepSpeed: parallelism is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from scaletrain.kernels import cpu_attention
from scaletrain.model.attention import attention
from scaletrain.model.blocks import NORMS, Embedding, Linear, make_ffn, make_norm, rope_inv_freq
from scaletrain.model.docmask import document_positions
from scaletrain.model.masks import attention_mask
from scaletrain.model.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy  # noqa: F401 (IGNORE_INDEX re-exported)


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
    # architecture switches (scaletrain/model/variants.py); the defaults are Llama
    norm: str = "rmsnorm"
    ffn: str = "swiglu"
    qk_norm: bool = False
    attention_window: Optional[int] = None
    position: str = "rope"
    rope_scaling: Optional[dict] = field(default=None, hash=False)
    parallel_block: bool = False
    bias: bool = False
    num_labels: int = 0  # > 0: sequence classifier (scaletrain/model/classify.py)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, model_cfg) -> "LlamaShape":
        return cls(**{name: getattr(model_cfg, name) for name in cls.__dataclass_fields__})

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        kv = self.num_kv_heads * hd
        norm = 2 if self.norm == "layernorm" and self.bias else 1  # parameters per normed coordinate
        attn = d * d * 2 + d * kv * 2 + (2 * d + 2 * kv if self.bias else 0) + (2 * hd * norm if self.qk_norm else 0)
        mats = 3 if self.ffn == "swiglu" else 2
        ffn = mats * d * f + ((mats - 1) * f + d if self.bias else 0)
        per_layer = attn + ffn + d * norm * (1 if self.parallel_block else 2)
        total = self.num_layers * per_layer + d * norm
        head = self.num_labels or v  # the classifier's `score` replaces the LM head
        if include_embedding:
            total += v * d + (head * d if self.num_labels or not self.tie_word_embeddings else 0)
        else:
            total += head * d  # the output head still does matmul work, tied to the embedding or not
        return total


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor, scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, head_dim] (fp32) for integer `positions` [T] ([B, T] -> [B, T, head_dim]);
    `scaling`: model.rope_scaling (HF linear / llama3 rope types)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] or per-row [B, 1, T, D], already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        d, hd = s.hidden_size, s.head_dim
        self.q_proj = Linear(d, s.num_heads * hd, bias=s.bias)
        self.k_proj = Linear(d, s.num_kv_heads * hd, bias=s.bias)
        self.v_proj = Linear(d, s.num_kv_heads * hd, bias=s.bias)
        self.o_proj = Linear(s.num_heads * hd, d, bias=s.bias)
        if s.qk_norm:  # one norm over head_dim shared by all heads (Qwen3's q_norm/k_norm), before RoPE
            self.q_norm, self.k_norm = make_norm(s, hd), make_norm(s, hd)

    def forward(self, x, cos, sin, cache: Optional[list] = None, mask=None):
        b, t, _ = x.shape
        hd = self.s.head_dim
        q = self.q_proj(x).view(b, t, self.s.num_heads, hd)
        k = self.k_proj(x).view(b, t, self.s.num_kv_heads, hd)
        if self.s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.s.num_kv_heads, hd).transpose(1, 2)
        if self._rope_in_kernel(q, k, v, cos, cache, mask):  # CPU training: no rotated copy of q, k in memory
            out = cpu_attention.attention(q, k, v, cos, sin)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if cos is not None:  # model.position=rope; alibi lives in the mask, none has no positions
            q, k = self.rope(q, k, cos, sin)
        if cache is not None:  # keys and values of earlier positions, extended in place
            k, v = extend_cache(cache, k, v, self.s.max_seq_len)
        out = attention(q, k, v, self.s.attention, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _rope_in_kernel(self, q, k, v, cos, cache, mask) -> bool:
        """Whether the CPU attention kernel takes the rotation too (kernels/cpu_attention.py): the sdpa
        backend where it would run the kernel anyway, and one rope table for all rows (no documents)."""
        return (self.s.attention == "sdpa" and cache is None and mask is None and type(self).rope is Attention.rope
                and cpu_attention.rope_applies(q, cos) and cpu_attention.applies(q, k, v))

    def rope(self, q, k, cos, sin):
        """Rotate queries and keys (a fused kernel may take over: model/fused_ops.py)."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def extend_cache(cache: list, k: torch.Tensor, v: torch.Tensor, limit: int = 1 << 62) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's KV cache, `cache` = [k buffer, v buffer, positions held], with `k`, `v` ([B, H_kv, T, D]) appended;
    returns views of every position so far. The buffers double when full, up to `limit` (the context): a decode
    step writes one position instead of copying the whole cache (torch.cat per token moved O(T^2) bytes)."""
    held, t = (cache[2] if cache else 0), k.shape[2]
    if not cache or held + t > cache[0].shape[2]:
        size = max(held + t, min(max(64, 2 * (held + t)), limit))
        grown = [x.new_empty(x.shape[0], x.shape[1], size, x.shape[3]) for x in (k, v)]
        for new, old in zip(grown, cache[:2]):
            new[:, :, :held] = old[:, :, :held]
        cache[:] = [*grown, held]
    cache[0][:, :, held:held + t] = k
    cache[1][:, :, held:held + t] = v
    cache[2] = held + t
    return cache[0][:, :, :held + t], cache[1][:, :, :held + t]


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.parallel = s.parallel_block
        self.input_layernorm = make_norm(s, s.hidden_size)
        self.self_attn = Attention(s)
        if not s.parallel_block:  # parallel blocks share input_layernorm (GPT-J / StableLM / Phi layout)
            self.post_attention_layernorm = make_norm(s, s.hidden_size)
        self.mlp = make_ffn(s)

    def forward(self, x, cos, sin, cache=None, mask=None):
        if self.parallel:
            h = self.input_layernorm(x)
            return x + self.self_attn(h, cos, sin, cache, mask) + self.mlp(h)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = make_norm(s, s.hidden_size)
        if s.position == "rope":  # not in checkpoints (persistent=False); cast with the model like weights
            cos, sin = rope_cache(s)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def fill_buffers(self, s: LlamaShape) -> None:
        """Compute the buffers of a body built on the meta device and then given real, empty memory."""
        if s.position == "rope":
            cos, sin = rope_cache(s)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)


ROPE_CACHE_MAX = 16384  # positions whose cos/sin the model keeps as buffers (larger: computed per forward)


def rope_cache(s: LlamaShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [min(max_seq_len, ROPE_CACHE_MAX), head_dim] in fp32, for LlamaBody's buffers. Why a cache:
    in a whole-model torch.compile, inductor fused cos/sin of the positions into every layer's RoPE kernels
    (transcendentals per element, per layer, forward and backward: 25 of 230 ms of a one-process CPU step
    at the bench's shape). The trainer compiles block by block (train/perf.py) and was not affected."""
    n = min(s.max_seq_len, ROPE_CACHE_MAX)
    if torch.get_default_device().type == "meta":  # shapes only: torch's meta pow/cos import dynamo (~1.7 s)
        return torch.empty(n, s.head_dim), torch.empty(n, s.head_dim)
    return rope_tables(s.head_dim, s.rope_theta, torch.arange(n), s.rope_scaling)


def layer_inputs(s: LlamaShape, t: int, start_pos: int, doc_ids: Optional[torch.Tensor], device, dtype,
                 cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """(cos, sin, mask) every layer shares, built once per forward: RoPE tables in the compute dtype (None
    unless model.position=rope; [B, 1, T, D] per document row with doc_ids) and the attention mask (None:
    plain causal; see masks.py). `cache`: `rope_cache(s)` tables, read instead of computed where they reach."""
    cos = sin = None
    if s.position == "rope":
        positions = torch.arange(start_pos, start_pos + t, device=device) if doc_ids is None else document_positions(doc_ids)
        if cache is not None and start_pos + t <= cache[0].shape[0]:  # document positions are < t too
            cos, sin = (c[start_pos : start_pos + t] if doc_ids is None else c[positions] for c in cache)
        else:
            cos, sin = rope_tables(s.head_dim, s.rope_theta, positions, s.rope_scaling)
        cos, sin = cos.to(dtype), sin.to(dtype)
        if doc_ids is not None:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]: broadcast over heads
    return cos, sin, attention_mask(s, doc_ids, t, start_pos, device, dtype)


class LMHead(Linear):
    """The output projection; with targets it returns the loss directly so the chunked path can
    skip materialising logits. Called as a module (not via its weight) so ZeRO-3 gathers it."""

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None, loss_chunk: int = 0):
        if targets is None:
            return super().forward(h)
        if loss_chunk:
            return linear_cross_entropy(h, self.weight, targets, loss_chunk)
        return cross_entropy(super().forward(h), targets)


class LlamaForCausalLM(nn.Module):
    def __init__(self, shape: LlamaShape, loss_chunk: int = 0):
        super().__init__()
        self.shape = shape
        self.loss_chunk = loss_chunk  # train.loss_chunk: tokens per chunk of the fused head+loss (0 = plain)
        self.recompute_layers = False  # train.activation_checkpointing (set by the trainer's build_model)
        self.model = LlamaBody(shape)
        self.lm_head = LMHead(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.model.embed_tokens.weight.is_meta:
            return  # built for its shapes only (see blocks.Embedding)
        std = self.shape.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, NORMS):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def hidden_states(self, input_ids: torch.Tensor, caches: Optional[list] = None, start_pos: int = 0,
                      doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden]. `doc_ids` [B, T] (packed
        documents, see docmask.py): attention stays within a document, RoPE restarts per document."""
        x = self.model.embed_tokens(input_ids)
        assert doc_ids is None or caches is None, "document masking is for training windows, not KV-cached decoding"
        cache = (self.model.rope_cos, self.model.rope_sin) if self.shape.position == "rope" else None
        cos, sin, mask = layer_inputs(self.shape, input_ids.shape[1], start_pos, doc_ids, x.device, x.dtype, cache)
        recompute = self.recompute_layers and caches is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if recompute:  # only the layer's input is kept; its forward runs again in the backward (no dropout:
                x = checkpoint(layer, x, cos, sin, None, mask, use_reentrant=False)  # the same numbers)
            else:
                x = layer(x, cos, sin, None if caches is None else caches[i], mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, caches=None, start_pos: int = 0,
                doc_ids: Optional[torch.Tensor] = None):
        """Without targets: logits [B, T, V]. With targets (same shape as input_ids, already shifted,
        IGNORE_INDEX where no loss): the mean cross-entropy over counted tokens (fp32 softmax; chunked
        without full logits when `loss_chunk` > 0)."""
        h = self.hidden_states(input_ids, caches, start_pos, doc_ids)
        return self.lm_head(h, targets, self.loss_chunk)

    def next_token_logits(self, input_ids: torch.Tensor, caches: list, start_pos: int) -> torch.Tensor:
        """[V] logits after the last of `input_ids` ([1, T]), extending `caches`: the head runs on the last
        position only (a prompt's [T, V] logits were computed and thrown away)."""
        h = self.hidden_states(input_ids, caches, start_pos)
        return self.lm_head(h[:, -1:])[0, -1]

    def materialize(self, device: str | torch.device = "cpu") -> "LlamaForCausalLM":
        """This model, built on the meta device, given real but empty memory on `device`: buffers computed and a
        tied head tied again (to_empty gives it memory of its own); filling the weights is the caller's job."""
        self.to_empty(device=device)
        self.model.fill_buffers(self.shape)
        if self.shape.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def new_caches(self) -> list:
        return [[] for _ in self.model.layers]
