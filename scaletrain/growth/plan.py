"""Growth plan: validate parent -> child shapes, then yield one recipe per child tensor (streaming-friendly).

    plan = GrowthPlan(parent_shape, child_shape, GrowthSpec(depth_method="identity", noise_std=0.1))
    for name, recipe in plan.child_tensors():          # recipe.sources: the parent tensor(s) it reads
        child[name] = recipe(read_parent)              # read_parent(name) -> one parent tensor

What is exact (child logits == parent logits up to fp rounding):
* width, any sizes >= the parent's with head_dim kept: integer factors by duplication; non-integer hidden
  sizes by zero-expansion with the residual stream scaled by c = sqrt(D/(k*d)) (keeps every norm's eps, so the
  child's norm_eps equals the parent's); extra heads / KV heads / FFN neurons either new (random readers, zero
  writers; width_method="zero") or extra copies with split writers (width_method="copy").
* depth "identity" (zeroed o_proj/down_proj).  Not exact: depth "stack" and "interleave".
* noise_std > 0 keeps all of the above exact: noise sums to zero over the copies an input is read from, and
  identity blocks' reader weights (q/k/v/gate/up) get independent noise since their outputs are discarded.
  Embeddings, RMSNorm gains and a tied head get no noise (their copies must stay identical).
head_dim (hidden/heads) must stay the same: RoPE frequencies and the 1/sqrt(head_dim) scale depend on it.

Architecture switches (model.norm, ffn, qk_norm, bias, parallel_block, position, ...) are kept as in the parent:
* LayerNorm: duplicating the residual stream keeps its mean and variance, so gains and shifts are tiled
  (exact); a non-integer hidden factor would change both (zero coordinates), so it is refused.
* biases: readers' (q/k/v/gate/up) follow their rows (copied, 0 for new units); writers' (o_proj, down_proj)
  follow the residual coordinates (x c, 0 for new coordinates); identity blocks' writer biases are 0.
* gelu/relu2 FFNs are elementwise like SwiGLU: neurons copy exactly. qk_norm acts on head_dim: unchanged.
* parallel blocks: identity blocks are exact too (both branches write through zeroed projections).
* ALiBi: the slopes depend on num_heads, so heads (and hence hidden_size) must stay; depth and FFN grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import torch

from scaletrain.errors import UserError
from scaletrain.growth import depth, width
from scaletrain.model.llama import DecoderLayer, LlamaForCausalLM, LlamaShape
from scaletrain.weights.files import EMBED, FINAL_NORM, HEAD

WIDTH_METHODS = ("zero", "copy", "strict")
WIDTH_DIMS = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
FINAL_BIAS = "model.norm.bias"  # LayerNorm with model.bias


@dataclass(frozen=True)
class GrowthSpec:
    """How to grow. depth_method: identity | stack | interleave. insert (identity only): "end",
    "interleave" (spread evenly) or explicit child indices of the new blocks. width_method for non-integer
    head/KV/FFN counts: "zero" (new units), "copy" (extra copies, split writers) or "strict" (refuse
    non-integer factors). noise_std: symmetry-breaking noise relative to the RMS of the split weights
    (0 = none; 0.1 is about 20 dB SNR). seed: for noise and random new weights."""

    depth_method: str = "identity"
    insert: Union[str, Sequence[int]] = "end"
    width_method: str = "zero"
    noise_std: float = 0.0
    seed: int = 0
    new_std: float | None = None  # std of random new weights; None: the child's init_std


@dataclass(frozen=True)
class Recipe:
    """Builds one child tensor from the parent tensors named in `sources` (read via `read(name)`)."""

    sources: tuple[str, ...]
    fn: Callable[[Callable[[str], torch.Tensor]], torch.Tensor] = field(repr=False)

    def __call__(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return self.fn(read)


ARCH_KEYS = ("norm", "ffn", "qk_norm", "attention_window", "position", "rope_scaling", "parallel_block", "bias")


def validate(parent: LlamaShape, child: LlamaShape, spec: GrowthSpec) -> None:
    """Raise UserError (one line) when `parent` cannot grow into `child` under `spec`."""
    for key in ARCH_KEYS:
        if getattr(child, key) != getattr(parent, key):
            raise UserError(f"growth keeps the architecture: model.{key} is {getattr(parent, key)} in the parent, "
                            f"{getattr(child, key)} in the child")
    if parent.num_labels or child.num_labels:
        raise UserError("growth works on language models; grow the base model, then fine-tune the classifier")
    if parent.norm == "layernorm" and child.hidden_size % parent.hidden_size:
        raise UserError(f"model.norm=layernorm grows exactly only by an integer hidden factor (duplication keeps "
                        f"mean and variance; zero coordinates do not): {parent.hidden_size} -> {child.hidden_size}")
    # ALiBi's slope is fixed by a head's position; growing KV heads reorders the query heads (head_maps).
    if parent.position == "alibi" and (child.num_heads, child.num_kv_heads) != (parent.num_heads, parent.num_kv_heads):
        raise UserError("model.position=alibi: each head's slope depends on its index, so growth keeps num_heads "
                        f"({parent.num_heads}), num_kv_heads ({parent.num_kv_heads}) and hidden_size; "
                        "grow num_layers or intermediate_size")
    if spec.depth_method not in depth.DEPTH_METHODS:
        raise UserError(f"unknown depth method '{spec.depth_method}' (valid: {', '.join(depth.DEPTH_METHODS)})")
    if spec.width_method not in WIDTH_METHODS:
        raise UserError(f"unknown width method '{spec.width_method}' (valid: {', '.join(WIDTH_METHODS)})")
    if not math.isfinite(spec.noise_std) or spec.noise_std < 0:
        raise UserError(f"growth noise must be a finite number >= 0, got {spec.noise_std}")
    for dim in WIDTH_DIMS + ("num_layers",):
        a, b = getattr(parent, dim), getattr(child, dim)
        if b < a:
            raise UserError(f"growth cannot shrink {dim}: parent {a} -> child {b}")
    if child.vocab_size != parent.vocab_size:
        raise UserError(f"growth keeps the vocabulary: parent vocab_size {parent.vocab_size} != child {child.vocab_size}")
    if child.tie_word_embeddings != parent.tie_word_embeddings:
        raise UserError("growth keeps tie_word_embeddings as in the parent; set it the same in the child")
    if child.rope_theta != parent.rope_theta or child.norm_eps != parent.norm_eps:
        raise UserError("growth keeps rope_theta and norm_eps; set them as in the parent")
    if child.hidden_size % child.num_heads or child.num_heads % child.num_kv_heads:
        raise UserError(f"child hidden_size {child.hidden_size} must divide by num_heads {child.num_heads}, "
                        f"and num_heads by num_kv_heads {child.num_kv_heads}")
    if child.head_dim != parent.head_dim:
        raise UserError(f"growth keeps the head size: parent hidden/heads = {parent.head_dim}, child = {child.head_dim}; "
                        f"use num_heads = {child.hidden_size // parent.head_dim}" if child.hidden_size % parent.head_dim == 0
                        else f"growth keeps the head size {parent.head_dim}: child hidden_size must be a multiple of it")
    if spec.width_method == "strict":
        for dim in WIDTH_DIMS:
            a, b = getattr(parent, dim), getattr(child, dim)
            if b % a:
                raise UserError(f"width_method 'strict' needs integer growth factors: {dim} {a} -> {b}")
    try:
        width.head_maps(parent.num_heads, parent.num_kv_heads, child.num_heads, child.num_kv_heads, spec.width_method == "copy")
    except ValueError as e:
        raise UserError(f"cannot map attention heads {parent.num_heads}/{parent.num_kv_heads} kv -> "
                        f"{child.num_heads}/{child.num_kv_heads} kv exactly: {e}") from None
    if spec.depth_method == "identity" and not isinstance(spec.insert, str):
        pos, n_new = list(spec.insert), child.num_layers - parent.num_layers
        if len(set(pos)) != len(pos) or len(pos) != n_new or any(not 0 <= int(i) < child.num_layers for i in pos):
            raise UserError(f"insert positions {pos} must be {n_new} distinct child layer indices in [0, {child.num_layers})")
    elif spec.depth_method == "identity" and spec.insert not in depth.INSERT_MODES:
        raise UserError(f"unknown insert mode '{spec.insert}' (valid: {', '.join(depth.INSERT_MODES)} or a list of indices)")


class GrowthPlan:
    """The maps for one parent -> child growth; build tensors with `child_tensors()`."""

    def __init__(self, parent: LlamaShape, child: LlamaShape, spec: GrowthSpec = GrowthSpec()):
        validate(parent, child, spec)
        self.parent, self.child, self.spec = parent, child, spec
        fill = spec.width_method == "copy"
        self.hidden = width.HiddenMap.build(parent.hidden_size, child.hidden_size)
        self.heads, self.kv = width.head_maps(parent.num_heads, parent.num_kv_heads, child.num_heads, child.num_kv_heads, fill)
        self.ffn = width.tiled(parent.intermediate_size, child.intermediate_size, fill)
        self.layers = depth.layer_map(parent.num_layers, child.num_layers, spec.depth_method, spec.insert)
        hd = parent.head_dim
        self.q_rows, self.kv_rows = self.heads.expand(hd), self.kv.expand(hd)
        self.new_std = child.init_std if spec.new_std is None else spec.new_std
        self.suffixes = layer_suffixes(child)
        with torch.device("meta"):
            self.child_shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(child).state_dict().items()}

    @property
    def exact(self) -> bool:
        """True when the child computes the parent's function (up to fp rounding)."""
        return self.spec.depth_method == "identity" or self.child.num_layers == self.parent.num_layers

    @property
    def child_norm_eps(self) -> float:
        return self.parent.norm_eps  # unchanged by construction (residual scaled by c), see width.py

    def final_norm_scale(self) -> float:
        """Tied head reads the residual copies with E*c instead of E/k: divide the gain by k*c^2 (= D/d)."""
        h = self.hidden
        return 1.0 / (h.k * h.c * h.c) if self.parent.tie_word_embeddings else 1.0 / h.c

    # ---- streaming ------------------------------------------------------------------------------
    def child_tensors(self, include_tied: bool = False) -> Iterator[tuple[str, Recipe]]:
        """(child name, recipe) for every child parameter in state-dict order. A tied child's lm_head.weight
        is the embedding; it is yielded (same recipe) only with include_tied."""
        yield EMBED, Recipe((EMBED,), lambda read: self.tensor(EMBED, read(EMBED)))
        for i, src in enumerate(self.layers):
            for suffix in self.suffixes:
                pname = f"model.layers.{src.parent}.{suffix}"
                yield f"model.layers.{i}.{suffix}", Recipe((pname,), self._layer_fn(i, suffix, pname))
        yield FINAL_NORM, Recipe((FINAL_NORM,), lambda read: self.tensor(FINAL_NORM, read(FINAL_NORM)))
        if FINAL_BIAS in self.child_shapes:
            yield FINAL_BIAS, Recipe((FINAL_BIAS,), lambda read: self.tensor(FINAL_BIAS, read(FINAL_BIAS)))
        if not self.child.tie_word_embeddings:
            yield HEAD, Recipe((HEAD,), lambda read: self.tensor(HEAD, read(HEAD)))
        elif include_tied:
            yield HEAD, Recipe((EMBED,), lambda read: self.tensor(EMBED, read(EMBED)))

    def _layer_fn(self, i: int, suffix: str, pname: str):
        return lambda read: self.tensor(f"model.layers.{i}.{suffix}", read(pname))

    def tensor(self, child_name: str, p: torch.Tensor) -> torch.Tensor:
        """Build child tensor `child_name` from its one parent tensor `p` (the source named by its recipe)."""
        s, h = self.spec, self.hidden
        gen = width._gen(s.seed, child_name)
        kw = dict(init_std=self.new_std, noise=s.noise_std, gen=gen)
        if child_name == EMBED:  # writes the residual stream: copies * c, new coordinates 0, no noise
            return width.grow_linear(p, _identity(p.shape[0]), h.map, out_scale=h.c, split=False)
        if child_name == FINAL_NORM:
            return width.grow_vector(p, h.map, self.final_norm_scale())
        if child_name == FINAL_BIAS:
            return width.grow_bias(p, h.map, self.final_norm_scale())
        if child_name == HEAD:  # untied: an ordinary reader of the (normed) residual stream
            return width.grow_linear(p, _identity(p.shape[0]), h.map, new_cols="random", **kw)
        layer, suffix = _split(child_name)
        src = self.layers[layer]
        if suffix.endswith("layernorm.weight"):
            return width.grow_vector(p, h.map, 1.0 / h.c)
        if suffix.endswith("layernorm.bias"):  # LayerNorm (integer hidden factors only: c == 1)
            return width.grow_bias(p, h.map, 1.0 / h.c)
        proj = suffix.split(".")[1]
        if proj in ("q_norm", "k_norm"):  # acts on head_dim, which growth keeps
            return p.clone()
        if suffix.endswith(".bias"):
            return self._bias(proj, p, src.identity)
        if proj in ("o_proj", "down_proj"):  # writers: rows are residual coordinates
            in_map = self.q_rows if proj == "o_proj" else self.ffn
            if src.identity:
                return torch.zeros(h.map.n_child, in_map.n_child, dtype=p.dtype)
            return width.grow_linear(p, h.map, in_map, out_scale=h.c, **kw)
        out_map = {"q_proj": self.q_rows, "k_proj": self.kv_rows, "v_proj": self.kv_rows}.get(proj, self.ffn)
        w = width.grow_linear(p, out_map, h.map, new_rows="random", new_cols="random", **kw)
        if src.identity and s.noise_std > 0:  # outputs are discarded by the zero writer: any noise is exact
            w = (w.float() + torch.randn(w.shape, generator=gen) * s.noise_std * w.float().pow(2).mean().sqrt()).to(p.dtype)
        return w

    def _bias(self, proj: str, p: torch.Tensor, identity: bool) -> torch.Tensor:
        h = self.hidden
        if proj in ("o_proj", "down_proj"):  # writes residual coordinates: x c, 0 on new ones (and in identity blocks)
            return torch.zeros(h.map.n_child, dtype=p.dtype) if identity else width.grow_bias(p, h.map, h.c)
        out_map = {"q_proj": self.q_rows, "k_proj": self.kv_rows, "v_proj": self.kv_rows}.get(proj, self.ffn)
        return width.grow_bias(p, out_map)


def layer_suffixes(s: LlamaShape) -> tuple[str, ...]:
    """A decoder block's parameter names for this shape (state-dict order), e.g. 'self_attn.q_proj.weight'."""
    with torch.device("meta"):
        return tuple(DecoderLayer(s).state_dict())


def _identity(n: int) -> width.DimMap:
    return width.DimMap(torch.arange(n), n)


def _split(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj.weight' -> (3, 'self_attn.q_proj.weight')"""
    parts = name.split(".")
    return int(parts[2]), ".".join(parts[3:])


def grow_state_dict(parent_sd: dict, parent: LlamaShape, child: LlamaShape, spec: GrowthSpec = GrowthSpec()) -> dict:
    """Whole-dict convenience over `child_tensors`; a tied child gets lm_head.weight as the same tensor,
    as `LlamaForCausalLM.state_dict()` has it."""
    plan = GrowthPlan(parent, child, spec)
    out = {name: recipe(parent_sd.__getitem__) for name, recipe in plan.child_tensors()}
    if child.tie_word_embeddings:
        out[HEAD] = out[EMBED]
    return out
