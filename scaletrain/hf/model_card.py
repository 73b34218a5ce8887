"""README.md model card of an export: architecture, data, steps, tokens, final val loss, lineage, usage."""

from __future__ import annotations

from pathlib import Path

from scaletrain import __version__
from scaletrain.config import ModelConfig


def _fmt(value, spec: str = ",") -> str:
    return "n/a" if value is None else format(value, spec)


def _architecture(m: ModelConfig) -> str:
    from scaletrain.hf.arch_map import export_plan

    return export_plan(m).architecture(m)


def model_card(name: str, m: ModelConfig, rec: dict, tree: list[str], dtype: str) -> str:
    from scaletrain.model.llama import LlamaShape

    params = LlamaShape.from_config(m).num_params()
    data = rec.get("data") or {}
    kv = f"{m.num_kv_heads} (GQA)" if m.num_kv_heads < m.num_heads else f"{m.num_kv_heads}"
    val = rec.get("val_loss")
    return f"""---
library_name: transformers
pipeline_tag: {"text-classification" if m.num_labels else "text-generation"}
tags: [llama, scaletrain]
---

# {name}

A Llama-style {f"sequence classifier ({m.num_labels} labels)" if m.num_labels else "causal language model"} ({params / 1e6:.2f}M parameters, {dtype}) trained with
[scaletrain](https://github.com/) {__version__}. Loads with `transformers.{_architecture(m)}`.

## Architecture

| | |
|---|---|
| layers | {m.num_layers} |
| hidden size | {m.hidden_size} |
| attention heads / KV heads | {m.num_heads} / {kv} (head size {m.head_dim}) |
| SwiGLU width | {m.intermediate_size} |
| vocabulary | {m.vocab_size} |
| context | {m.max_seq_len} tokens, RoPE theta {m.rope_theta:g} |
| RMSNorm eps | {m.norm_eps:g} |
| tied embeddings | {str(m.tie_word_embeddings).lower()} |

## Training

| | |
|---|---|
| data | {data.get('source', 'n/a')} (format {data.get('format', 'text')}, cache fingerprint {data.get('fingerprint', 'n/a')}) |
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
