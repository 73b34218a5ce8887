"""The parent of a growth: found with `scaletrain.weights.open_weights`, read by name in any order.

A grown child reads its parent out of order (a stacked child reads block 0 again after block L-1; the
function check walks layer by layer), so besides the streaming `WeightSource` we need random access:
safetensors tensors are mapped one at a time; DeepSpeed checkpoints go through `DeepSpeedReader`, which also
holds the Adam moments `--optimizer grow` transforms.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from scaletrain.errors import UserError
from scaletrain.growth.ds_reader import DeepSpeedReader
from scaletrain.weights.files import MOMENT_KINDS, FileReader, adam_step_of, file_specs, weight_files
from scaletrain.weights.sources import WeightSource, expected_shapes, open_weights, shape_problems, summarise


class SavedMoments:
    """The Adam moments a grown checkpoint dir carries (`grow --optimizer grow`: optimizer/exp_avg/,
    optimizer/exp_avg_sq/, optimizer/state.json), read like DeepSpeedReader's: a grown child grows again."""

    KINDS = MOMENT_KINDS

    def __init__(self, optimizer_dir: Path, tied: bool):
        self.adam_step = adam_step_of(optimizer_dir)
        self._files = {k: FileReader(weight_files(optimizer_dir / k), tied) for k in self.KINDS}

    @staticmethod
    def present(weights_dir: Path) -> bool:
        return (weights_dir / "optimizer" / "state.json").is_file()

    def moment(self, name: str, kind: str) -> torch.Tensor:
        return self._files[kind].read(name).float()


@dataclass
class Parent:
    src: WeightSource
    reader: object  # .read(name) -> tensor
    dtypes: dict[str, torch.dtype]
    saved_moments: Optional[SavedMoments] = None

    @property
    def model(self):
        return self.src.model

    @property
    def moments(self) -> Optional[DeepSpeedReader | SavedMoments]:
        """.moment(name, kind) and .adam_step: a DeepSpeed parent's optimizer state, or a grown child's."""
        if isinstance(self.reader, DeepSpeedReader) and self.reader.has_moments():
            return self.reader
        return self.saved_moments

    @property
    def id(self) -> str:
        """The parent's lineage id when it has one, else a cheap hash of what identifies its bytes."""
        if self.src.lineage and self.src.lineage.get("id"):
            return str(self.src.lineage["id"])
        return content_fingerprint(self.src)


def content_fingerprint(src: WeightSource) -> str:
    """Cheap content id: a DeepSpeed tag's manifest (it lists every file's sha256), or the weight files'
    names and sizes plus their first and last MiB (hashing whole multi-GB files would dominate a grow)."""
    h = hashlib.sha256()
    manifest = Path(src.weights_at or src.path) / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
        return h.hexdigest()[:16]
    for f in weight_files(Path(src.weights_at or src.path)):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _renamed(src: WeightSource, specs: list[tuple]) -> bool:
    """Whether an HF dir's tensors (`specs`: as the source maps them) are stored under other names or shapes
    than ours (not a Llama layout)."""
    stored = {n: tuple(s) for n, s, _ in file_specs(weight_files(Path(src.weights_at)))}
    return any(stored.get(n) != tuple(s) for n, s, _ in specs)


def open_parent(path: str | Path) -> Parent:
    src = open_weights(path)
    tied = src.model.tie_word_embeddings
    specs = src.specs()
    problems = shape_problems(specs, expected_shapes(src.model))
    if problems:
        raise UserError(f"{src.path} does not match its own config: {summarise(problems)}")
    if src.kind == "hf" and _renamed(src, specs):  # growth reads tensors by our names, one at a time, from the files
        arch = src.adapter.describe.split(" -> ")[0]
        raise UserError(f"{src.path} holds {arch} tensors that scaletrain renames or reshapes on import; import it first "
                        f"(scaletrain import-hf {src.path} --out DIR) and grow DIR")
    if src.kind in ("run", "deepspeed"):
        reader: object = DeepSpeedReader(Path(src.weights_at), tied)
    else:
        reader = FileReader(weight_files(Path(src.weights_at)), tied)
    saved = Path(src.weights_at) / "optimizer"
    moments = SavedMoments(saved, tied) if src.kind == "checkpoint" and SavedMoments.present(Path(src.weights_at)) else None
    dtypes = {n: dt for n, _, dt in specs}
    return Parent(src, reader, dtypes, moments)
