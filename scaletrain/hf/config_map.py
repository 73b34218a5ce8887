"""Hugging Face `config.json` (LlamaForCausalLM) <-> our `ModelConfig`, refusing what our model cannot compute.

Both spellings of RoPE are understood: transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters: {rope_type, rope_theta}`); exports write both so either version loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from scaletrain.config import ModelConfig
from scaletrain.errors import UserError

ARCH = "LlamaForCausalLM"
# HF field -> (our field, default when absent: LlamaConfig's defaults)
FIELDS = {
    "hidden_size": ("hidden_size", 4096),
    "num_hidden_layers": ("num_layers", 32),
    "num_attention_heads": ("num_heads", 32),
    "num_key_value_heads": ("num_kv_heads", None),  # None: same as num_attention_heads
    "intermediate_size": ("intermediate_size", 11008),
    "vocab_size": ("vocab_size", 32000),
    "max_position_embeddings": ("max_seq_len", 2048),
    "tie_word_embeddings": ("tie_word_embeddings", False),
    "rms_norm_eps": ("norm_eps", 1e-6),
}


def read_hf_config(d: Path) -> dict:
    p = d / "config.json"
    if not d.is_dir():
        raise UserError(f"{d} is not a directory; give a Hugging Face model directory (config.json + weights)")
    if not p.is_file():
        raise UserError(f"{d} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{p} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p} does not hold a JSON object")
    return cfg


def _rope(cfg: dict, where: str) -> float:
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise UserError(f"{where}: RoPE scaling '{kind}' is not supported (plain RoPE only)")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        theta = cfg.get("rope_theta", 10000.0)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "?")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise UserError(f"{where}: rope_scaling '{kind}' is not supported (plain RoPE only)")
    return float(theta)


def model_config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """Our ModelConfig for an HF Llama config dict; one-line UserError for anything we cannot represent."""
    archs = cfg.get("architectures") or []
    if ARCH not in archs:
        what = ", ".join(archs) if archs else f"model_type '{cfg.get('model_type', '?')}'"
        raise UserError(f"{where} is a {what} model; only {ARCH} can be imported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UserError(f"{where}: {flag}=true is not supported (our Llama has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act '{cfg['hidden_act']}' is not supported (SwiGLU with silu only)")
    values = {ours: cfg.get(hf, default) for hf, (ours, default) in FIELDS.items()}
    if values["num_kv_heads"] is None:
        values["num_kv_heads"] = values["num_heads"]
    values["rope_theta"] = _rope(cfg, where)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and values["num_heads"] and head_dim * values["num_heads"] != values["hidden_size"]:
        raise UserError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads "
                        f"({values['hidden_size']}/{values['num_heads']}) is not supported")
    try:
        m = ModelConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: {err['loc'][0]} = {err.get('input')!r} is not valid ({err['msg']})") from None
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads or m.head_dim % 2:
        raise UserError(f"{where}: {m.num_heads} heads / {m.num_kv_heads} KV heads do not fit hidden_size {m.hidden_size}")
    return m


def hf_config_from_model(m: ModelConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> dict:
    """A config.json that transformers 4.x and 5.x load as the same LlamaForCausalLM."""
    from importlib.metadata import version

    return {
        "architectures": [ARCH], "model_type": "llama",
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": m.tie_word_embeddings, "vocab_size": m.vocab_size,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "initializer_range": m.init_std, "use_cache": True, "pretraining_tp": 1,
        "torch_dtype": dtype, "dtype": dtype, "transformers_version": version("transformers"),
    }
