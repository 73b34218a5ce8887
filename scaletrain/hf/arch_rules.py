"""Per-architecture tensor rules (see tensor_map.py): our state-dict names <-> Starcoder2 / StableLM / MPT /
Phi / Persimmon names.

Llama, Mistral, Qwen3, Arcee and SmolLM3 use our names unchanged. Each rule maps one arriving tensor to what
is emitted.
"""

from __future__ import annotations

from typing import Optional

import torch

from scaletrain.config import ModelConfig
from scaletrain.hf.tensor_map import LAYER, Out, consuming, deferred, must_be_zero, renamed, same, zeros

NORM_WEIGHTS = ("input_layernorm.weight", "post_attention_layernorm.weight")
FINAL = "model.norm.weight"


def _is_norm_weight(name: str) -> bool:
    return name == FINAL or name.endswith(NORM_WEIGHTS)


def _is_norm_bias(name: str) -> bool:
    return name == "model.norm.bias" or name.endswith(("input_layernorm.bias", "post_attention_layernorm.bias"))


def _with_norm_bias(name: str, shape: tuple) -> list[Out]:
    """A bias-free LayerNorm exported where the norm always has a bias: a zero bias (exact)."""
    return [same(name, shape)[0], zeros(name.removesuffix("weight") + "bias", shape)]


# ---- Starcoder2: plain MLP named c_fc / c_proj; LayerNorm always with bias ---------------------------
SC2 = ((".mlp.up_proj.", ".mlp.c_fc."), (".mlp.down_proj.", ".mlp.c_proj."))


def _starcoder2_out(m: ModelConfig):
    def rule(name, shape):
        hf = name
        for a, b in SC2:
            hf = hf.replace(a, b)
        if not m.bias and _is_norm_weight(name):
            return [renamed(name, hf, shape), zeros(hf.removesuffix("weight") + "bias", shape)]
        return [renamed(name, hf, shape)]
    return rule


def _starcoder2_in(m: ModelConfig):
    def rule(name, shape):
        if not m.bias and _is_norm_bias(name):
            return [must_be_zero(name, "use_bias=false here and scaletrain's LayerNorm has a bias only with model.bias=true")]
        ours = name
        for a, b in SC2:
            ours = ours.replace(b, a)
        return [renamed(name, ours, shape)]
    return rule


# ---- StableLM: LayerNorm always with bias, q/k LayerNorm per head (one module per head, no bias) -----
def _stablelm_out(m: ModelConfig):
    def rule(name, shape):
        if _is_norm_weight(name):
            return _with_norm_bias(name, shape)
        for ours, hf, n in (("q_norm", "q_layernorm", m.num_heads), ("k_norm", "k_layernorm", m.num_kv_heads)):
            if name.endswith(f"self_attn.{ours}.weight"):
                pre = name.removesuffix(f"{ours}.weight")
                return [renamed(name, f"{pre}{hf}.norms.{h}.weight", shape) for h in range(n)]
        return same(name, shape)
    return rule


def _stablelm_in(m: ModelConfig, use_qkv_bias: bool):
    hd = m.head_dim
    # heads seen so far per norm: the last to arrive (in whatever order: safetensors lists names as text,
    # norms.10 before norms.2) emits the shared norm
    arrived: dict[str, set[int]] = {}

    def collapse(pre: str, hf: str, ours: str, n: int):
        names = tuple(f"{pre}{hf}.norms.{h}.weight" for h in range(n))

        def make(buf):
            first = buf[names[0]]
            if any(not torch.equal(buf[x], first) for x in names[1:]):
                from scaletrain.errors import UserError

                raise UserError(f"{pre}{hf}: per-head norms differ; scaletrain's qk_norm shares one norm across heads")
            return first
        outs = [Out(f"{pre}{ours}.weight", (hd,), consuming(names, make))]
        return outs + ([zeros(f"{pre}{ours}.bias", (hd,))] if m.bias else [])

    def rule(name, shape):
        if _is_norm_bias(name):
            return same(name, shape) if m.bias else [must_be_zero(name, "scaletrain's LayerNorm has a bias only with model.bias=true")]
        for hf, ours, n in (("q_layernorm", "q_norm", m.num_heads), ("k_layernorm", "k_norm", m.num_kv_heads)):
            if f".self_attn.{hf}.norms." in name:
                pre, h = name.split(f"{hf}.norms.")[0], int(name.split(".norms.")[1].split(".")[0])
                heads = arrived.setdefault(pre + hf, set())
                heads.add(h)
                if len(heads) < n:
                    return [deferred(name)]
                del arrived[pre + hf]  # (the rule runs once for the specs, once for the tensors)
                return collapse(pre, hf, ours, n)
        outs = same(name, shape)
        if m.bias and _bias_not_stored(name):
            outs.append(zeros(name.removesuffix("weight") + "bias", (shape[0],)))
        return outs

    def _bias_not_stored(name: str) -> bool:
        """StableLM stores q/k/v biases only with use_qkv_bias, o_proj and MLP biases never."""
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return not use_qkv_bias
        return name.endswith(("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"))
    return rule


# ---- MPT: transformer.* names, fused Wqkv = [q; k; v] -------------------------------------------------
MPT_NAMES = {"input_layernorm.weight": "norm_1.weight", "post_attention_layernorm.weight": "norm_2.weight",
             "self_attn.o_proj.weight": "attn.out_proj.weight", "mlp.up_proj.weight": "ffn.up_proj.weight",
             "mlp.down_proj.weight": "ffn.down_proj.weight"}
MPT_TOP = {"model.embed_tokens.weight": "transformer.wte.weight", FINAL: "transformer.norm_f.weight"}


def _mpt_out(m: ModelConfig):
    d = m.hidden_size

    def rule(name, shape):
        if name in MPT_TOP:
            return [renamed(name, MPT_TOP[name], shape)]
        hit = LAYER.match(name)
        if hit is None:
            return same(name, shape)  # lm_head / score
        i, rest = hit["i"], hit["rest"]
        if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            return [deferred(name)]
        if rest == "self_attn.v_proj.weight":
            qkv = tuple(f"{hit['pre']}self_attn.{p}_proj.weight" for p in "qkv")
            return [Out(f"transformer.blocks.{i}.attn.Wqkv.weight", (3 * d, d),
                        consuming(qkv, lambda buf: torch.cat([buf[x] for x in qkv])))]
        return [renamed(name, f"transformer.blocks.{i}.{MPT_NAMES[rest]}", shape)]
    return rule


def _mpt_in(m: ModelConfig):
    d = m.hidden_size
    back = {v: k for k, v in MPT_NAMES.items()}
    top = {v: k for k, v in MPT_TOP.items()}

    def rule(name, shape):
        if name in top:
            return [renamed(name, top[name], shape)]
        if not name.startswith("transformer.blocks."):
            return same(name, shape)
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        pre = f"model.layers.{i}."
        if rest == "attn.Wqkv.weight":
            return [Out(f"{pre}self_attn.{p}_proj.weight", (d, d), (lambda buf, j=j: buf[name][j * d:(j + 1) * d]))
                    for j, p in enumerate("qkv")]
        return [renamed(name, pre + back[rest], shape)]
    return rule


# ---- Phi / Persimmon: every linear and LayerNorm always has a bias (zero-filled for bias=false) ----------
PHI = ((".self_attn.o_proj.", ".self_attn.dense."), (".self_attn.q_norm.", ".self_attn.q_layernorm."),
       (".self_attn.k_norm.", ".self_attn.k_layernorm."), (".mlp.up_proj.", ".mlp.fc1."), (".mlp.down_proj.", ".mlp.fc2."),
       ("model.norm.", "model.final_layernorm."))
PERSIMMON = ((".self_attn.o_proj.", ".self_attn.dense."), (".self_attn.q_norm.", ".self_attn.q_layernorm."),
             (".self_attn.k_norm.", ".self_attn.k_layernorm."), (".mlp.up_proj.", ".mlp.dense_h_to_4h."),
             (".mlp.down_proj.", ".mlp.dense_4h_to_h."), ("model.norm.", "model.final_layernorm."))
NO_BIAS = "scaletrain's linears and LayerNorms have biases only with model.bias=true"


def _rename(name: str, table, back: bool = False) -> str:
    for a, b in table:
        name = name.replace(b, a) if back else name.replace(a, b)
    return name


def _interleave(ts: list, heads: int) -> torch.Tensor:
    """Persimmon's fused query_key_value: per head [q_h; k_h; v_h] (rows), for weights and biases alike."""
    return torch.stack([t.reshape(heads, -1, *t.shape[1:]) for t in ts], dim=1).reshape(-1, *ts[0].shape[1:])


def _deinterleave(t: torch.Tensor, heads: int, j: int) -> torch.Tensor:
    return t.reshape(heads, 3, -1, *t.shape[1:])[:, j].reshape(-1, *t.shape[1:])


def _persimmon_fuse(m: ModelConfig, name: str) -> Optional[list]:
    """q/k/v (weights, then biases) -> query_key_value once v arrives; None for every other tensor."""
    hit = LAYER.match(name)
    if hit is None or not hit["rest"].startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
        return None
    kind = hit["rest"].rsplit(".", 1)[1]  # weight | bias
    if not hit["rest"].startswith("self_attn.v_proj."):
        return [deferred(name)]
    d, pre = m.hidden_size, hit["pre"]
    qkv = tuple(f"{pre}self_attn.{p}_proj.{kind}" for p in "qkv")
    shape = (3 * d, d) if kind == "weight" else (3 * d,)
    outs = [Out(f"{pre}self_attn.query_key_value.{kind}", shape,
                consuming(qkv, lambda buf: _interleave([buf[x] for x in qkv], m.num_heads)))]
    if kind == "weight" and not m.bias:
        outs.append(zeros(f"{pre}self_attn.query_key_value.bias", (3 * d,)))
    return outs


def _always_biased_out(m: ModelConfig, table, head_bias: bool, fuse: bool = False):
    def rule(name, shape):
        fused = _persimmon_fuse(m, name) if fuse else None
        if fused is not None:
            return fused
        hf = _rename(name, table)
        outs = [renamed(name, hf, shape)]
        if not m.bias and name.endswith(".weight") and not name.startswith(("model.embed_tokens.", "lm_head.", "score.")):
            outs.append(zeros(hf.removesuffix("weight") + "bias", (shape[0],)))
        if head_bias and name == FINAL and not m.num_labels:  # Phi's lm_head has a bias: zero (tied or not)
            outs.append(zeros("lm_head.bias", (m.vocab_size,)))
        return outs
    return rule


def _always_biased_in(m: ModelConfig, table, split: bool = False):
    d = m.hidden_size

    def rule(name, shape):
        if name == "lm_head.bias":
            return [must_be_zero(name, "scaletrain's output head has no bias")]
        if name.endswith(".bias") and not m.bias:
            return [must_be_zero(name, NO_BIAS)]
        if split and ".self_attn.query_key_value." in name:
            pre, kind = name.split("query_key_value.")
            return [Out(f"{pre}{p}_proj.{kind}", (d, d) if kind == "weight" else (d,),
                        (lambda buf, j=j: _deinterleave(buf[name], m.num_heads, j))) for j, p in enumerate("qkv")]
        return [renamed(name, _rename(name, table, back=True), shape)]
    return rule


def export_rule(family: str, m: ModelConfig):
    if family == "Starcoder2":
        return _starcoder2_out(m)
    if family == "StableLm":
        return _stablelm_out(m)
    if family == "Mpt":
        return _mpt_out(m)
    if family == "Phi":
        return _always_biased_out(m, PHI, head_bias=True)
    if family == "Persimmon":
        return _always_biased_out(m, PERSIMMON, head_bias=False, fuse=True)
    return same


def import_rule(family: str, m: ModelConfig, cfg: dict):
    if family == "Starcoder2":
        return _starcoder2_in(m)
    if family == "StableLm":
        return _stablelm_in(m, bool(cfg.get("use_qkv_bias")))
    if family == "Mpt":
        return _mpt_in(m)
    if family == "Phi":
        return _always_biased_in(m, PHI)
    if family == "Persimmon":
        return _always_biased_in(m, PERSIMMON, split=True)
    return same
