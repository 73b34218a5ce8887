"""Tensor-by-tensor reading of weight files: safetensors (shards + index) and PyTorch .bin (weights_only).

Nothing here unpickles arbitrary objects: .bin files go through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from scaletrain.errors import UserError
from scaletrain.weights.zero import RELEASE_BYTES

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Buffers some exporters include; they are recomputed, never trained.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF names of the tensors outside the layers (a tied model stores no HEAD: it is EMBED).
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# The Adam moments a checkpoint can carry; a grown checkpoint stores each as weight files (optimizer/<kind>/).
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")


def adam_step_of(optimizer_dir: Path) -> int:
    """Adam's step count from a grown checkpoint's optimizer/state.json."""
    path = optimizer_dir / "state.json"
    try:
        step = json.loads(path.read_text())["adam_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError
        return step
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise UserError(f"{path} cannot be read as an Adam step count; restore it, or grow again with --optimizer "
                        "reset (no saved moments)") from None


def weight_files(d: Path) -> list[Path]:
    """The weight files of a model dir, via its index when there is one; missing shards are an error."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
                raise UserError(f"{index} is not a valid weight index (no weight_map)") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise UserError(f"{d} is missing weight shard {missing[0]} listed in {index_name} ({len(missing)} of {len(files)} missing)")
            return [d / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    found = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not found:
        raise UserError(f"{d} has no weights (model.safetensors, pytorch_model.bin or shards with an index)")
    return found


def _load_bin(path: Path) -> dict:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # noqa: BLE001 - UnpicklingError, truncated file, ...
        raise UserError(f"cannot load {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:100]}); only plain tensors are accepted") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a plain state dict of tensors")
    return sd


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError for a truncated or foreign file
        raise UserError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:100]})") from None


def file_specs(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor, in file order, without reading tensor data."""
    out = []
    for path in files:
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out.append((name, tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype(), torch.float32)))
        else:
            sd = _load_bin(path)
            out.extend((n, tuple(t.shape), t.dtype) for n, t in sd.items())
            del sd
    return [s for s in out if not s[0].endswith(IGNORED_SUFFIXES)]


def file_tensors(files: list[Path], skip: frozenset = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, in stored dtype. safetensors tensors are memory-mapped per tensor, so
    nothing stays resident once the caller drops a tensor; .bin maps are re-opened every RELEASE_BYTES."""
    for path in files:
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                names = list(f.keys())
            for name in names:
                if name in skip or name.endswith(IGNORED_SUFFIXES):
                    continue
                with _safe_open(path) as f:
                    t = f.get_tensor(name)
                yield name, t
                del t
        else:
            sd, done = _load_bin(path), 0
            mapped = zipfile.is_zipfile(path)  # torch's zip format is memory-mapped; the legacy pickle is read whole
            for name in list(sd):
                if name in skip or name.endswith(IGNORED_SUFFIXES):
                    continue
                if not mapped:  # already in RAM: hand each tensor over (re-reading would hold two copies)
                    yield name, sd.pop(name)
                    continue
                t = sd[name].clone()
                done += t.numel() * t.element_size()
                if done > RELEASE_BYTES:  # drop the map so read pages leave the resident set
                    sd, done = _load_bin(path), 0
                yield name, t
                del t
            del sd


class FileReader:
    """Random access to the tensors of safetensors / .bin weight files (HF key names)."""

    def __init__(self, files: list[Path], tied: bool):
        self.tied, self._where, self._bins = tied, {}, {}
        for path in files:
            if path.suffix == ".safetensors":
                with _safe_open(path) as f:
                    names = list(f.keys())
            else:
                names = list(_load_bin(path))
            self._where.update({n: path for n in names if not n.endswith(IGNORED_SUFFIXES)})

    def read(self, name: str) -> torch.Tensor:
        if self.tied and name == HEAD and HEAD not in self._where:
            name = EMBED
        path = self._where[name]
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:  # one map per read: nothing stays resident after the caller drops it
                return f.get_tensor(name)
        if path not in self._bins:
            self._bins = {path: _load_bin(path)}  # keep one mapped .bin at a time
        return self._bins[path][name].clone()
