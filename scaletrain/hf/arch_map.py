"""Which `transformers` architecture computes the same function as a given set of model switches, and back.

    switches (model.*)                                              transformers architecture
    rmsnorm swiglu, rope, sequential, bias any                      Llama (attention_bias = mlp_bias = bias)
      + attention_window, no bias                                   Mistral
      + qk_norm (window optional), no bias                          Qwen3 (q_norm/k_norm over head_dim)
    rmsnorm gelu|relu2, rope, sequential, bias any                  Arcee (plain up/down MLP, hidden_act)
    layernorm gelu|relu2, rope, sequential, bias any, window any    Starcoder2 (c_fc/c_proj, use_bias)
    layernorm swiglu, rope, no bias, parallel any, qk_norm any      StableLM (use_parallel_residual,
                                                                    qk_layernorm per head, full rotary)
    layernorm gelu, alibi, no bias, MHA, intermediate = 4 x hidden  MPT (fused Wqkv)
Anything else refuses with one line saying why. Exactness rests on two facts: a zero bias is no bias (LayerNorm
biases are zero-filled for bias=false exports), and one norm shared by all heads is a per-head norm whose
copies are equal. `model.num_labels > 0` exports the same family's `...ForSequenceClassification` (`score`).
Import maps the architectures back (config.json `architectures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from scaletrain.config import ModelConfig
from scaletrain.errors import UserError
from scaletrain.hf import arch_rules as rules
from scaletrain.hf.tensor_map import Adapter
from scaletrain.model.variants import ROPE_TYPES, check_model, rope_scaling_kind


@dataclass(frozen=True)
class Plan:
    family: str  # "Llama", "Mistral", ... (transformers class prefix)
    model_type: str
    adapter: Adapter  # ours -> HF names (export) or HF -> ours (import)

    def architecture(self, m: ModelConfig) -> str:
        return f"{self.family}ForSequenceClassification" if m.num_labels else f"{self.family}ForCausalLM"


def _refuse(m: ModelConfig) -> Optional[str]:
    """Why no transformers architecture computes this model, or None."""
    if m.position == "none":
        return "model.position=none (no position encoding): no transformers causal LM architecture computes that"
    if m.position == "alibi":
        need = {"model.norm=layernorm": m.norm == "layernorm", "model.ffn=gelu": m.ffn == "gelu",
                "model.bias=false": not m.bias, "no qk_norm": not m.qk_norm, "no attention_window": not m.attention_window,
                "no parallel_block": not m.parallel_block, "num_kv_heads == num_heads": m.num_kv_heads == m.num_heads,
                "intermediate_size == 4 x hidden_size": m.intermediate_size == 4 * m.hidden_size}
        missing = [k for k, ok in need.items() if not ok]
        return f"ALiBi exports only as MPT, which needs {', '.join(missing)}" if missing else None
    if m.norm == "rmsnorm":
        if m.parallel_block:
            return "parallel_block with RMSNorm: the transformers parallel-block models (StableLM, GPT-J, Phi) use LayerNorm"
        if m.ffn == "swiglu":
            if m.bias and (m.qk_norm or m.attention_window):
                return ("bias with qk_norm or attention_window: Qwen3 / Mistral / Qwen2 have no biases in the MLP "
                        "(or o_proj); only Llama has all of them")
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
    if m.qk_norm or m.parallel_block:
        return f"layernorm + {m.ffn} exports as Starcoder2, which has no qk_norm or parallel block"
    return None


def _family(m: ModelConfig) -> str:
    if m.position == "alibi":
        return "Mpt"
    if m.norm == "rmsnorm":
        if m.ffn != "swiglu":
            return "Arcee"
        return "Qwen3" if m.qk_norm else "Mistral" if m.attention_window else "Llama"
    return "StableLm" if m.ffn == "swiglu" else "Starcoder2"


MODEL_TYPES = {"Llama": "llama", "Mistral": "mistral", "Qwen3": "qwen3", "Arcee": "arcee", "Starcoder2": "starcoder2",
               "StableLm": "stablelm", "Mpt": "mpt"}


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


# ---- config.json ------------------------------------------------------------------------------------


def _rope_fields(m: ModelConfig, extra: Optional[dict] = None) -> dict:
    """Both spellings (transformers 4.x rope_theta/rope_scaling, 5.x rope_parameters)."""
    kind = rope_scaling_kind(m.rope_scaling)
    scaling = None if kind == "default" else {"rope_type": kind, **{k: m.rope_scaling[k] for k in ROPE_TYPES[kind]}}
    params = {"rope_type": kind, "rope_theta": m.rope_theta, **(scaling or {}), **(extra or {})}
    return {"rope_theta": m.rope_theta, "rope_scaling": scaling, "rope_parameters": params, **(extra or {})}


def hf_config(plan: Plan, m: ModelConfig, bos: Optional[int], eos: Optional[int], dtype: str, pad: Optional[int]) -> dict:
    """config.json for `m` exported as `plan`'s architecture (num_labels > 0: sequence classification)."""
    common = {
        "architectures": [plan.architecture(m)], "model_type": plan.model_type, "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_word_embeddings, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "initializer_range": m.init_std, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
        "transformers_version": version("transformers"),
    }
    if m.num_labels:
        common["id2label"] = {str(i): f"LABEL_{i}" for i in range(m.num_labels)}
        common["label2id"] = {f"LABEL_{i}": i for i in range(m.num_labels)}
        common["problem_type"] = "single_label_classification"
    if plan.family == "Mpt":
        return {**common, "d_model": m.hidden_size, "n_heads": m.num_heads, "n_layers": m.num_layers,
                "expansion_ratio": 4, "max_seq_len": m.max_seq_len, "layer_norm_epsilon": m.norm_eps, "no_bias": True,
                "learned_pos_emb": False, "norm_type": "low_precision_layernorm", "logit_scale": None,
                "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "softmax_scale": None,
                                "qk_ln": False, "clip_qkv": None, "attn_pdrop": 0, "prefix_lm": False}}
    shape = {"hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
             "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
             "max_position_embeddings": m.max_seq_len, "attention_dropout": 0.0}
    act = "silu" if m.ffn == "swiglu" else m.ffn
    fam = plan.family
    if fam in ("Llama", "Mistral", "Qwen3", "Arcee"):
        out = {**common, **shape, **_rope_fields(m), "hidden_act": act, "rms_norm_eps": m.norm_eps}
        if fam in ("Llama", "Arcee"):
            out.update(attention_bias=m.bias, mlp_bias=m.bias, pretraining_tp=1)
        if fam == "Mistral":
            out["sliding_window"] = m.attention_window
        if fam == "Qwen3":
            out.update(attention_bias=False, use_sliding_window=bool(m.attention_window),
                       sliding_window=m.attention_window, max_window_layers=0)
        return out
    if fam == "Starcoder2":
        return {**common, **shape, **_rope_fields(m), "hidden_act": act, "norm_epsilon": m.norm_eps, "use_bias": m.bias,
                "sliding_window": m.attention_window, "residual_dropout": 0.0, "embedding_dropout": 0.0}
    return {**common, **shape, **_rope_fields(m, {"partial_rotary_factor": 1.0}), "hidden_act": act,  # StableLm
            "layer_norm_eps": m.norm_eps, "use_qkv_bias": False, "qk_layernorm": m.qk_norm,
            "use_parallel_residual": m.parallel_block, "hidden_dropout": 0.0}


# ---- import -----------------------------------------------------------------------------------------


def _rope_scaling_from_hf(cfg: dict, where: str) -> tuple[float, Optional[dict]]:
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{where}: partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    kind = rope_scaling_kind(merged) if ("rope_type" in merged or "type" in merged) else "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE scaling '{kind}' is not supported (valid: default, {', '.join(ROPE_TYPES)})")
    return theta, {"rope_type": kind, **{k: merged[k] for k in ROPE_TYPES[kind] if k in merged}}


def _get(cfg: dict, key: str, default):
    value = cfg.get(key)
    return default if value is None else value


def _model_values(fam: str, cfg: dict, where: str, peek: Callable[[str], Optional[bool]]) -> dict:
    """Our model section for an HF config of family `fam`. `peek(name)`: is that stored tensor non-zero."""
    if fam == "Mpt":
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
    heads = cfg.get("num_attention_heads", 32)
    values = dict(hidden_size=cfg.get("hidden_size", 4096), num_layers=cfg.get("num_hidden_layers", 32), num_heads=heads,
                  num_kv_heads=_get(cfg, "num_key_value_heads", heads), intermediate_size=cfg.get("intermediate_size", 11008),
                  vocab_size=cfg.get("vocab_size", 32000), max_seq_len=_get(cfg, "max_position_embeddings", 2048),
                  tie_word_embeddings=_get(cfg, "tie_word_embeddings", False))
    values["rope_theta"], values["rope_scaling"] = _rope_scaling_from_hf(cfg, where)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * heads != values["hidden_size"]:
        raise UserError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads is not supported")
    act = _get(cfg, "hidden_act", "silu")
    gated = fam in ("Llama", "Mistral", "Qwen3", "StableLm")
    if gated and act != "silu":
        raise UserError(f"{where}: hidden_act '{act}' is not supported for {fam} (SwiGLU with silu only)")
    if not gated and act not in ("gelu", "relu2"):
        raise UserError(f"{where}: hidden_act '{act}' is not supported (gelu or relu2)")
    values["ffn"] = "swiglu" if gated else act
    if fam in ("Llama", "Arcee"):
        if bool(cfg.get("attention_bias")) != bool(cfg.get("mlp_bias")):
            raise UserError(f"{where}: attention_bias != mlp_bias; scaletrain has one model.bias switch")
        values.update(bias=bool(cfg.get("attention_bias")), norm_eps=_get(cfg, "rms_norm_eps", 1e-6))
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
    return values


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
    values = _model_values(fam, cfg, where, peek)
    if task == "ForSequenceClassification":
        values["num_labels"] = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
    try:
        m = ModelConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: {err['loc'][0] if err['loc'] else 'config'} = {err.get('input')!r} is not valid ({err['msg']})") from None
    try:
        check_model(m)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads or (m.position == "rope" and m.head_dim % 2):
        raise UserError(f"{where}: {m.num_heads} heads / {m.num_kv_heads} KV heads do not fit hidden_size {m.hidden_size}")
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
