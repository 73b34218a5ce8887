"""README.md model card of an export: architecture, data, steps, tokens, final val loss, lineage, usage."""

from __future__ import annotations

from pathlib import Path

from scaletrain import __version__
from scaletrain.config import ModelConfig
from scaletrain.model.variants import ROPE_TYPES, rope_scaling_kind


def _fmt(value, spec: str = ",") -> str:
    return "n/a" if value is None else format(value, spec)


def _data_sources(data: dict) -> str:
    """data.source, or a data.mix's sources with their weights."""
    mix = data.get("mix") if isinstance(data.get("mix"), list) else []
    parts = [f"{m.get('name') or m.get('source')} ×{m.get('weight'):g}" for m in mix
             if isinstance(m, dict) and isinstance(m.get("weight"), (int, float))]
    return data.get("source") or (f"mixture of {', '.join(parts)}" if parts else "n/a")


FFN = {"swiglu": "SwiGLU (gated, SiLU)", "gelu": "MLP with exact (erf) GELU", "relu2": "MLP with squared ReLU"}
NORM = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


def _position(m: ModelConfig) -> str:
    if m.position == "alibi":
        return "ALiBi (additive per-head slopes, no position embeddings)"
    if m.position == "none":
        return "none (NoPE: causal attention alone carries order)"
    kind = rope_scaling_kind(m.rope_scaling)
    scaled = "" if kind == "default" else f", {kind} scaling " + ", ".join(
        f"{k} {m.rope_scaling[k]:g}" for k in ROPE_TYPES[kind])
    return f"RoPE, theta {m.rope_theta:g}, full head{scaled}"


def architecture_rows(m: ModelConfig, exported_as: str, model_type: str) -> list[tuple[str, str]]:
    """(row, value) pairs describing the switches as they are, not the Llama defaults."""
    kv = f"{m.num_kv_heads} (grouped-query;" if m.num_kv_heads < m.num_heads else f"{m.num_kv_heads} ("
    norm = NORM[m.norm]
    return [
        ("exported as", f"`transformers.{exported_as}` (model_type `{model_type}`)"),
        ("layers", str(m.num_layers)),
        ("hidden size", str(m.hidden_size)),
        ("attention heads / KV heads", f"{m.num_heads} / {kv} head size {m.head_dim})"),
        ("attention", f"causal, sliding window of {m.attention_window} tokens" if m.attention_window else "causal, full context"),
        ("position encoding", _position(m)),
        ("query/key norm", f"{norm} over each head ({m.head_dim}), shared by all heads" if m.qk_norm else "none"),
        ("block", "parallel: x + attn(norm(x)) + ffn(norm(x)), one norm" if m.parallel_block
         else "sequential pre-norm: attention, then feed-forward"),
        ("feed-forward", f"{FFN[m.ffn]}, width {m.intermediate_size}"),
        ("normalization", f"{norm}, eps {m.norm_eps:g}"),
        ("biases", ("on every linear layer" + (" and LayerNorm" if m.norm == "layernorm" else "") + "; none on the output head")
         if m.bias else "none"),
        ("vocabulary", str(m.vocab_size)),
        ("context", f"{m.max_seq_len} tokens"),
        ("tied embeddings", str(m.tie_word_embeddings).lower()),
        ("output head", f"`score`, {m.num_labels} labels, read at the last non-pad token" if m.num_labels else "language model"),
    ]


def model_card(name: str, m: ModelConfig, rec: dict, tree: list[str], dtype: str) -> str:
    from scaletrain.hf.arch_map import export_plan
    from scaletrain.model.llama import LlamaShape

    plan = export_plan(m)
    arch = plan.architecture(m)
    params = LlamaShape.from_config(m).num_params()
    data = rec.get("data") or {}
    val = rec.get("val_loss")
    rows = "\n".join(f"| {k} | {v} |" for k, v in architecture_rows(m, arch, plan.model_type))
    what = f"sequence classifier with {m.num_labels} labels" if m.num_labels else "causal language model"
    return f"""---
library_name: transformers
pipeline_tag: {"text-classification" if m.num_labels else "text-generation"}
tags: [{plan.model_type}, scaletrain]
---

# {name}

A decoder-only {what} ({params / 1e6:.2f}M parameters, {dtype}) trained with
scaletrain {__version__}, exported as the `transformers` {plan.family} architecture,
which computes the same function. Loads with `transformers.{arch}`.

## Architecture

| | |
|---|---|
{rows}

## Training

| | |
|---|---|
| data | {_data_sources(data)} (format {data.get('format', 'text')}, cache fingerprint {data.get('fingerprint', 'n/a')}) |
| optimizer steps | {_fmt(rec.get('steps'))} |
| training tokens | {_fmt(rec.get('tokens'))} |
| final validation loss | {_fmt(val, '.4f')}{'' if val is None else f' (perplexity {2.718281828459045 ** min(val, 50):.2f})'} |

## Lineage

```
{chr(10).join(tree)}
```

## Use (offline)

{_usage(name, m)}
"""


def _usage(name: str, m: ModelConfig) -> str:
    if m.num_labels:
        return f"""```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")   # same ids as in training
model = AutoModelForSequenceClassification.from_pretrained("{name}")
print(model(**tok("def main(argv):", return_tensors="pt")).logits.argmax(-1))
```"""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")   # same ids as in training
model = AutoModelForCausalLM.from_pretrained("{name}")
out = model.generate(**tok("def main(", return_tensors="pt"), max_new_tokens=40, do_sample=False)
print(tok.decode(out[0]))
```"""


def write_model_card(out: Path, name: str, m: ModelConfig, rec: dict, tree: list[str], dtype: str) -> None:
    (out / "README.md").write_text(model_card(name, m, rec, tree, dtype))
