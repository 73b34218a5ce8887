"""The DeepSpeed config (ds_config) of a run: generated from scaletrain's own keys, with the user's `deepspeed:`
mapping merged last; which of its entries scaletrain owns; the mapping checked by DeepSpeed's own classes."""

from __future__ import annotations

from typing import Any

from scaletrain.config import Config, deep_merge

# ds_config entries generated from scaletrain's own settings (deepspeed_config below), and those settings
DEEPSPEED_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "train.lr, train.beta1, train.beta2 and train.weight_decay (scaletrain builds the AdamW)",
    "scheduler": "train.warmup_steps and train.min_lr (scaletrain's warmup + cosine schedule)",
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


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The ds_config for this run; the user's `deepspeed:` mapping is merged last."""
    t, z = cfg.train, cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "contiguous_gradients": z.contiguous_gradients,
        "overlap_comm": z.overlap_comm,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_windows(world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger prints; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return deep_merge(ds, cfg.deepspeed)


def check_deepspeed_passthrough(cfg: Config) -> None:
    """The `deepspeed:` mapping through DeepSpeed's own config classes before anything is written: a typo or a
    wrong type there failed inside deepspeed.initialize, with a traceback on every rank, after data and model
    were built. (World size 1 here: batch sizes are scaletrain's, checked already.)"""
    if not cfg.deepspeed:
        return
    from scaletrain.train.distributed import use_cpu_accelerator_without_cuda

    use_cpu_accelerator_without_cuda()  # before this first import of DeepSpeed, as setup() does
    from pydantic import ValidationError
    from deepspeed.runtime.config import DeepSpeedConfig

    from scaletrain.errors import UserError

    fix = "fix or remove that entry of the deepspeed: mapping"
    try:
        DeepSpeedConfig(deepspeed_config(cfg, 1))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UserError(f"deepspeed: DeepSpeed refuses {where!r} in {e.title} ({err['msg']}, got {err.get('input')!r}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - DeepSpeedConfigError, its asserts, a str where it reads a mapping, ...
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"deepspeed: DeepSpeed refuses the deepspeed: mapping ({type(e).__name__}: {msg}); {fix}") from None

