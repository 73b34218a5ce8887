"""Streaming tensor-name maps between our state dict and another transformers architecture's.

A *rule* is `rule(name, shape) -> [Out]`: what to emit when the tensor `name` arrives. Each `Out` names the
output tensor, its shape, and `make(buf)` building it from the tensors seen so far (`buf`: name -> tensor).
That covers everything the variant exports need, one tensor in, at most a few out:
  rename            model.layers.0.mlp.up_proj.weight -> model.layers.0.mlp.c_fc.weight (Starcoder2)
  zero-fill         a bias the other side has and we do not (a zero bias is no bias: exact)
  must-be-zero      a bias we do not have arriving from the other side (refused unless all zeros)
  fuse / split      MPT's Wqkv = [q; k; v]
  repeat / collapse StableLM's per-head q/k LayerNorms <-> our one norm shared by all heads
`map_specs` and `map_tensors` apply the same rule, so shapes and tensors come out in the same order
(write_safetensors relies on it). Only tensors a later output still needs are kept (fused q/k, per-head norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from scaletrain.errors import UserError

LAYER = re.compile(r"^(?P<pre>.*layers\.(?P<i>\d+)\.)(?P<rest>.+)$")


@dataclass(frozen=True)
class Out:
    name: Optional[str]  # None: nothing is emitted, `make` only checks (must-be-zero)
    shape: tuple
    make: Callable[[dict], torch.Tensor]
    keep: tuple[str, ...] = ()  # input names a later Out reads from buf


Rule = Callable[[str, tuple], list]


def same(name: str, shape: tuple) -> list[Out]:
    return [Out(name, shape, lambda buf: buf[name])]


def renamed(src: str, dst: str, shape: tuple) -> Out:
    return Out(dst, shape, lambda buf: buf[src])


def zeros(dst: str, shape: tuple) -> Out:
    return Out(dst, shape, lambda buf: torch.zeros(shape))


def must_be_zero(src: str, why: str) -> Out:
    def check(buf):
        if bool(buf[src].float().abs().max() > 0):
            raise UserError(f"{src} is not zero, but {why}")
        return None

    return Out(None, (), check)


def deferred(src: str) -> Out:
    """Keep `src` for a later output (e.g. q/k until v arrives), emit nothing now."""
    return Out(None, (), lambda buf: None, keep=(src,))


def map_specs(rule: Rule, specs: Iterable[tuple]) -> list[tuple]:
    """[(name, shape, dtype)] -> the mapped list. Zero-filled tensors take the dtype of their trigger."""
    out = []
    for name, shape, dtype in specs:
        out.extend((o.name, tuple(o.shape), dtype) for o in rule(name, tuple(shape)) if o.name is not None)
    return out


def map_tensors(rule: Rule, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    buf: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        buf[name] = t
        outs = rule(name, tuple(t.shape))
        kept = {k for o in outs for k in o.keep}
        for o in outs:
            value = o.make(buf)
            if o.name is not None:
                yield o.name, value.to(t.dtype).reshape(o.shape)
        if name not in kept:
            del buf[name]
        for o in outs:  # inputs a fused output consumed are no longer needed
            for k in getattr(o.make, "consumes", ()):
                buf.pop(k, None)


def consuming(names: tuple[str, ...], fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """Mark `fn` as the last reader of `names` (they leave the buffer after it ran)."""
    fn.consumes = names  # type: ignore[attr-defined]
    return fn


class Adapter:
    """specs()/tensors() transforms for a WeightSource whose files use another architecture's names."""

    def __init__(self, rule: Rule, describe: str):
        self.rule, self.describe = rule, describe

    def specs(self, specs: list[tuple]) -> list[tuple]:
        return map_specs(self.rule, specs)

    def tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return map_tensors(self.rule, tensors)
