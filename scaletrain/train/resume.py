"""Resuming: check the checkpoint before anything is written, and resume at another world size / ZeRO stage.

`prepare` (collective, before the data is prepared or config.yaml is rewritten) decides how to resume:
- a run dir whose checkpoints all fail verification is an error (restore them or move them away), not a
  silent fresh start on top of them;
- every pickle of the tag must pass the restricted unpickler (safe_load.py); the manifest's format must be
  one we read; the stored tensor shapes must be the config's model;
- when the saved world size, ZeRO stage or precision differs from this run's, the resume is *resharded*:
  DeepSpeed can only reload its shards into the same partitioning, so we read the full fp32 master of every
  parameter and both Adam moments out of the old shards (any stage, any world size: growth/ds_reader.py,
  through the restricted unpickler) and set them into the new engine through DeepSpeed's public
  `safe_set_full_*` API, which copies each rank's own partition. Adam's step, the lr schedule position and
  the data position come along. The global batch is kept: the sampler's position is a count of global
  windows, so with micro_batch x grad_accum x ranks unchanged every step sees the windows it would have
  seen; `train.grad_accum` is adjusted to the new world size when it divides (else a one-line error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist

from scaletrain.config import Config
from scaletrain.errors import UserError, heard_elsewhere
from scaletrain.train import checkpoint
from scaletrain.train import rng as rng_states
from scaletrain.train.distributed import Dist


@dataclass
class ResumePlan:
    tag_dir: Path
    reshard: bool  # topology differs: read full tensors and set them into the new engine
    saved: dict  # world_size, zero_stage, precision, global_batch, data_cache of the checkpoint


def _manifest(tag_dir: Path) -> dict:
    try:
        m = checkpoint.read_manifest(tag_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{tag_dir / checkpoint.MANIFEST} cannot be read ({type(e).__name__}); restore it") from None
    fmt = m.get("format", 1)
    if not isinstance(fmt, int) or fmt > checkpoint.FORMAT:
        raise UserError(f"checkpoint {tag_dir} has format {fmt!r} (written by scaletrain {m.get('scaletrain_version', '?')}); "
                        f"this scaletrain reads format <= {checkpoint.FORMAT}: upgrade scaletrain to resume it")
    return m


STREAM_KEYS = ("train.seq_len", "train.seed", "data.source", "data.mix", "data.mix_phases")  # what the data position (a window count) depends on


def _stream_value(cfg: Config, key: str):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name, None)
    if key == "data.mix":  # (JSON in the manifest; checkpoints from before data.mix have none: not a change)
        from scaletrain.data.mix_rules import part_names

        return [{**p.model_dump(), "name": name} for p, name in zip(value, part_names(value))] or None
    if key == "data.mix_phases":
        return [p.model_dump() for p in value] or None
    return value


def data_stream(cfg: Config, cache_name: str) -> dict:
    """Recorded in each checkpoint's manifest; a resume with other values gets a warning. `cache_name`: the
    data cache's fingerprint, which changes with the files under data.source, the tokenizer and the split."""
    return {**{k: _stream_value(cfg, k) for k in STREAM_KEYS}, "data.cache": cache_name}


def warn_if_data_changed(plan: ResumePlan, cache_name: str, log=print) -> None:
    """After the data is prepared (the cache is named then): other tokenised data than the checkpoint's."""
    was = plan.saved.get("data_cache")
    if was and was != cache_name:
        log(f"warning: the tokenised data changed since checkpoint {plan.tag_dir.name} was saved (data cache {was}, now "
            f"{cache_name}: files under data.source, data.mix's sources or weights, data.tokenizer, data.format or "
            "data.val_fraction changed): the data "
            "position (a count of windows) is carried over, so this run does not see the data an uninterrupted run would")


def inspect(root: Path, tag: Optional[str], cfg: Config, world: int, log=print) -> tuple[Optional[ResumePlan], Config]:
    """Rank 0's checks; returns the plan and the config to train with (grad_accum possibly adjusted)."""
    from scaletrain.train.safe_load import check_tag
    from scaletrain.weights.sources import expected_shapes, shape_problems, summarise
    from scaletrain.weights.zero import ZeroTag

    if tag is None:
        tags = checkpoint.tags_by_step(root)
        if tags:
            reason = checkpoint.verify(root / tags[0][1])
            raise UserError(f"run.dir {root.parent} has checkpoints but none passes verification ({reason}); restore the "
                            f"damaged files, or move {root} away to start again from step 0")
        return None, cfg
    tag_dir = root / tag
    m = _manifest(tag_dir)
    check_tag(tag_dir)  # no pickle may reference anything but DeepSpeed's own few classes
    zt = ZeroTag(tag_dir, cfg.model.tie_word_embeddings)  # also checks the shard count
    problems = shape_problems([(n, s, None) for n, s in zt.specs()], expected_shapes(cfg.model))
    if problems:
        raise UserError(f"checkpoint {tag_dir} does not match the model config: {summarise(problems)}; "
                        "resume with the model settings it was trained with")
    saved = {"world_size": int(m.get("world_size", zt.world)), "zero_stage": int(m.get("zero_stage", zt.stage)),
             "precision": m.get("precision", cfg.train.precision), "global_batch": m.get("global_batch")}
    if saved["global_batch"] is None:
        from scaletrain.weights.zero import load_restricted

        saved["global_batch"] = int(load_restricted(zt.model_files[0]).get("global_batch", 0)) or None
    now = (world, cfg.zero.stage, cfg.train.precision)
    reshard = (saved["world_size"], saved["zero_stage"], saved["precision"]) != now
    t = cfg.train
    if saved["world_size"] != world and saved["global_batch"]:
        gb, per_accum = saved["global_batch"], t.micro_batch_size * world
        if gb % per_accum:
            if gb % world:  # no micro-batch size helps: every one of them times this rank count misses gb
                fix = (f"no train.micro_batch_size works on {world} rank(s); resume on a rank count that divides {gb} "
                       f"(e.g. {saved['world_size']}), or start a new run.dir")
            else:
                sizes = [b for b in range(1, gb // world + 1) if (gb // world) % b == 0]
                fix = f"set train.micro_batch_size to one of {', '.join(map(str, sizes))}"
            raise UserError(f"checkpoint {tag} was trained with {gb} sequences per step; with train.micro_batch_size "
                            f"{t.micro_batch_size} on {world} rank(s) that needs grad_accum {gb}/{per_accum}, not a whole "
                            f"number: {fix}")
        if gb // per_accum != t.grad_accum:
            log(f"resuming a {saved['world_size']}-rank checkpoint on {world} rank(s): train.grad_accum {t.grad_accum} -> "
                f"{gb // per_accum} keeps the global batch at {gb} sequences (and the data position exact)")
            cfg = cfg.model_copy(deep=True)
            cfg.train.grad_accum = gb // per_accum
    gb = saved["global_batch"]
    if gb and gb != cfg.global_batch_windows(world):  # before config.yaml is rewritten or the engine built
        raise UserError(f"checkpoint {tag} was trained with {gb} sequences per step, this run has "
                        f"{cfg.global_batch_windows(world)}; keep micro_batch_size x grad_accum x ranks equal when resuming")
    stream = m.get("data_stream")
    saved["data_cache"] = stream.get("data.cache") if isinstance(stream, dict) else None
    if saved["data_cache"] is None:  # older manifests do not name it; the tag's lineage record does
        from scaletrain import lineage

        data = (lineage.read(tag_dir) or {}).get("data")
        saved["data_cache"] = data.get("fingerprint") if isinstance(data, dict) else None
    for key in STREAM_KEYS if isinstance(stream, dict) else ():
        was, now_value = stream.get(key), _stream_value(cfg, key)
        if key == "data.mix_phases":  # only boundaries already passed shape the windows seen so far (a phase moved
            step = checkpoint.step_of(tag)  # further out, with max_steps, changes nothing; one added before does)
            was, now_value = ([p for p in (v or []) if p["at_step"] < step] or None for v in (was, now_value))
            if was != now_value:
                was = was or []
        if was is not None and was != now_value:
            log(f"warning: {key} was {was!r} when checkpoint {tag} was saved, now {now_value!r}: the data position (a "
                "count of windows) is carried over, so this run does not see the data an uninterrupted run would")
    if reshard:
        log(f"checkpoint {tag} was saved by {saved['world_size']} rank(s), ZeRO-{saved['zero_stage']} {saved['precision']}; "
            f"this run is {world} rank(s), ZeRO-{cfg.zero.stage} {cfg.train.precision}: resharding it")
    return ResumePlan(tag_dir, reshard, saved), cfg


def prepare(root: Path, tag: Optional[str], cfg: Config, dist: Dist) -> tuple[Optional[ResumePlan], Config]:
    """Collective: rank 0 inspects, everyone gets the same plan and config, or the same UserError."""
    out: list = [None]
    if dist.is_main:
        try:
            plan, new_cfg = inspect(root, tag, cfg, dist.world)
            out[0] = ("ok", plan, None if new_cfg is cfg else new_cfg.to_dict())  # only a changed config travels
        except UserError as e:
            out[0] = ("error", str(e), None)
    if dist.world > 1:
        tdist.broadcast_object_list(out, src=0)
    kind, plan, cfg_dict = out[0]
    if kind == "error":  # rank 0's verdict, on every rank: rank 0 prints it
        raise heard_elsewhere(UserError(plan), not dist.is_main)
    if cfg_dict is None:
        return plan, cfg
    from scaletrain.config import build_config

    return plan, build_config(cfg_dict)


def load(engine, plan: ResumePlan, cfg: Config, dist: Dist) -> dict:
    """Collective: load the checkpoint into `engine` (built with the checkpoint's weights when resharding);
    returns the client state (step, consumed_samples, ...)."""
    if not plan.reshard:
        return checkpoint.load(engine, plan.tag_dir.parent, plan.tag_dir.name, dist)
    return _reshard(engine, plan, cfg, dist)


def _reshard(engine, plan: ResumePlan, cfg: Config, dist: Dist) -> dict:
    from scaletrain.growth.ds_reader import DeepSpeedReader
    from scaletrain.growth.engine_state import _base_optimizer, _materialise_adam_state, _setter
    from scaletrain.weights.files import MOMENT_KINDS
    from scaletrain.weights.zero import load_restricted

    reader = DeepSpeedReader(plan.tag_dir, cfg.model.tie_word_embeddings)  # every rank reads what it needs
    head = load_restricted(reader.tag.model_files[0])  # DeepSpeed's model-state file: our client state + counters
    _materialise_adam_state(engine, cfg.train.grad_accum)  # Adam's state exists only after a step (lr 0, zero grads)
    set_full = _setter(engine)
    named = list(engine.module.named_parameters())
    for name, p in named:
        set_full(p, reader.read(name), None)  # exact fp32 masters (the module got them before initialize)
    if reader.has_moments():
        for kind in MOMENT_KINDS:
            for name, p in named:
                set_full(p, reader.moment(name, kind), kind)
        step = reader.adam_step
        for state in _base_optimizer(engine).state.values():
            if "step" in state:
                state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step
    sched = head.get("lr_scheduler")
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(sched if isinstance(sched, dict) and sched else {"steps_done": int(head["step"])})
    engine.global_steps = int(head.get("global_steps", head["step"]))
    engine.global_samples = int(head.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(head.get("skipped_steps", 0))
    rng = plan.tag_dir / f"rng_rank{dist.rank}.pt"
    if rng.is_file():  # a rank that did not exist before keeps its seeded state (nothing random is drawn in training)
        rng_states.restore(torch.load(rng, weights_only=True))
    return {k: v for k, v in head.items() if isinstance(k, str) and k not in ("module", "optimizer", "buffer_names")}

