"""Which `transformers` architecture computes the same function as a given set of model switches, and back.

    switches (model.*)                                              transformers architecture
    rmsnorm swiglu, rope, sequential, bias any                      Llama (attention_bias = mlp_bias = bias)
      + attention_window, no bias                                   Mistral
      + attention_window, bias                                      SmolLM3 (no_rope_layers all 1, every layer windowed)
      + qk_norm (window optional), no bias                          Qwen3 (q_norm/k_norm over head_dim)
    rmsnorm swiglu, position none, sequential, bias any, window any SmolLM3 (no_rope_layers all 0: NoPE everywhere)
    layernorm, position none, no window, else as a row below        StableLM / Phi / Persimmon (qk_norm any) with
                                                                    partial_rotary_factor 0 (no dims rotated)
    rmsnorm gelu|relu2, rope, sequential, bias any                  Arcee (plain up/down MLP, hidden_act)
    layernorm gelu|relu2, rope, sequential, bias any, window any    Starcoder2 (c_fc/c_proj, use_bias)
      + qk_norm, MHA, no window                                     Persimmon (fused per-head query_key_value)
    layernorm gelu|relu2, rope, parallel, bias any, qk_norm any     Phi (fc1/fc2, dense, lm_head bias kept zero)
    layernorm swiglu, rope, no bias, parallel any, qk_norm any      StableLM (use_parallel_residual,
                                                                    qk_layernorm per head, full rotary)
    layernorm gelu, alibi, no bias, MHA, intermediate = 4 x hidden  MPT (fused Wqkv)
Anything else refuses with one line saying why. Exactness rests on two facts: a zero bias is no bias (biases
the other side always has are zero-filled for bias=false exports), and one norm shared by all heads is a
per-head norm whose copies are equal. RoPE exports rotate the whole head (partial_rotary_factor 1), NoPE ones none.
`model.num_labels > 0` exports the same family's `...ForSequenceClassification` (`score`).
Import maps the architectures back (config.json `architectures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from scaletrain.config import ModelConfig
from scaletrain.errors import UserError, model_error_line
from scaletrain.hf import arch_rules as rules
from scaletrain.hf.arch_config import hf_config, model_values  # noqa: F401 (hf_config re-exported)
from scaletrain.hf.tensor_map import Adapter
from scaletrain.model.variants import check_model


@dataclass(frozen=True)
class Plan:
    family: str  # "Llama", "Mistral", ... (transformers class prefix)
    model_type: str
    adapter: Adapter  # ours -> HF names (export) or HF -> ours (import)

    def architecture(self, m: ModelConfig) -> str:
        return f"{self.family}ForSequenceClassification" if m.num_labels else f"{self.family}ForCausalLM"


def _needs(family: str, need: dict) -> Optional[str]:
    missing = [k for k, ok in need.items() if not ok]
    return f"{family}, which needs {', '.join(missing)}" if missing else None


def _refuse(m: ModelConfig) -> Optional[str]:
    """Why no transformers architecture computes this model, or None."""
    if m.position == "alibi":
        why = _needs("MPT", {
            "model.norm=layernorm": m.norm == "layernorm", "model.ffn=gelu": m.ffn == "gelu", "model.bias=false": not m.bias,
            "no qk_norm": not m.qk_norm, "no attention_window": not m.attention_window, "no parallel_block": not m.parallel_block,
            "num_kv_heads == num_heads": m.num_kv_heads == m.num_heads,
            "intermediate_size == 4 x hidden_size": m.intermediate_size == 4 * m.hidden_size})
        return f"ALiBi exports only as {why}" if why else None
    if m.position == "none":
        return _refuse_nope(m)
    if m.norm == "rmsnorm":
        if m.parallel_block:
            return "parallel_block with RMSNorm: the transformers parallel-block models (StableLM, GPT-J, Phi) use LayerNorm"
        if m.ffn == "swiglu":
            if m.bias and m.qk_norm:
                return "bias with qk_norm: Qwen3 (the RMSNorm qk-norm architecture) has no MLP biases; use model.bias=false"
            return None
        if m.qk_norm or m.attention_window:
            return f"ffn={m.ffn} with RMSNorm exports as Arcee, which has no qk_norm or sliding window"
        return None
    if m.ffn == "swiglu":
        if m.bias:
            return "layernorm + swiglu exports as StableLM, which has no o_proj or MLP biases; use model.bias=false"
        if m.attention_window:
            return "layernorm + swiglu exports as StableLM, which has no sliding window"
        return None
    if m.parallel_block:
        return f"layernorm + {m.ffn} with parallel_block exports as Phi, which has no sliding window" if m.attention_window else None
    if m.qk_norm:
        why = _needs("Persimmon", {"no attention_window": not m.attention_window,
                                   "num_kv_heads == num_heads (MHA)": m.num_kv_heads == m.num_heads})
        return f"layernorm + {m.ffn} with qk_norm exports as {why}" if why else None
    return None


def _refuse_nope(m: ModelConfig) -> Optional[str]:
    """NoPE: SmolLM3 with no_rope_layers all 0 (RMSNorm), or a LayerNorm family rotating 0 dims of each head."""
    pre = "model.position=none (NoPE)"
    if m.norm == "rmsnorm":
        why = _needs("SmolLM3 (no_rope_layers all 0)", {
            "model.ffn=swiglu": m.ffn == "swiglu", "no qk_norm": not m.qk_norm, "no parallel_block": not m.parallel_block,
            "an even head size (transformers checks RoPE settings even where no layer uses them)": m.head_dim % 2 == 0})
        return f"{pre} with RMSNorm exports as {why}" if why else None
    if m.attention_window:
        return (f"{pre} with LayerNorm exports as StableLM / Phi / Persimmon with partial_rotary_factor 0, none of "
                "which has a sliding window")
    if m.ffn == "swiglu":
        return "layernorm + swiglu exports as StableLM, which has no o_proj or MLP biases; use model.bias=false" if m.bias else None
    if m.parallel_block:
        return None
    why = _needs("Persimmon (partial_rotary_factor 0)", {"num_kv_heads == num_heads (MHA)": m.num_kv_heads == m.num_heads})
    return f"{pre} with LayerNorm + {m.ffn} and sequential blocks exports as {why}" if why else None


def _family(m: ModelConfig) -> str:
    if m.position == "alibi":
        return "Mpt"
    if m.norm == "rmsnorm" and m.position == "none":
        return "SmolLM3"
    if m.norm == "rmsnorm":
        if m.ffn != "swiglu":
            return "Arcee"
        if m.qk_norm:
            return "Qwen3"
        if m.attention_window:
            return "SmolLM3" if m.bias else "Mistral"
        return "Llama"
    if m.ffn == "swiglu":
        return "StableLm"
    if m.parallel_block:
        return "Phi"
    return "Persimmon" if m.qk_norm or m.position == "none" else "Starcoder2"


MODEL_TYPES = {"Llama": "llama", "Mistral": "mistral", "Qwen3": "qwen3", "Arcee": "arcee", "Starcoder2": "starcoder2",
               "StableLm": "stablelm", "Mpt": "mpt", "SmolLM3": "smollm3", "Phi": "phi", "Persimmon": "persimmon"}


def export_plan(m: ModelConfig) -> Plan:
    """The architecture to export `m` as; UserError with the one-line reason when there is none."""
    why = _refuse(m)
    if why:
        raise UserError(f"cannot export to Hugging Face: {why}")
    fam = _family(m)
    plan = Plan(fam, MODEL_TYPES[fam], Adapter(rules.export_rule(fam, m), f"scaletrain -> {fam}"))
    import transformers

    if not hasattr(transformers, plan.architecture(m)):
        raise UserError(f"cannot export to Hugging Face: transformers {version('transformers')} has no {plan.architecture(m)}")
    return plan


def transformers_model(m: ModelConfig, attn_implementation: str = "eager", **config_edits):
    """A transformers model (random weights, fp32) of the architecture that computes what `m` computes, from the
    config.json fields `export-hf` writes: the bench's peer and the tests' oracle."""
    import torch
    import transformers

    plan = export_plan(m)
    cfg = {**hf_config(plan, m, 1, 2, "float32", 2 if m.num_labels else None), **config_edits}
    hc = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return getattr(transformers, plan.architecture(m))._from_config(hc, attn_implementation=attn_implementation,
                                                                    dtype=torch.float32)


def import_plan(cfg: dict, where: str, peek: Callable[[str], Optional[bool]] = lambda name: None) -> tuple[ModelConfig, Adapter]:
    """(our ModelConfig, HF -> ours tensor adapter) for an HF config.json dict."""
    archs = cfg.get("architectures") or []
    fam, task = None, None
    for a in archs:
        for f in MODEL_TYPES:
            for suffix in ("ForCausalLM", "ForSequenceClassification"):
                if a == f + suffix:
                    fam, task = f, suffix
    if fam is None:
        what = ", ".join(archs) if archs else f"model_type '{cfg.get('model_type', '?')}'"
        known = ", ".join(f"{f}ForCausalLM" for f in MODEL_TYPES)
        raise UserError(f"{where} is a {what} model; importable: {known} (and their ForSequenceClassification)")
    values = model_values(fam, cfg, where, peek)
    if task == "ForSequenceClassification":
        n = values["num_labels"] = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
        if n < 2:  # a regression or reward head: one score, trained with another loss
            raise UserError(f"{where} is a {fam}{task} with num_labels={n} (a regression or reward model); scaletrain's "
                            "classifiers need 2 or more classes")
        problem = cfg.get("problem_type")
        if problem not in (None, "single_label_classification"):  # sigmoid per label / a regression: another loss
            raise UserError(f"{where} is a {fam}{task} with problem_type={problem}; scaletrain's classifiers pick one "
                            "class per text (single_label_classification, softmax cross-entropy)")
        id2label = cfg.get("id2label") if isinstance(cfg.get("id2label"), dict) else {}
        names = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(n)]
        if names != [f"LABEL_{i}" for i in range(n)] and len(set(names)) == n:  # kept through fine-tuning and export
            values["label_names"] = names
    try:
        m = ModelConfig(**values)
    except ValidationError as e:
        raise UserError(f"{where}: {model_error_line(e)}") from None
    try:
        check_model(m)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return m, Adapter(rules.import_rule(fam, m, cfg), f"{fam} -> scaletrain")


def peeker(d: Path) -> Callable[[str], Optional[bool]]:
    """peek(name): whether stored tensor `name` of HF dir `d` has a non-zero entry (None: not stored)."""
    from scaletrain.weights.files import _load_bin, _safe_open, weight_files

    def peek(name: str) -> Optional[bool]:
        for f in weight_files(d):
            if f.suffix == ".safetensors":
                with _safe_open(f) as fh:
                    if name in fh.keys():
                        return bool(fh.get_tensor(name).float().abs().max() > 0)
            else:
                sd = _load_bin(f)
                if name in sd:
                    return bool(sd[name].float().abs().max() > 0)
        return None

    return peek
