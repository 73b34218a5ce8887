"""What a training run records for later use: its tokenizer and its lineage (main rank only).

At start the tokenizer the data was tokenised with is copied into `<run.dir>/tokenizer/`, so export, eval
and generate find it even after the data cache is gone. At every save `lineage.json` goes into the
checkpoint tag (before its manifest, so it is checked like the weights) and the run dir, its id the hash of
the weights being trained (`weights_id`), computed the way exports and checkpoint dirs compute theirs
(weights/writer.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from scaletrain import lineage
from scaletrain.config import Config
from scaletrain.durable import publish_dir
from scaletrain.errors import UserError
from scaletrain.weights.checkpoint_dir import copy_tokenizer
from scaletrain.weights.writer import combine_digests, tensor_digest


def weights_id(module, is_main: bool) -> Optional[str]:
    """Collective. Content id of `module`'s parameters as training holds them (compute dtype): sha256 over
    name, dtype, shape and bytes of each, the scheme of `write_safetensors`, so it does not depend on the ZeRO
    stage or world size. Under ZeRO-3 each parameter is in pieces across ranks: gathered one at a time, like
    a forward pass does. Returns the id on the main rank, None elsewhere."""
    import deepspeed

    digests = {}
    for name, p in module.named_parameters():
        name = name.replace("_orig_mod.", "")
        sharded = hasattr(p, "ds_tensor")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=sharded):
            if is_main:
                digests[name] = tensor_digest(name, p.detach().cpu())
    return combine_digests(digests) if is_main else None


def check_tokenizer(run_dir: Path, tokenizer: Path, resuming: bool) -> None:
    """The run dir's tokenizer copy (what export, eval and generate use) must be the tokenizer this start's data
    is tokenised with. A resume whose data.source or data.tokenizer changed so that another tokenizer was
    trained would feed the model other ids: refused before anything is written. A copy left by a start that
    saved no checkpoint is replaced."""
    from scaletrain.data.hf_tokenizer import tokenizer_files

    dest = Path(run_dir) / "tokenizer"
    if not dest.is_dir() or not tokenizer.exists():
        return
    files = lambda p: {f.name: f.read_bytes() for f in tokenizer_files(p)}  # noqa: E731
    if files(dest) == files(tokenizer):
        return
    if resuming:
        from scaletrain.weights.sources import checkpoint_tokenizer

        kept = checkpoint_tokenizer(Path(run_dir)) or dest
        raise UserError(f"run.dir {run_dir} was trained with another tokenizer than this start's data gets (data.source "
                        f"or data.tokenizer changed): keep the run's with data.tokenizer={kept}, or use a new run.dir")
    shutil.rmtree(dest)


class RunLineage:
    def __init__(self, cfg: Config, run_dir: Path, cache, init_source: Optional[Path] = None,
                 resumed_tag: Optional[Path] = None):
        """`init_source`: the checkpoint init.from's weights were loaded from (a fresh start). `resumed_tag`: the
        checkpoint this start resumes; later checkpoints continue its record (kind and parents), whatever
        init.from says now: the weights come from that tag, not from init.from."""
        self.cfg, self.run = cfg, Path(run_dir)
        self.data = {"source": cfg.data.source, "fingerprint": cache.dir.name, "format": cfg.data.format}
        if cfg.data.mix:
            self.data = {"mix": [p.model_dump() for p in cfg.data.mix], "fingerprint": cache.dir.name, "format": cfg.data.format}
        self._copy_tokenizer(Path(cache.tokenizer_path))
        earlier = lineage.read(resumed_tag) if resumed_tag is not None else None  # verified with the tag's weights
        if earlier is not None and earlier.get("kind") in ("pre-train", "fine-tune"):
            self.kind, self.parents = earlier["kind"], earlier.get("parents") or []
        else:
            self.kind, self.parents = ("fine-tune" if cfg.init.from_ else "pre-train"), []
        parent_config = Config().to_dict()  # pre-train: the diff is against the defaults
        if self.kind == "fine-tune" and not cfg.init.from_:  # resumed without init.from: nothing to diff against
            self.diff = earlier.get("config_diff") or {}
            return
        if self.kind == "fine-tune":
            from scaletrain.weights import open_weights
            from scaletrain.weights.checkpoint_dir import source_parent

            try:
                src = open_weights(init_source or cfg.init.from_)
            except UserError:
                if earlier is None:
                    raise
                # the parent was deleted since (init_from.resolve warned): its record and diff stay as written
                self.diff = earlier.get("config_diff") or {}
                return
            if earlier is None:
                self.parents = [source_parent(src)]
            parent_config = src.config.to_dict() if src.config is not None else {"model": src.model.model_dump(mode="json")}
        self.diff = lineage.config_diff(parent_config, cfg.to_dict())

    def grown(self, stage_dir: Path, cfg: Config) -> None:
        """After growth inside the run (or on resuming a grown run): later checkpoints descend from the grown
        child in `growth/stageN/` (whose own lineage names the boundary checkpoint and the operators)."""
        import yaml

        record = lineage.read(stage_dir)
        self.parents = [lineage.parent_ref(stage_dir, record, "grow")]
        try:  # the grown child's own config: the diff says what training changed after it (schedule, lr, ...)
            parent_config = yaml.safe_load((Path(stage_dir) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            parent_config = None
        diff = lineage.config_diff(parent_config, cfg.to_dict())
        self.diff = {k: v for k, v in diff.items() if not k.startswith("growth.")}  # the grow record tells those
        self.cfg = cfg

    def _copy_tokenizer(self, tok: Path) -> None:
        dest = self.run / "tokenizer"
        if dest.exists() or not tok.exists():
            return
        tmp = self.run / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        copy_tokenizer(tok, tmp)
        publish_dir(tmp, dest)  # on the disk before it counts: a power cut must not leave empty files behind

    def record(self, tag_dir: Path, content_id: str, step: int, tokens: int, val_loss: Optional[float]) -> dict:
        """The lineage record of the checkpoint about to be saved at `tag_dir` (its final path)."""
        return lineage.make(
            self.kind, content_id, self.parents,
            self.cfg.model.model_dump(mode="json"), self.diff, steps=step, tokens=tokens, data=self.data,
            val_loss=val_loss, path=tag_dir,
        )
