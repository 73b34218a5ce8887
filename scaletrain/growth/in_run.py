"""Growth inside a run (`growth.schedule`): at a boundary the trainer checkpoints, grows, and trains on.

The sequence at a boundary after step S (every rank):
  1. save the checkpoint of step S (the parent), unless step S is already saved;
  2. rank 0 grows that checkpoint's files into `<run.dir>/growth/stage<k>/` with the same streaming code as
     `scaletrain grow` (fp32 masters and Adam moments read parameter by parameter from any ZeRO stage's
     shards: no full gather, no in-flight ZeRO-3 params), and checks parent vs child on a few val windows;
  3. the old engine is destroyed (and DeepSpeed's module-level references to it dropped), a new one is built
     at the child's shape from the grown weights, the grown moments (growth.optimizer=grow) or a fresh
     AdamW are installed, the lr schedule is set to step S (re-warmup: growth.rewarmup_steps);
  4. the step and token counters carry on; the next checkpoint's manifest records the grown model and
     config.yaml then gets it, with the rest of the schedule (`schedule.advance`).
Why not re-init in place from gathered parameters (growth.md §6, also verified): reading the just-written
checkpoint is the path every resume already takes, so growing after a crash, after a resume from before the
boundary, and in an uninterrupted run are the same computation on the same bytes -- the loss curve after the
boundary is bit-identical in all three (tested on CPU fp32, ZeRO-3, 2 ranks).
Every checkpoint's manifest records its model; a restart builds that shape before loading.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from pydantic import ValidationError

from scaletrain import lineage
from scaletrain.config import Config, ModelConfig
from scaletrain.errors import UserError
from scaletrain.growth.schedule import advance, boundaries, stage_models, stage_spec

CHECK_WINDOWS = 4


class RunGrowth:
    """The schedule of one run (from the user's config: stage-0 model, full schedule)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.models = stage_models(cfg)
        self.bounds = boundaries(cfg)

    def config_at(self, stage: int) -> Config:
        return advance(self.cfg, stage) if stage else self.cfg

    def restarts(self, stage: int) -> tuple[int, ...]:
        """The boundaries a run at `stage` has passed (for the lr re-warmup)."""
        return self.bounds[:stage]

    def due(self, stage: int, step: int) -> bool:
        return stage < len(self.bounds) and self.bounds[stage] <= step

    def stage_of(self, tag_dir: Optional[Path]) -> int:
        """The stage a checkpoint was saved at: its manifest's model among the schedule's models."""
        if tag_dir is None:
            return 0
        saved = json.loads((tag_dir / "manifest.json").read_text()).get("model")
        if saved is None:
            return 0  # saved before growth existed: the config's model
        for k, m in enumerate(self.models):
            if same_model(saved, m):
                return k
        if len(self.models) == 1:  # no schedule: a plain mismatch (a tag copied in from another run)
            raise UserError(f"checkpoint {tag_dir} holds a model ({_shape(saved)}) other than this config's "
                            f"({_shape(self.models[0].model_dump())}); use that run's config, or a new run.dir")
        raise UserError(f"checkpoint {tag_dir} holds a model ({_shape(saved)}) that is no stage of this config's "
                        "growth.schedule; restore the schedule the run was started with or use a new run.dir")

    def check_numbering(self, run_dir: Path, stage: int) -> None:
        """A config that starts later in the schedule (the run dir's own config.yaml: the grown model, the rest of
        the schedule) would number the stages anew, and the next growth would overwrite growth/stage1, the
        record the earlier checkpoints' lineage names. Such a config's current model is already in a later
        stage dir than the one this start counts."""
        import yaml

        current, k = self.models[stage], stage
        while True:
            k += 1
            try:
                grown = yaml.safe_load((Path(run_dir) / "growth" / f"stage{k}" / "config.yaml").read_text())["model"]
            except (OSError, yaml.YAMLError, TypeError, KeyError):
                return  # no more stage dirs (or one cut off by a crash: it is grown again)
            if same_model(grown, current):
                raise UserError(f"run.dir {run_dir} grew into this config's model at growth/stage{k}, but this config counts "
                                f"it as stage {stage}: it starts later in the schedule (the run dir's own config.yaml?); "
                                "resume with the config the run was started with")


def same_model(saved, m: ModelConfig) -> bool:
    """Whether a model section saved by an earlier start (manifest, growth/stageN/config.yaml) is `m`: fields
    added to ModelConfig since take their defaults, and the classes' names (label_names, copied from an
    init.from source that may be gone by the next start) do not make another model."""
    if not isinstance(saved, dict):
        return False
    try:
        saved = ModelConfig.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        pass  # (a field since removed: compared as written)

    def comparable(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "label_names" and v is not None}
    return comparable(saved) == comparable(m.model_dump(mode="json"))


def _shape(m: dict) -> str:
    return ", ".join(f"{k} {m[k]}" for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"))


def grow(trainer, metrics) -> None:
    """Collective: the boundary sequence above. `trainer` is a scaletrain.train.trainer.Trainer."""
    from scaletrain.train.distributed import main_rank_does

    t0, step, d = time.time(), trainer.step, trainer.dist
    if trainer.saved_step != step:
        path = trainer.save()
        if path is None:  # the child is built from the parent's checkpoint files (the disk check said so above)
            resume_at = f"step {trainer.saved_step}" if trainer.saved_step is not None else "the start"
            raise UserError(f"growth at step {step} needs a checkpoint of the parent, which could not be written; free "
                            f"disk space and run the same command again (it resumes from {resume_at})")
        trainer.log(f"saved checkpoint {path} (growth boundary)")
    stage, parent_cfg = trainer.stage, trainer.cfg
    child_cfg = advance(parent_cfg)
    out = trainer.run.path / "growth" / f"stage{stage + 1}"
    # rank 0 grows the files (minutes for a large model) while the others wait; its error stops every rank
    record = main_rank_does(lambda: _grow_files(trainer, parent_cfg, child_cfg, out, stage + 1))
    trainer.switch_model(child_cfg, stage + 1, out)  # a new engine: the child's weights, exact masters, grown moments
    if d.is_main:
        trainer.lineage.grown(out, child_cfg)  # the next checkpoints descend from the grown child
    _report(trainer, record, metrics, time.time() - t0)


def _grow_files(trainer, parent_cfg: Config, child_cfg: Config, out: Path, stage: int) -> dict:
    """Rank 0: the parent is the checkpoint of this step; its model is the current stage's (not config.yaml's)."""
    from scaletrain.growth.ds_reader import DeepSpeedReader
    from scaletrain.growth.offline import grow_checkpoint
    from scaletrain.growth.parent import Parent
    from scaletrain.train.checkpoint import tag_name
    from scaletrain.weights.sources import WeightSource, checkpoint_tokenizer

    tag = trainer.run.checkpoints / tag_name(trainer.step)
    reader = DeepSpeedReader(tag, parent_cfg.model.tie_word_embeddings)
    src = WeightSource(tag, "run", parent_cfg.model, parent_cfg, checkpoint_tokenizer(trainer.run.path), lineage.read(tag), tag)
    parent = Parent(src, reader, {n: torch.float32 for n in reader.names()})
    sample = None
    val = trainer.val_stream
    if val is not None and val.num_windows:
        import numpy as np

        x, y = val.batch(np.arange(min(CHECK_WINDOWS, val.num_windows)))
        sample = (x, y, f"{len(x)} val windows x {x.shape[1]} tokens")
    shutil.rmtree(out, ignore_errors=True)  # a grow interrupted earlier: redo it (deterministic)
    g = parent_cfg.growth
    spec = stage_spec(parent_cfg, 0, g.seed + stage)
    return grow_checkpoint(parent, out, child_cfg.model, spec, g.optimizer, sample, progress=False,
                           produced_by={"command": "growth.schedule", "run": str(trainer.run.path),
                                        "step": trainer.step, "stage": stage})


def _report(trainer, record: Optional[dict], metrics, seconds: float) -> None:
    if record is None:
        return
    p, c, g = record["params"]["parent"], record["params"]["child"], record["grow"]
    diff = ", ".join(f"{k.removeprefix('model.')} {a}->{b}" for k, (a, b) in record["config_diff"].items()
                     if k.startswith("model."))
    line = (f"step {trainer.step:>6} | grew to stage {trainer.stage}: {p / 1e6:.2f}M -> {c / 1e6:.2f}M params "
            f"({diff}; depth {g['operators']['depth']}, {'exact' if g['exact'] else 'not exact'}, "
            f"optimizer {g['optimizer']}) in {seconds:.1f} s")
    # At the grown model's first step: a restart from the boundary checkpoint (step S) purges the events from S + 1
    # on and grows again; scalars at S would stay and be written twice.
    first_step = trainer.step + 1
    check = g.get("check")
    if check:
        line += (f" | parent loss {check['parent_loss']:.4f} child loss {check['child_loss']:.4f} "
                 f"max |dlogits| {check['max_abs_dlogits']:.1e}")
        metrics.scalars(first_step, {"growth/parent_loss": check["parent_loss"], "growth/child_loss": check["child_loss"],
                                       "growth/max_abs_dlogits": check["max_abs_dlogits"]})
    metrics.scalars(first_step, {"growth/stage": trainer.stage})
    trainer.log(line)
