"""Adam moments for a grown model: the weights' index maps, rescaled to the child's gradient scale.

Rule: a child entry that copies parent entry e gets  exp_avg' = s * exp_avg[e],  exp_avg_sq' = s^2 * exp_avg_sq[e],
where s = (child gradient of that entry) / (parent gradient of e) at the moment of growth. Because Adam's
update m/sqrt(v) does not change when gradients are rescaled, the child's first update of every copied entry
equals the update the parent would have made, and fresh child gradients blend into moments of the same scale
(no transient). This is Staged Training's rule (block-diagonal x2: m/2, v/4) for our dense construction.
New entries (new units, zero coordinates) and whole identity blocks start from zero moments; keep Adam's step
count. The scales (checked against real gradients by the tests), with k copies of the residual stream and
c = sqrt(D/(k*d)):
  embedding, o_proj, down_proj: 1/(k*c)      (residual-stream gradient)
  q_proj rows of a head with n copies, gate/up rows of a neuron with n copies: 1/n
  k_proj/v_proj rows: sum over the KV group's copied query heads of 1/copies, / G (exact for regular layouts)
  input/post-attention norms: c/k;  final norm: c/k untied, c^2 tied;  untied lm_head: 1
  biases: as their rows (readers) or residual coordinates (writers); LayerNorm shifts as their gains;
  qk-norm gains: 1 (summed over all heads, as in the parent for regular layouts)
Caveat: readers (q/k/v/gate/up/lm_head) hold parent weights divided by their input copies while the Adam step
per entry is unchanged, so their relative step is k times the parent's: a short LR re-warmup is advisable.
stack/interleave copies reuse the moments of the block they copy (scales as above; not exact there either).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from scaletrain.growth import width
from scaletrain.growth.plan import EMBED, FINAL_BIAS, FINAL_NORM, HEAD, GrowthPlan, Recipe, _identity, _split

KINDS = {"exp_avg": 1, "exp_avg_sq": 2}  # power of the gradient scale


def _map2d(m: torch.Tensor, out_map: width.DimMap, in_map: width.DimMap, row_s: torch.Tensor, col_s: torch.Tensor) -> torch.Tensor:
    core = m.float()[out_map.src.clamp(min=0)][:, in_map.src.clamp(min=0)] * row_s[:, None] * col_s[None, :]
    keep = out_map.copied[:, None] & in_map.copied[None, :]
    return torch.where(keep, core, torch.zeros(())).to(m.dtype)


def _map1d(m: torch.Tensor, dmap: width.DimMap, s: float) -> torch.Tensor:
    return torch.where(dmap.copied, m.float()[dmap.src.clamp(min=0)] * s, torch.zeros(())).to(m.dtype)


def moment_tensor(plan: GrowthPlan, child_name: str, m: torch.Tensor, kind: str) -> torch.Tensor:
    """Child moment `kind` ("exp_avg" | "exp_avg_sq") of parameter `child_name` from the parent moment `m` of
    the parameter its recipe reads (same source as `plan.child_tensors()`)."""
    power = KINDS[kind]
    h = plan.hidden
    resid = (1.0 / (h.k * h.c)) ** power
    ones = lambda n: torch.ones(n)  # noqa: E731
    if child_name == EMBED:
        return _map2d(m, _identity(m.shape[0]), h.map, ones(m.shape[0]) * resid, ones(h.map.n_child))
    if child_name == HEAD:
        return _map2d(m, _identity(m.shape[0]), h.map, ones(m.shape[0]), ones(h.map.n_child))
    if child_name in (FINAL_NORM, FINAL_BIAS):
        s = h.c * h.c if plan.parent.tie_word_embeddings else h.c / h.k
        return _map1d(m, h.map, s**power)
    layer, suffix = _split(child_name)
    if plan.layers[layer].identity:  # a new block: no gradient history
        return torch.zeros(_child_shape(plan, suffix), dtype=m.dtype)
    if suffix.endswith(("layernorm.weight", "layernorm.bias")):
        return _map1d(m, h.map, (h.c / h.k) ** power)
    proj = suffix.split(".")[1]
    if proj in ("q_norm", "k_norm"):
        return m.clone()
    if suffix.endswith(".bias"):
        return _bias_moment(plan, proj, m, power)
    if proj in ("o_proj", "down_proj"):
        in_map = plan.q_rows if proj == "o_proj" else plan.ffn
        return _map2d(m, h.map, in_map, ones(h.map.n_child) * resid, ones(in_map.n_child))
    if proj == "q_proj":
        out_map, row = plan.q_rows, 1.0 / plan.heads.count
        row = row.repeat_interleave(plan.parent.head_dim)
    elif proj in ("k_proj", "v_proj"):
        out_map = plan.kv_rows
        row = width.grad_scale_kv(plan.heads, plan.kv, plan.parent.num_heads // plan.parent.num_kv_heads)
        row = row.repeat_interleave(plan.parent.head_dim)
    else:  # gate_proj / up_proj
        out_map, row = plan.ffn, 1.0 / plan.ffn.count
    return _map2d(m, out_map, h.map, row**power, ones(h.map.n_child))


def _bias_moment(plan: GrowthPlan, proj: str, m: torch.Tensor, power: int) -> torch.Tensor:
    """A bias's moment scales like the rows of its weight (readers) or the residual stream (writers)."""
    h = plan.hidden
    if proj in ("o_proj", "down_proj"):
        return _map1d(m, h.map, (1.0 / (h.k * h.c)) ** power)
    if proj == "q_proj":
        out_map, row = plan.q_rows, (1.0 / plan.heads.count).repeat_interleave(plan.parent.head_dim)
    elif proj in ("k_proj", "v_proj"):
        out_map = plan.kv_rows
        row = width.grad_scale_kv(plan.heads, plan.kv, plan.parent.num_heads // plan.parent.num_kv_heads)
        row = row.repeat_interleave(plan.parent.head_dim)
    else:
        out_map, row = plan.ffn, 1.0 / plan.ffn.count
    return torch.where(out_map.copied, m.float()[out_map.src.clamp(min=0)] * row**power, torch.zeros(())).to(m.dtype)


def _child_shape(plan: GrowthPlan, suffix: str) -> tuple[int, ...]:
    return plan.child_shapes[f"model.layers.0.{suffix}"]


def moment_tensors(plan: GrowthPlan, kind: str) -> Iterator[tuple[str, Recipe]]:
    """Like `plan.child_tensors()`, for one Adam moment: `recipe(read_parent_moment)` -> child moment."""
    for name, recipe in plan.child_tensors():
        yield name, Recipe(recipe.sources, _moment_fn(plan, name, recipe.sources[0], kind))


def _moment_fn(plan: GrowthPlan, name: str, source: str, kind: str) -> Callable:
    return lambda read: moment_tensor(plan, name, read(source), kind)


def grow_moments(plan: GrowthPlan, exp_avg: dict, exp_avg_sq: dict) -> tuple[dict, dict]:
    """Per-parameter parent moments (keyed by HF parameter name; a tied model's head shares the embedding
    entry) -> child moments keyed the same way."""
    m = {name: r(exp_avg.__getitem__) for name, r in moment_tensors(plan, "exp_avg")}
    v = {name: r(exp_avg_sq.__getitem__) for name, r in moment_tensors(plan, "exp_avg_sq")}
    return m, v
