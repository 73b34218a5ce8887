"""config.json of each exported `transformers` architecture (export), reading one, and our model section for
one (import).

Which architecture computes which switch combination: arch_map.py. Tensor names: arch_rules.py.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional

from scaletrain.config import ModelConfig
from scaletrain.errors import UserError
from scaletrain.model.variants import ROPE_TYPES, rope_scaling_kind

RMS_FAMILIES = ("Llama", "Mistral", "Qwen3", "Arcee", "SmolLM3")
GATED = ("Llama", "Mistral", "Qwen3", "StableLm", "SmolLM3")  # SwiGLU (gate/up/down with silu)
# transformers' partial_rotary_factor when config.json does not say (they rotate part of each head by default)
PARTIAL_ROTARY_DEFAULT = {"StableLm": 0.25, "Phi": 0.5, "Persimmon": 0.5}


def read_hf_config(d: Path) -> dict:
    p = d / "config.json"
    if not d.is_dir():
        raise UserError(f"{d} is not a directory; give a Hugging Face model directory (config.json + weights)")
    if not p.is_file():
        raise UserError(f"{d} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{p} is not valid JSON (or nests too deeply)") from None
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p} does not hold a JSON object")
    return cfg


def _rope_fields(m: ModelConfig, extra: Optional[dict] = None) -> dict:
    """Both spellings (transformers 4.x rope_theta/rope_scaling, 5.x rope_parameters)."""
    kind = rope_scaling_kind(m.rope_scaling)
    scaling = None if kind == "default" else {"rope_type": kind, **{k: m.rope_scaling[k] for k in ROPE_TYPES[kind]}}
    params = {"rope_type": kind, "rope_theta": m.rope_theta, **(scaling or {}), **(extra or {})}
    return {"rope_theta": m.rope_theta, "rope_scaling": scaling, "rope_parameters": params, **(extra or {})}


def hf_config(plan, m: ModelConfig, bos: Optional[int], eos: Optional[int], dtype: str, pad: Optional[int]) -> dict:
    """config.json for `m` exported as `plan`'s architecture (num_labels > 0: sequence classification)."""
    common = {
        "architectures": [plan.architecture(m)], "model_type": plan.model_type, "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_word_embeddings, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "initializer_range": m.init_std, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
        "transformers_version": version("transformers"),
    }
    if m.num_labels:
        names = m.label_names or [f"LABEL_{i}" for i in range(m.num_labels)]
        common["id2label"] = {str(i): name for i, name in enumerate(names)}
        common["label2id"] = {name: i for i, name in enumerate(names)}
        common["problem_type"] = "single_label_classification"
    fam = plan.family
    if fam == "Mpt":
        return {**common, "d_model": m.hidden_size, "n_heads": m.num_heads, "n_layers": m.num_layers,
                "expansion_ratio": 4, "max_seq_len": m.max_seq_len, "layer_norm_epsilon": m.norm_eps, "no_bias": True,
                "learned_pos_emb": False, "norm_type": "low_precision_layernorm", "logit_scale": None,
                "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "softmax_scale": None,
                                "qk_ln": False, "clip_qkv": None, "attn_pdrop": 0, "prefix_lm": False}}
    shape = {"hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
             "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
             "max_position_embeddings": m.max_seq_len, "attention_dropout": 0.0}
    act = "silu" if m.ffn == "swiglu" else m.ffn
    if fam in RMS_FAMILIES:
        out = {**common, **shape, **_rope_fields(m), "hidden_act": act, "rms_norm_eps": m.norm_eps}
        if fam in ("Llama", "Arcee", "SmolLM3"):
            out.update(attention_bias=m.bias, mlp_bias=m.bias)
        if fam in ("Llama", "Arcee"):
            out["pretraining_tp"] = 1
        if fam == "Mistral":
            out["sliding_window"] = m.attention_window
        if fam == "Qwen3":
            out.update(attention_bias=False, use_sliding_window=bool(m.attention_window),
                       sliding_window=m.attention_window, max_window_layers=0)
        if fam == "SmolLM3":  # every layer NoPE (position=none) or every layer RoPE; every layer windowed or none
            out.update(no_rope_layers=[int(m.position == "rope")] * m.num_layers, no_rope_layer_interval=4,
                       use_sliding_window=bool(m.attention_window), sliding_window=m.attention_window,
                       layer_types=["sliding_attention" if m.attention_window else "full_attention"] * m.num_layers)
        return out
    if fam == "Starcoder2":
        return {**common, **shape, **_rope_fields(m), "hidden_act": act, "norm_epsilon": m.norm_eps, "use_bias": m.bias,
                "sliding_window": m.attention_window, "residual_dropout": 0.0, "embedding_dropout": 0.0}
    full_rotary = _rope_fields(m, {"partial_rotary_factor": 0.0 if m.position == "none" else 1.0})  # NoPE: no dims
    if fam == "Phi":
        return {**common, **shape, **full_rotary, "hidden_act": act, "layer_norm_eps": m.norm_eps,
                "qk_layernorm": m.qk_norm, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if fam == "Persimmon":
        return {**common, **shape, **full_rotary, "hidden_act": act, "layer_norm_eps": m.norm_eps,
                "qk_layernorm": m.qk_norm, "hidden_dropout": 0.0}
    return {**common, **shape, **full_rotary, "hidden_act": act,  # StableLm
            "layer_norm_eps": m.norm_eps, "use_qkv_bias": False, "qk_layernorm": m.qk_norm,
            "use_parallel_residual": m.parallel_block, "hidden_dropout": 0.0}


# ---- import -----------------------------------------------------------------------------------------


def _rope_scaling_from_hf(fam: str, cfg: dict, where: str) -> tuple[float, Optional[dict], str]:
    """(rope_theta, rope_scaling, position): partial_rotary_factor 0 rotates nothing, i.e. NoPE."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = merged.get("partial_rotary_factor")
    partial = _get(cfg, "partial_rotary_factor", PARTIAL_ROTARY_DEFAULT.get(fam, 1.0)) if partial is None else partial
    if partial == 0 and fam in PARTIAL_ROTARY_DEFAULT:
        return theta, None, "none"
    if partial != 1.0:
        raise UserError(f"{where}: partial rotary embeddings (partial_rotary_factor {partial}) are not supported (1: RoPE, 0: NoPE)")
    kind = rope_scaling_kind(merged) if ("rope_type" in merged or "type" in merged) else "default"
    if kind == "default":
        return theta, None, "rope"
    if kind not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE scaling '{kind}' is not supported (valid: default, {', '.join(ROPE_TYPES)})")
    scaling = {k: merged[k] for k in ROPE_TYPES[kind] if k in merged}
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:  # transformers' own default
        scaling["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
    return theta, {"rope_type": kind, **scaling}, "rope"


# Families whose transformers config class defaults tie_word_embeddings to True: config.json files saved by
# transformers leave a value out when it equals the default.
TIED_BY_DEFAULT = ("Starcoder2", "SmolLM3")


def _get(cfg: dict, key: str, default):
    value = cfg.get(key)
    return default if value is None else value


def _mpt_values(cfg: dict, where: str) -> dict:
    attn = cfg.get("attn_config") or {}
    if not attn.get("alibi", True) or attn.get("qk_ln") or attn.get("clip_qkv") or attn.get("softmax_scale") \
            or cfg.get("learned_pos_emb", True) or cfg.get("logit_scale") or _get(cfg, "expansion_ratio", 4) != 4:
        raise UserError(f"{where}: only MPT with ALiBi, no learned positions, no qk_ln/clip_qkv/softmax_scale/logit_scale "
                        "and expansion_ratio 4 can be imported")
    d, heads = cfg["d_model"], cfg["n_heads"]
    return dict(hidden_size=d, num_layers=cfg["n_layers"], num_heads=heads, num_kv_heads=heads, intermediate_size=4 * d,
                vocab_size=cfg["vocab_size"], max_seq_len=_get(cfg, "max_seq_len", 2048),
                norm_eps=_get(cfg, "layer_norm_epsilon", 1e-5), tie_word_embeddings=_get(cfg, "tie_word_embeddings", True),
                norm="layernorm", ffn="gelu", position="alibi", bias=False)


def _smollm3_layout(cfg: dict, layers: int, where: str) -> tuple[str, Optional[int]]:
    """(position, window) of a SmolLM3 config: every layer alike or refused (as SmolLM3Config fills the lists)."""
    interval = _get(cfg, "no_rope_layer_interval", 4)
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(set(rope[:layers])) != 1:
        raise UserError(f"{where}: no_rope_layers mixes RoPE and NoPE layers; scaletrain's model.position applies to all layers")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types") or ["sliding_attention" if window and not r else "full_attention" for r in rope[:layers]]
    if window and len(set(types[:layers])) != 1:
        raise UserError(f"{where}: sliding window on only some layers (layer_types) is not supported")
    return ("rope" if rope[0] else "none"), (window if types[0] == "sliding_attention" else None)


def model_values(fam: str, cfg: dict, where: str, peek: Callable[[str], Optional[bool]]) -> dict:
    """Our model section for an HF config of family `fam`. `peek(name)`: is that stored tensor non-zero."""
    if fam == "Mpt":
        return _mpt_values(cfg, where)
    heads = cfg.get("num_attention_heads", 32)
    values = dict(hidden_size=cfg.get("hidden_size", 4096), num_layers=cfg.get("num_hidden_layers", 32), num_heads=heads,
                  num_kv_heads=_get(cfg, "num_key_value_heads", heads), intermediate_size=cfg.get("intermediate_size", 11008),
                  vocab_size=cfg.get("vocab_size", 32000), max_seq_len=_get(cfg, "max_position_embeddings", 2048),
                  tie_word_embeddings=_get(cfg, "tie_word_embeddings", fam in TIED_BY_DEFAULT))
    values["rope_theta"], values["rope_scaling"], values["position"] = _rope_scaling_from_hf(fam, cfg, where)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * heads != values["hidden_size"]:
        raise UserError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads is not supported")
    act = _get(cfg, "hidden_act", "silu")
    gated = fam in GATED
    if gated and act != "silu":
        raise UserError(f"{where}: hidden_act '{act}' is not supported for {fam} (SwiGLU with silu only)")
    if not gated and act not in ("gelu", "relu2"):
        raise UserError(f"{where}: hidden_act '{act}' is not supported (gelu or relu2)")
    values["ffn"] = "swiglu" if gated else act
    if fam in ("Llama", "Arcee", "SmolLM3"):
        if bool(cfg.get("attention_bias")) != bool(cfg.get("mlp_bias")):
            raise UserError(f"{where}: attention_bias != mlp_bias; scaletrain has one model.bias switch")
        values.update(bias=bool(cfg.get("attention_bias")), norm_eps=_get(cfg, "rms_norm_eps", 1e-6))
        if fam == "SmolLM3":
            values["position"], values["attention_window"] = _smollm3_layout(cfg, values["num_layers"], where)
            if values["position"] == "none":
                values["rope_scaling"] = None  # NoPE layers read no RoPE settings
    elif fam in ("Mistral", "Qwen3"):
        if cfg.get("attention_bias"):
            raise UserError(f"{where}: attention_bias with a bias-free MLP is not supported")
        values.update(norm_eps=_get(cfg, "rms_norm_eps", 1e-6), qk_norm=fam == "Qwen3")
        window = cfg.get("sliding_window") if (fam == "Mistral" or cfg.get("use_sliding_window")) else None
        if window and fam == "Qwen3" and _get(cfg, "max_window_layers", 0) > 0:
            raise UserError(f"{where}: sliding window on only some layers (max_window_layers > 0) is not supported")
        values["attention_window"] = window
    elif fam == "Starcoder2":
        values.update(norm="layernorm", norm_eps=_get(cfg, "norm_epsilon", 1e-5), bias=bool(_get(cfg, "use_bias", True)),
                      attention_window=cfg.get("sliding_window"))
    elif fam == "StableLm":
        # Our LayerNorm has a bias exactly when the linears do: take bias=true when the norms' biases are in use.
        in_use = bool(cfg.get("use_qkv_bias")) or bool(peek("model.layers.0.input_layernorm.bias"))
        values.update(norm="layernorm", norm_eps=_get(cfg, "layer_norm_eps", 1e-5), bias=in_use,
                      qk_norm=bool(cfg.get("qk_layernorm")), parallel_block=bool(cfg.get("use_parallel_residual")))
    else:  # Phi (parallel) / Persimmon (sequential, MHA): every linear and norm always has a bias
        qkv = "self_attn.q_proj.bias" if fam == "Phi" else "self_attn.query_key_value.bias"
        in_use = any(bool(peek(f"model.layers.0.{n}")) for n in (qkv, "input_layernorm.bias"))
        values.update(norm="layernorm", norm_eps=_get(cfg, "layer_norm_eps", 1e-5), bias=in_use,
                      qk_norm=bool(cfg.get("qk_layernorm")), parallel_block=fam == "Phi")
        if fam == "Persimmon":
            values["num_kv_heads"] = heads  # Persimmon is multi-head attention only
    return values
