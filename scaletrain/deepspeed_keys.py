"""The `deepspeed:` mapping of a config: which ds_config entries scaletrain sets from its own keys (so the mapping
may not), and the rules the mapping must follow. No torch, no config: config validation reads it."""

from __future__ import annotations

from typing import Any

# ds_config entries generated from scaletrain's own settings (ds_config.deepspeed_config), and those settings
DEEPSPEED_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "train.lr, train.beta1, train.beta2 and train.weight_decay (scaletrain builds the AdamW)",
    "scheduler": "train.lr_schedule, train.warmup_steps and train.min_lr (scaletrain's schedule)",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.offload_optimizer.device": "zero.offload_optimizer",
    "zero_optimization.offload_param.device": "zero.offload_param",
    "zero_optimization.contiguous_gradients": "zero.contiguous_gradients",
    "zero_optimization.overlap_comm": "zero.overlap_comm",
    "zero_optimization.reduce_bucket_size": "zero.reduce_bucket_size",
    # DeepSpeed's older spellings of the same settings
    "bfloat16": "train.precision",
    "zero_optimization.cpu_offload": "zero.offload_optimizer",
    "zero_optimization.cpu_offload_param": "zero.offload_param",
}
_DEEPSPEED_SECTIONS = ("zero_optimization", "bf16", "fp16", "bfloat16")  # mappings in DeepSpeed's config
_ABSENT = object()


def mapping_problem(mapping: dict) -> str | None:
    """Why the `deepspeed:` mapping cannot be used, or None. It may add anything DeepSpeed reads, but not a value
    scaletrain sets from its own keys: checkpoints, resharding, the memory plan and the lr schedule read those,
    and would disagree."""
    for path, ours in DEEPSPEED_OWNED.items():
        node: Any = mapping
        for part in path.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            return f"deepspeed.{path} is set by scaletrain from {ours}; set that instead"
    for section in _DEEPSPEED_SECTIONS:
        if section in mapping and not isinstance(mapping[section], dict):
            return (f"deepspeed.{section} must be a mapping of DeepSpeed settings, not {mapping[section]!r} "
                    f"(e.g. deepspeed.{section}.KEY=VALUE)")
    return _yaml11_boolean(mapping, "deepspeed")


def _yaml11_boolean(node: Any, where: str) -> str | None:
    """`off`, `no`, `yes`, `on` are text in our YAML (1.2); DeepSpeed reads many settings as given, and any text is
    true there: `prescale_gradients: off` would switch it on."""
    if isinstance(node, dict):
        return next((p for k, v in node.items() if (p := _yaml11_boolean(v, f"{where}.{k}"))), None)
    if isinstance(node, list):
        return next((p for i, v in enumerate(node) if (p := _yaml11_boolean(v, f"{where}[{i}]"))), None)
    if isinstance(node, str) and node.lower() in ("yes", "no", "on", "off", "y", "n"):
        return f"{where} is the text {node!r}: write true or false"
    return None
