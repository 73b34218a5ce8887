"""Stream full fp32 weights out of one DeepSpeed checkpoint tag, tensor by tensor, for any ZeRO stage.

Where the weights live (DeepSpeed 0.19, as written by our trainer):
  ZeRO-0 fp32        mp_rank_00_model_states.pt ["module"] holds the fp32 weights themselves.
  ZeRO-0 bf16/fp16   ["module"] holds the low-precision copy; the fp32 masters are
                     ["optimizer"]["fp32_groups"][group][i], one per parameter of our two AdamW groups.
  ZeRO-1/2           *_optim_states.pt per rank: ["single_partition_of_fp32_groups"][g] is rank r's slice of
                     group g's flat fp32 vector (the ranks' slices concatenated = the group, params in the
                     order of mp_rank_00's "param_shapes"[g], plus "param_alignment_paddings").
  ZeRO-3             per rank ["fp32_flat_groups"]: every parameter is split into world-size equal pieces
                     (ceil(numel/world), zero-padded), rank r's piece appended to its flat vector.
Files are opened with torch.load(mmap=True, weights_only=True): only the bytes of the tensor being read are
paged in (never the Adam moments), DeepSpeed's own pickled objects become inert stubs (nothing of
DeepSpeed is executed), and the maps are dropped every `RELEASE_BYTES` so resident memory stays bounded
by about one tensor plus that budget whatever the model size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from scaletrain.errors import UserError

RELEASE_BYTES = 64 << 20


class _Stub:
    """Stands in for any DeepSpeed class in a checkpoint pickle (ZeroStageEnum, LossScaler, ...)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def value(self) -> Any:
        return self.args[0] if self.args else None


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def load_restricted(path: Path) -> dict:
    """torch.load with weights_only=True; DeepSpeed's classes are mapped to `_Stub`, anything else refused."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise UserError(f"cannot read {path} ({type(e).__name__}); the checkpoint is damaged") from None
    from scaletrain.train.safe_load import ALLOWED

    # Exact names, not a "deepspeed." prefix: protocol-4 pickles resolve dotted paths, so a prefix would admit
    # e.g. deepspeed.runtime.engine.os.system (mapped to a stub here, but then the file is not ours anyway).
    foreign = [n for n in names if n not in ALLOWED]
    if foreign:
        raise UserError(f"{path} pickles {foreign[0]}, which scaletrain will not unpickle; it is not a DeepSpeed checkpoint of ours")
    with torch.serialization.safe_globals([(_Stub, n) for n in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


def _read_range(pieces: list[torch.Tensor], start: int, count: int) -> list[torch.Tensor]:
    """Slices covering [start, start+count) of the concatenation of `pieces` (no copy of the rest)."""
    out, base = [], 0
    for t in pieces:
        n = t.numel()
        lo, hi = max(start, base), min(start + count, base + n)
        if lo < hi:
            out.append(t.view(-1)[lo - base : hi - base])
        base += n
        if base >= start + count:
            break
    return out


def gather_fp32(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces (views of memory-mapped shards) copied into one new fp32 tensor: one copy of the data in RAM,
    and no view of a map survives (torch.cat then .float() then .clone() held up to three)."""
    out = torch.empty(sum(p.numel() for p in pieces), dtype=torch.float32)
    pos = 0
    for p in pieces:
        out[pos : pos + p.numel()].copy_(p.view(-1))
        pos += p.numel()
    return out


class ZeroTag:
    """One checkpoint tag dir (`.../checkpoints/global_stepN`). `tied`: the model ties lm_head to the
    embedding (then lm_head.weight is not yielded)."""

    def __init__(self, tag_dir: Path, tied: bool):
        self.dir = Path(tag_dir)
        self.tied = tied
        self.model_files = sorted(self.dir.glob("*model_states.pt"), key=_natural)
        self.optim_files = sorted(self.dir.glob("*optim_states.pt"), key=_natural)
        if not self.model_files:
            raise UserError(f"{self.dir} holds no DeepSpeed *model_states.pt file; not a checkpoint tag")
        self._cache: dict[Path, dict] = {}
        self._since_release = 0
        head = self._load(self.model_files[0])
        self.stage = 0
        if self.optim_files:
            osd = self._load(self.optim_files[0])["optimizer_state_dict"]
            stage = osd.get("zero_stage")
            self.stage = int(stage.value() if isinstance(stage, _Stub) else stage or 0)
            count = osd.get("partition_count")
            self.world = max(count) if isinstance(count, list) else int(count or 1)
            if self.stage == 0:  # bf16 without ZeRO still writes per-rank partitions like ZeRO-1
                self.stage = 1
        else:
            self.world = 1
        if self.stage and len(self.optim_files) != self.world:
            raise UserError(f"{self.dir} needs {self.world} optimizer shards but has {len(self.optim_files)}; the checkpoint is incomplete")
        self.param_shapes: list[dict[str, torch.Size]] = [dict(g) for g in (head.get("param_shapes") or [])]
        self.paddings = None
        if self.stage in (1, 2):
            self.paddings = self._load(self.optim_files[0])["optimizer_state_dict"].get("param_alignment_paddings")
        self.module_names = [n for n in head["module"] if not (tied and n == "lm_head.weight")]
        self._head_shapes = {n: tuple(t.shape) for n, t in head["module"].items()}
        self._release()

    # -- file handles ------------------------------------------------------------------------------
    def _load(self, path: Path) -> dict:
        if path not in self._cache:
            self._cache[path] = load_restricted(path)
        return self._cache[path]

    def _release(self) -> None:
        """Drop the memory maps; pages of read tensors leave this process's resident set."""
        self._cache.clear()
        self._since_release = 0

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self._since_release += t.numel() * t.element_size()
        if self._since_release > RELEASE_BYTES:
            self._release()
        return t

    # -- what is inside ----------------------------------------------------------------------------
    def specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order `tensors()` yields them."""
        if self.stage == 0:
            return [(n, self._head_shapes[n]) for n in self.module_names]
        shapes = [(n, tuple(s)) for g in self.param_shapes for n, s in g.items()]
        return [(n, s) for n, s in shapes if not (self.tied and n == "lm_head.weight")]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fp32 tensor) one at a time (fresh memory, safe to keep)."""
        if self.stage == 0:
            yield from self._stage0()
        elif self.stage in (1, 2):
            yield from self._zero12()
        else:
            yield from self._zero3()
        self._release()

    def _stage0(self):
        names = self.module_names
        if (self._load(self.model_files[0]).get("optimizer") or {}).get("fp32_groups") is None:
            for n in names:
                yield n, self._count(self._load(self.model_files[0])["module"][n].float().clone())
            return
        # Our AdamW groups: matrices (decay) then vectors (no decay), each in parameter order.
        order = [n for n in names if len(self._head_shapes[n]) >= 2] + [n for n in names if len(self._head_shapes[n]) < 2]
        shapes = [tuple(t.shape) for g in self._load(self.model_files[0])["optimizer"]["fp32_groups"] for t in g]
        if shapes != [self._head_shapes[n] for n in order]:
            raise UserError(f"{self.dir}: fp32 master weights do not match the module's parameters; not written by scaletrain")
        index = {n: i for i, n in enumerate(order)}
        for n in names:  # look the file up each time: _count may have dropped the map
            groups = self._load(self.model_files[0])["optimizer"]["fp32_groups"]
            t = [x for g in groups for x in g][index[n]].float().clone()
            del groups
            yield n, self._count(t)

    def _group_pieces(self, key: str, g: Optional[int]) -> list[torch.Tensor]:
        out = []
        for f in self.optim_files:
            groups = self._load(f)["optimizer_state_dict"][key]
            out.extend([groups[g]] if g is not None else list(groups))
        return out

    def _zero12(self):
        for g, shapes in enumerate(self.param_shapes):
            offset = 0
            pads = self.paddings[g] if self.paddings is not None else [0] * len(shapes)
            for (name, shape), pad in zip(shapes.items(), pads):
                n = math.prod(shape)
                parts = _read_range(self._group_pieces("single_partition_of_fp32_groups", g), offset, n)
                offset += n + pad
                if sum(p.numel() for p in parts) != n:
                    raise UserError(f"{self.dir}: optimizer shards are shorter than the parameters they hold; the checkpoint is damaged")
                if self.tied and name == "lm_head.weight":
                    continue
                t = gather_fp32(parts).view(shape)
                del parts  # keep no view of the map alive across the yield
                yield name, self._count(t)

    def _zero3(self):
        offset = 0
        for name, shape in [(n, s) for g in self.param_shapes for n, s in g.items()]:
            n = math.prod(shape)
            part = math.ceil(n / self.world)
            pieces = []
            for f in self.optim_files:
                pieces.extend(_read_range(list(self._load(f)["optimizer_state_dict"]["fp32_flat_groups"]), offset, part))
            offset += part
            if sum(p.numel() for p in pieces) != part * self.world:
                raise UserError(f"{self.dir}: ZeRO-3 shards are shorter than the parameters they hold; the checkpoint is damaged")
            if self.tied and name == "lm_head.weight":
                continue
            flat = gather_fp32(pieces)  # one copy; the padding past n (under `world` elements) goes with it
            del pieces
            yield name, self._count(flat[:n].view(shape))
            del flat
