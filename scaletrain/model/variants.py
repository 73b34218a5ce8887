"""Architecture switches (`model.norm`, `ffn`, `qk_norm`, `attention_window`, `position`, `rope_scaling`,
`parallel_block`, `bias`) and fine-tuning keys: which combinations are valid, checked once at config time.

Every rejected combination is a one-line ValueError naming it (the config loader turns it into a UserError).
Imports nothing heavy (config validation runs before torch is loaded) and nothing of `scaletrain.config`,
whose validation calls this: `cfg` is a `Config`, `m` its `ModelConfig`.
"""

from __future__ import annotations

# HF's rope_parameters types we compute; "default" is plain RoPE. Keys each one needs (all numbers).
ROPE_TYPES = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
FREEZE_NAMES = "embeddings, layers.N, layers.A-B, norm, head"


def rope_scaling_kind(scaling: dict | None) -> str:
    """'default' for None or an explicit default entry, else the HF rope type ('type' is the old key)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "?")))


def check_model(m) -> None:
    """ValueError for a model section whose switches do not go together."""
    kind = rope_scaling_kind(m.rope_scaling)
    if kind != "default":
        if m.position != "rope":
            raise ValueError(f"model.rope_scaling needs model.position=rope (got position={m.position})")
        if kind == "?":
            raise ValueError(f"model.rope_scaling needs rope_type: {' or '.join(ROPE_TYPES)}")
        if kind not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling type '{kind}' is not supported (valid: {', '.join(ROPE_TYPES)})")
        for key in ROPE_TYPES[kind]:
            value = m.rope_scaling.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.rope_scaling ({kind}) needs a positive number '{key}' (got {value!r})")
        if kind == "llama3" and m.rope_scaling["high_freq_factor"] <= m.rope_scaling["low_freq_factor"]:
            raise ValueError("model.rope_scaling (llama3): high_freq_factor must exceed low_freq_factor")
    if m.position == "alibi" and m.attention == "flex":
        raise ValueError("model.position=alibi is not supported with model.attention=flex (its kernel here takes "
                         "a block mask, not an additive bias); use model.attention=sdpa, eager or flash")


def check_task(cfg) -> None:
    t, d, m = cfg.train, cfg.data, cfg.model
    classify = t.task == "classify"
    if classify != (d.format == "classification"):
        raise ValueError("train.task=classify and data.format=classification go together (a classification head "
                         f"trains on text/label rows); got train.task={t.task}, data.format={d.format}")
    if classify and m.num_labels < 2:
        raise ValueError(f"train.task=classify needs model.num_labels >= 2 (got {m.num_labels})")
    if not classify and m.num_labels:
        raise ValueError(f"model.num_labels={m.num_labels} builds a classification head: set train.task=classify "
                         "and data.format=classification")
    if classify and d.source == "stdlib":
        raise ValueError("data.format=classification needs data.source pointing at .jsonl/.parquet files with text and label fields")
    if classify and d.doc_mask:
        raise ValueError("data.doc_mask does not apply to classification (one example per window); remove it")
    if classify and t.loss_chunk:
        raise ValueError("train.loss_chunk applies to the language-model head, not to train.task=classify; remove it")
    metric = t.early_stop_metric
    if metric in ("val/accuracy", "val/f1") and not classify:
        raise ValueError(f"train.early_stop_metric={metric} needs train.task=classify (use val/loss)")
    if t.early_stop_patience and not t.eval_every:
        raise ValueError("train.early_stop_patience needs validation: set train.eval_every > 0")
    for item in t.freeze:
        parse_freeze_item(item, m.num_layers)
        if str(item).strip() == "head" and m.tie_word_embeddings and not m.num_labels:  # (nothing would be frozen)
            raise ValueError("train.freeze: 'head' is the embedding matrix when model.tie_word_embeddings is true; "
                             "freeze 'embeddings' (which freezes the head with it) or untie the embeddings")


def check_freeze_leaves_something(cfg) -> None:
    """A freeze of every parameter trains nothing (grad 0 every step), yet saved checkpoints and exited 0."""
    m, t = cfg.model, cfg.train
    parts = [parse_freeze_item(item, m.num_layers) for item in t.freeze]
    names = {name for name, _ in parts}
    layers = {i for _, r in parts if r is not None for i in r}
    head_frozen = "head" in names or (m.tie_word_embeddings and not m.num_labels and "embeddings" in names)
    if {"embeddings", "norm"} <= names and len(layers) == m.num_layers and head_frozen:
        raise ValueError(f"train.freeze {list(t.freeze)} covers every parameter: nothing would train (grad 0 every step); "
                         "leave some layers, the norm or the head out of it")


def parse_freeze_item(item: str, num_layers: int) -> tuple[str, range | None]:
    """'embeddings' | 'norm' | 'head' -> (name, None); 'layers.3' / 'layers.0-5' -> ('layers', range)."""
    item = str(item).strip()
    if item in ("embeddings", "norm", "head"):
        return item, None
    if item.startswith("layers."):
        spec = item.removeprefix("layers.")
        lo, _, hi = spec.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            a, b = int(lo), int(hi or lo)
            if a <= b < num_layers:
                return "layers", range(a, b + 1)
            raise ValueError(f"train.freeze '{item}': layers run 0..{num_layers - 1}")
    raise ValueError(f"train.freeze '{item}' is not one of: {FREEZE_NAMES}")


def validate_variants(cfg) -> None:
    check_model(cfg.model)
    check_task(cfg)
