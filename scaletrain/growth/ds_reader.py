"""Random-access reads of one parameter, or one of its Adam moments, from a DeepSpeed checkpoint tag dir.

`scaletrain.weights.zero.ZeroTag` streams the weights in file order; growth needs them in the child's order
(a stacked child reads parent block 0 again after block L-1) and needs the Adam moments, which live in the
same flat layout as the fp32 masters (see `scaletrain/weights/zero.py` for the layouts). Files are opened
with the same restricted, memory-mapped unpickler; the maps are dropped every RELEASE_BYTES so the
resident set stays about one parameter plus that budget.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from scaletrain.errors import UserError
from scaletrain.weights.files import EMBED, HEAD
from scaletrain.weights.zero import RELEASE_BYTES, ZeroTag, _read_range, gather_fp32, load_restricted


class DeepSpeedReader:
    """`read(name)`: fp32 weights; `moment(name, "exp_avg"|"exp_avg_sq")`: fp32 Adam moment; `adam_step`."""

    def __init__(self, tag_dir: Path, tied: bool):
        self.tag = ZeroTag(tag_dir, tied)  # validates the file set, finds stage / world / shapes
        self.tied = tied
        self._maps: dict[Path, dict] = {}
        self._read_bytes = 0
        self._shapes = dict(self.tag.specs())
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (group or index, offset, numel)
        if self.tag.stage == 0:
            # our AdamW groups (train/build.py: build_optimizer): matrices, then vectors, each in parameter order
            names = list(self._shapes)
            order = [n for n in names if len(self._shapes[n]) >= 2] + [n for n in names if len(self._shapes[n]) < 2]
            self._where = {n: (i, 0, 0) for i, n in enumerate(order)}
        elif self.tag.stage in (1, 2):
            for g, shapes in enumerate(self.tag.param_shapes):
                pads = self.tag.paddings[g] if self.tag.paddings is not None else [0] * len(shapes)
                offset = 0
                for (name, shape), pad in zip(shapes.items(), pads):
                    self._where[name] = (g, offset, math.prod(shape))
                    offset += math.prod(shape) + pad
        else:
            offset = 0
            for name, shape in [(n, s) for g in self.tag.param_shapes for n, s in g.items()]:
                part = math.ceil(math.prod(shape) / self.tag.world)
                self._where[name] = (0, offset, part)
                offset += part

    # ---- what is inside -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._key(name)]

    def _key(self, name: str) -> str:
        return EMBED if self.tied and name == HEAD else name

    # ---- file maps ----------------------------------------------------------------------------------
    def _load(self, path: Path) -> dict:
        if path not in self._maps:
            self._maps[path] = load_restricted(path)
        return self._maps[path]

    def _done(self, t: torch.Tensor) -> torch.Tensor:
        self._read_bytes += t.numel() * t.element_size()
        if self._read_bytes > RELEASE_BYTES:  # drop the maps: read pages leave the resident set
            self._maps.clear()
            self._read_bytes = 0
        return t

    # ---- reads ----------------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        return self._done(self._get(self._key(name), None))

    def moment(self, name: str, kind: str) -> torch.Tensor:
        return self._done(self._get(self._key(name), kind))

    def has_moments(self) -> bool:
        if self.tag.stage:
            return True
        opt = self._load(self.tag.model_files[0]).get("optimizer") or {}
        return bool((opt.get("optimizer_state_dict") or opt).get("state"))

    @property
    def adam_step(self) -> int:
        """Adam's step count (bias correction) as saved; 0 when the checkpoint has no optimizer state."""
        if self.tag.stage == 0:
            opt = self._load(self.tag.model_files[0]).get("optimizer") or {}
            state = (opt.get("optimizer_state_dict") or opt).get("state") or {}
        else:
            osd = self._load(self.tag.optim_files[0])["optimizer_state_dict"]
            state = osd["optimizer_state_dict" if self.tag.stage == 3 else "base_optimizer_state"]["state"]
        first = next(iter(state.values()), {})
        return int(first.get("step", 0))

    def _get(self, name: str, kind: Optional[str]) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        shape, (g, offset, n) = self._shapes[name], self._where[name]
        if self.tag.stage == 0:
            return self._zero0(name, g, kind).float().reshape(shape).clone()
        if self.tag.stage in (1, 2):
            parts = _read_range([self._flat(f, g, kind) for f in self.tag.optim_files], offset, n)
        else:
            parts = []
            for f in self.tag.optim_files:
                groups = self._flat(f, None, kind)
                parts.extend(_read_range(list(groups), offset, n))
        return gather_fp32(parts)[: math.prod(shape)].reshape(shape)  # one copy: no view of the maps survives

    def _zero0(self, name: str, index: int, kind: Optional[str]) -> torch.Tensor:
        head = self._load(self.tag.model_files[0])
        opt = head.get("optimizer") or {}
        if kind is None:
            masters = opt.get("fp32_groups")
            return [t for g in masters for t in g][index] if masters else head["module"][name]
        state = (opt.get("optimizer_state_dict") or opt).get("state") or {}
        if index not in state:
            raise UserError(f"{self.tag.dir} holds no optimizer state to grow (use --optimizer reset)")
        return state[index][kind]

    def _flat(self, path: Path, group: Optional[int], kind: Optional[str]):
        """Rank file `path`: its flat fp32 partition(s) (kind None) or the matching AdamW state."""
        osd = self._load(path)["optimizer_state_dict"]
        if kind is None:
            groups = osd["fp32_flat_groups" if self.tag.stage == 3 else "single_partition_of_fp32_groups"]
        else:
            state = osd["optimizer_state_dict" if self.tag.stage == 3 else "base_optimizer_state"]["state"]
            groups = [state[i][kind] for i in sorted(state)]
        return groups if group is None else groups[group]
