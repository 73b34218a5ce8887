"""Write a scaletrain checkpoint dir (layout in scaletrain/weights/__init__.py), and stage any output dir so a
failure leaves nothing behind: everything is written into a hidden sibling and renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from scaletrain import lineage
from scaletrain.checkpoint_names import TAG_RE
from scaletrain.config import Config, config_yaml
from scaletrain.errors import UserError
from scaletrain.data.hf_tokenizer import copy_tokenizer_dir
from scaletrain.durable import abandoned_temps, missing_levels, publish_dir, remove_levels, temp_dir_beside
from scaletrain.hf import generation_config
from scaletrain.manifest import write_manifest
from scaletrain.weights.sources import CONFIG_YAML, TOKENIZER_DIR, WeightSource
from scaletrain.weights.writer import write_safetensors

DEFAULT_SHARD = "2GB"


def check_out(out: Path) -> None:
    """--out must be new or an empty directory; we never overwrite."""
    out = Path(os.path.abspath(out))  # `--out .` has no name to stage beside
    if out.is_symlink():  # staged output is renamed into place: a link would be replaced, not followed
        raise UserError(f"--out {out} is a symbolic link; give the directory it points to, or a new path")
    inside = next((p for p in out.parents if TAG_RE.match(p.name) and p.parent.name == "checkpoints"
                   and any((p.parent.parent / f).is_file() for f in ("config.yaml", "status.json"))), None)
    if inside is not None:  # a run prunes whole tags: this output would go with it
        raise UserError(f"--out {out} is inside checkpoint {inside}, which its run may prune; choose a path outside checkpoints/")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")
    if out.is_dir() and os.path.ismount(out):  # staged output is renamed into place: a mount point cannot be replaced
        raise UserError(f"--out {out} is a mount point; give a new directory inside it, e.g. --out {out / 'model'}")
    probe = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("/"))
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is a file, not a directory; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {probe} is not writable")


def sealed_file(rel: Path) -> bool:
    """The files of a checkpoint dir its manifest lists: weights and optimizer state (damage there loads
    silently). config.yaml, tokenizer/ and lineage.json stay editable; damage there fails loudly anyway."""
    return rel.suffix in (".safetensors", ".bin") or rel.name.endswith(".index.json") or rel.parts[0] == "optimizer"


@contextmanager
def staged(out: Path, seal: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it becomes `out`, on any error it is deleted. `seal`: a
    checkpoint dir; its manifest.json (sha256 of the weights) is written last, checked when it is opened."""
    out = Path(os.path.abspath(out))
    check_out(out)
    made = missing_levels(out.parent)  # removed again (while empty) if this write fails
    try:  # where the permission probe was not enough (root, /proc, a read-only mount)
        out.parent.mkdir(parents=True, exist_ok=True)
        for dead in abandoned_temps(out):  # an earlier write of `out` killed midway (dead pid, an hour quiet)
            shutil.rmtree(dead, ignore_errors=True)
        tmp = temp_dir_beside(out)
    except OSError as e:
        remove_levels(made)
        raise UserError(f"--out {out}: cannot create it ({e.strerror}); choose another --out") from None
    published = False
    try:
        yield tmp
        if seal:
            write_manifest(tmp, {"contents": "checkpoint dir weights"}, include=sealed_file)
        try:  # on disk before it appears complete under its final name
            if out.exists():
                out.rmdir()  # empty when checked; not if something was put there meanwhile
            publish_dir(tmp, out)
            published = True
        except OSError as e:
            raise UserError(f"--out {out} could not be put in place ({e.strerror}): something else is writing "
                            f"there; choose a new directory (nothing of it was changed)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not published:
            remove_levels(made)


def copy_tokenizer(tokenizer: Path, dest: Path) -> None:
    """Into `dest` (a checkpoint's tokenizer/ dir): our sentencepiece file, or an HF tokenizer's files as is."""
    if tokenizer.is_dir():
        copy_tokenizer_dir(tokenizer, dest)
    else:
        dest.mkdir()
        shutil.copyfile(tokenizer, dest / "tokenizer.model")


def write_checkpoint_dir(tmp: Path, out: Path, src: WeightSource, cfg: Config, kind: str, parents: list[dict],
                         max_shard_bytes: int, progress: bool = True, **lineage_fields) -> dict:
    """Weights of `src` (stored dtype) + config.yaml + tokenizer/ + lineage.json into `tmp` (renamed to `out`
    by the caller). Returns the lineage record."""
    written = write_safetensors(tmp, src.specs(), src.tensors(), max_shard_bytes, progress=progress)
    (tmp / CONFIG_YAML).write_text(config_yaml(cfg))
    if src.tokenizer is not None:
        copy_tokenizer(src.tokenizer, tmp / TOKENIZER_DIR)
    generation_config.keep(src.path, tmp)  # an HF model's stop tokens and sampling defaults travel with it
    rec = lineage.make(kind, written["content_id"], parents, cfg.model.model_dump(mode="json"), path=out,
                       dtypes=written["dtypes"], **lineage_fields)
    lineage.write(tmp, rec)
    return rec


def source_parent(src: WeightSource, content_id: Optional[str] = None) -> dict:
    """The lineage parent entry for something made from `src`."""
    return lineage.parent_ref(src.weights_at or src.path, src.lineage, src.kind, content_id)
