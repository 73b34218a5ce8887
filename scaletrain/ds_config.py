"""The DeepSpeed config (ds_config) of a run: generated from scaletrain's own keys, with the user's `deepspeed:`
mapping merged last (its rules: deepspeed_keys.py); the result checked by DeepSpeed's own classes."""

from __future__ import annotations

from typing import Any

from scaletrain.config import Config, deep_merge


def sums_gradients_in_fp32(cfg: Config) -> bool:
    """bf16 micro-batch gradients summed in fp32. DeepSpeed sums them in bf16 unless told otherwise (8 bits of
    mantissa): over 64 micro-batches of tests/test_grad_accum_precision.py's model the sum was 1.25 % from the fp32
    model's gradient, against 0.81 % for fp32 sums of the same bf16 gradients. ZeRO-1 would switch optimizer class
    (and checkpoint layout) for it, and ZeRO-0 cannot do it in DeepSpeed 0.19."""
    t = cfg.train
    return t.precision == "bf16" and t.grad_accum > 1 and cfg.zero.stage >= 2 and "data_types" not in cfg.deepspeed


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
        if sums_gradients_in_fp32(cfg):
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
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
    # DeepSpeed takes top-level scalars unchecked: steps_per_print "abc" or 0 failed at the first step (% by it)
    scalars = {k: v for k, v in cfg.deepspeed.items() if not isinstance(v, (dict, list))}
    if scalars:
        defaults = DeepSpeedConfig(deepspeed_config(cfg.model_copy(update={"deepspeed": {}}), 1))
        for key, value in scalars.items():
            default = getattr(defaults, key, None)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise UserError(f"deepspeed: {key} must be true or false (got {value!r}); {fix}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"deepspeed: {key} must be a number (got {value!r}); {fix}")
        if scalars.get("steps_per_print", 1) < 1:
            raise UserError(f"deepspeed: steps_per_print must be at least 1 (got {scalars['steps_per_print']!r}); {fix}")
