"""`growth.schedule`: the model shape at each stage of a run, the growth spec of each boundary, validation.

Stage 0 is the config's `model` section; stage k applies the `set` of schedule entries 1..k on top. The run
dir records the stage of every checkpoint (manifest "growth_stage"), so a restart builds the right shape
before loading. Imports no torch until a schedule passes its plain checks, and nothing of `scaletrain.config` (whose
validation calls `validate_schedule`): `cfg` is always a `Config`, its `model` a `ModelConfig`.
"""

from __future__ import annotations

GROWABLE = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers")


def stage_models(cfg) -> list:
    """[stage 0 model, stage 1 model, ...]; entry k is the shape after k growth boundaries."""
    models = [cfg.model]
    for stage in cfg.growth.schedule:
        values = {**models[-1].model_dump(), **{k.removeprefix("model."): v for k, v in stage.set.items()}}
        models.append(type(cfg.model)(**values))
    return models


def boundaries(cfg) -> tuple[int, ...]:
    return tuple(s.at_step for s in cfg.growth.schedule)


def stage_spec(cfg, k: int, seed: int):
    """How to grow into schedule entry k (0-based; its own settings override the section's)."""
    from scaletrain.growth.plan import GrowthSpec

    g, s = cfg.growth, cfg.growth.schedule[k]
    insert = s.insert if s.insert is not None else g.insert
    return GrowthSpec(depth_method=s.depth_method or g.depth_method,
                      insert=tuple(insert) if isinstance(insert, list) else insert,
                      width_method=g.width_method, noise_std=g.noise if s.noise is None else s.noise, seed=seed)


def advance(cfg, n: int = 1):
    """The config of the run after `n` more boundaries: the grown model, the rest of the schedule. This is
    what a run dir's config.yaml holds, and it validates on its own."""
    tree = cfg.to_dict()
    tree["model"] = stage_models(cfg)[n].model_dump(mode="json")
    tree["growth"]["schedule"] = tree["growth"]["schedule"][n:]
    return type(cfg).model_validate(tree)


def validate_schedule(cfg) -> None:
    """ValueError (one line, naming the entry) for a schedule that cannot run; config validation calls it."""
    sched = cfg.growth.schedule
    if not sched:
        return
    prev_step = 0
    for i, s in enumerate(sched):
        where = f"growth.schedule[{i}]"
        if s.at_step <= prev_step:
            raise ValueError(f"{where}.at_step {s.at_step} must be greater than the previous boundary ({prev_step})")
        if s.at_step >= cfg.train.max_steps:
            raise ValueError(f"{where}.at_step {s.at_step} is not before train.max_steps ({cfg.train.max_steps}); it would never grow")
        bad = [k for k in s.set if not k.startswith("model.") or k.removeprefix("model.") not in GROWABLE]
        if bad or not s.set:
            raise ValueError(f"{where}.set: {bad[0] if bad else 'empty'}: growth sets model.{', model.'.join(GROWABLE)}")
        prev_step = s.at_step
    from pydantic import ValidationError

    from scaletrain.errors import UserError, model_error_line
    from scaletrain.growth.plan import validate  # torch: only once the plain checks above have passed
    from scaletrain.model.llama import LlamaShape

    try:
        models = stage_models(cfg)
    except ValidationError as e:
        raise ValueError(f"growth.schedule: {model_error_line(e)}") from None
    for k in range(1, len(models)):
        a, b = models[k - 1], models[k]
        if a == b:
            raise ValueError(f"growth.schedule[{k - 1}] changes nothing (the model already has those values)")
        try:
            validate(LlamaShape.from_config(a), LlamaShape.from_config(b), stage_spec(cfg, k - 1, 0))
        except UserError as e:
            raise ValueError(f"growth.schedule[{k - 1}]: {e}") from None

