"""Grow a parent into a child checkpoint dir, streaming: one parent tensor in, one child tensor out.

    CHILD/model.safetensors(+ shards, index)  the grown weights (the parent's dtype; fp32 from DeepSpeed)
    CHILD/config.yaml                        the parent's config with the child's model section
    CHILD/tokenizer/                         the parent's tokenizer, as is
    CHILD/optimizer/                         --optimizer grow: exp_avg/, exp_avg_sq/ (same layout), state.json
    CHILD/lineage.json                       parent id, operators, factors, noise, parent vs child check

Everything is written to a temp dir next to CHILD and renamed at the end: a failed grow leaves nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import ValidationError

from scaletrain import lineage
from scaletrain.config import ModelConfig, TrainConfig, _closest, build_config
from scaletrain.config_file import dump_yaml
from scaletrain.errors import UserError, model_error_line
from scaletrain.growth.check import compare
from scaletrain.growth.optimizer_state import moment_tensors
from scaletrain.growth.parent import Parent
from scaletrain.growth.plan import GrowthPlan, GrowthSpec
from scaletrain.growth.schedule import GROWABLE
from scaletrain.hf import generation_config
from scaletrain.model.llama import LlamaShape
from scaletrain.weights.checkpoint_dir import check_out, copy_tokenizer, staged
from scaletrain.weights.files import MOMENT_KINDS, FileReader, weight_files
from scaletrain.weights.sources import expected_shapes
from scaletrain.weights.writer import write_safetensors


def child_model_config(parent: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """The parent's model section with `overrides` (keys without the "model." prefix) applied."""
    fields = list(ModelConfig.model_fields)
    for key in overrides:
        if key not in fields:
            raise UserError(f"unknown model key 'model.{key}'{_closest('model.' + key, ['model.' + f for f in fields])}")
    try:
        m = ModelConfig(**{**parent.model_dump(), **overrides})
    except ValidationError as e:
        raise UserError(f"child model: {model_error_line(e)}") from None
    return m


def _child_config(parent: Parent, child: ModelConfig) -> dict:
    """The parent's config with the child's model; its growth schedule and init.from are the parent run's
    own business, so they go back to the defaults."""
    tree = parent.src.config.to_dict() if parent.src.config is not None else {}
    if parent.src.config is None:  # an HF parent: default training settings that fit its context length
        tree["train"] = {"seq_len": min(TrainConfig().seq_len, child.max_seq_len)}
    tree.update(model=child.model_dump(mode="json"), growth={}, init={})
    return build_config(tree).to_dict()


def describe(plan: GrowthPlan, spec: GrowthSpec) -> dict:
    p, c = plan.parent, plan.child
    factors = {d: round(getattr(c, d) / getattr(p, d), 4) for d in GROWABLE}
    layers = [{"parent": src.parent, "identity": src.identity} for src in plan.layers]
    return {"factors": factors, "exact": plan.exact, "noise": spec.noise_std, "seed": spec.seed,
            "operators": {"width": "duplicate+split (integer factors), zero-expansion (non-integer hidden), "
                                   f"new units '{spec.width_method}' for non-integer heads/FFN",
                          "depth": spec.depth_method, "insert": spec.insert if spec.depth_method == "identity" else None,
                          "layers": layers}}


def grow_checkpoint(parent: Parent, out: Path, child: ModelConfig, spec: GrowthSpec, optimizer: str = "reset",
                    sample: Optional[tuple] = None, max_shard_bytes: int = 2 * 10**9,
                    progress: bool = True, produced_by: Optional[dict] = None) -> dict:
    """Write the child of `parent` with model `child` into `out`; returns the lineage dict written.
    All validation happens before the first byte is written."""
    out = Path(out)
    check_out(out)
    pshape, cshape = LlamaShape.from_config(parent.model), LlamaShape.from_config(child)
    plan = GrowthPlan(pshape, cshape, spec)
    if optimizer == "grow" and parent.moments is None:
        raise UserError(f"--optimizer grow needs a parent saved with optimizer state (a run dir, a DeepSpeed "
                        f"checkpoint or a child grown with --optimizer grow); {parent.src.path} has none. Use --optimizer reset")
    child_tree = _child_config(parent, child)  # e.g. a max_seq_len below the parent's train.seq_len: refused now
    shapes = expected_shapes(child)
    recipes = list(plan.child_tensors())
    specs = [(n, shapes[n], parent.dtypes.get(r.sources[0], torch.float32)) for n, r in recipes]
    t0 = time.time()
    with staged(out, seal=True) as tmp:  # renamed to `out` when all is written; deleted on any error
        written = write_safetensors(tmp, specs, ((n, r(parent.reader.read)) for n, r in recipes), max_shard_bytes,
                                    progress=progress)
        if optimizer == "grow":
            _write_moments(plan, parent, shapes, tmp / "optimizer", max_shard_bytes, progress)
        if parent.src.tokenizer is not None:
            copy_tokenizer(parent.src.tokenizer, tmp / "tokenizer")
        generation_config.keep(parent.src.path, tmp)  # the parent's stop tokens and sampling defaults
        (tmp / "config.yaml").write_text(dump_yaml(child_tree))
        check = None
        if sample is not None:  # (x, y, description)
            child_reader = FileReader(weight_files(tmp), child.tie_word_embeddings)
            check = {"sample": sample[2], **compare(parent.reader.read, pshape, child_reader.read, cshape, *sample[:2])}
        src, before = parent.src, parent.src.lineage or {}
        parent_tree = src.config.to_dict() if src.config is not None else {"model": parent.model.model_dump(mode="json")}
        record = lineage.make(
            "grow", written["content_id"],
            [lineage.parent_ref(src.weights_at or src.path, src.lineage, src.kind, content_id=parent.id)],
            child.model_dump(mode="json"), lineage.config_diff(parent_tree, child_tree),
            steps=before.get("steps"), tokens=before.get("tokens"), data=before.get("data"), path=out,
            produced_by=produced_by or {"command": "scaletrain grow"},
            params={"parent": pshape.num_params(), "child": cshape.num_params()},
            grow={**describe(plan, spec), "optimizer": optimizer, "check": check, "seconds": round(time.time() - t0, 1)},
        )
        lineage.write(tmp, record)
    return record


def _write_moments(plan: GrowthPlan, parent: Parent, shapes: dict, dest: Path, max_shard_bytes: int, progress: bool) -> None:
    """Adam moments of the child (fp32), each kind in its own weights-layout dir, + Adam's step count."""
    reader = parent.moments
    for kind in MOMENT_KINDS:
        recipes = list(moment_tensors(plan, kind))
        (dest / kind).mkdir(parents=True)
        read = (lambda k: lambda name: reader.moment(name, k))(kind)
        write_safetensors(dest / kind, [(n, shapes[n], torch.float32) for n, _ in recipes],
                          ((n, r(read).float()) for n, r in recipes), max_shard_bytes, progress=progress)
    (dest / "state.json").write_text(json.dumps({"adam_step": reader.adam_step}))

