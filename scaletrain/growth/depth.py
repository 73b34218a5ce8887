"""Depth growth as a layer map: each child block copies one parent block, optionally as an identity block.

* identity: the parent's blocks in order plus new blocks whose o_proj and down_proj are zero, so they add
  nothing to the residual stream (exact for pre-norm blocks; LLaMA Pro). Their other weights copy the parent
  block just before them (the one after, for a block inserted in front), so they start from sensible features.
* stack (G_stack / Staged Training "append"): child block j copies parent block j % L. Not exact.
* interleave (Staged Training "alternate"): child block j copies parent block floor(j*L/L'), i.e. each block
  followed by its copy for L' = 2L. Not exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

DEPTH_METHODS = ("identity", "stack", "interleave")
INSERT_MODES = ("end", "interleave")


@dataclass(frozen=True)
class LayerSource:
    parent: int  # parent block whose (width-grown) weights this child block starts from
    identity: bool  # True: o_proj and down_proj are zeroed, the block is an exact no-op


def identity_positions(n_parent: int, n_child: int, insert: Union[str, Sequence[int]]) -> list[int]:
    """Child indices of the new identity blocks.

    "end": after the last parent block. "interleave": spread evenly, one new block after every L/n parent
    blocks (LLaMA Pro). A list: the child indices themselves (must be distinct, in range, n_child-n_parent)."""
    n_new = n_child - n_parent
    if isinstance(insert, str):
        if insert == "end":
            return list(range(n_parent, n_child))
        # new block j follows parent block a_j = ceil((j+1)*L/n) - 1; shift by the new blocks already placed
        after = [-(-(j + 1) * n_parent // n_new) - 1 for j in range(n_new)]
        return [a + 1 + j for j, a in enumerate(after)]
    return sorted(int(i) for i in insert)


def layer_map(n_parent: int, n_child: int, method: str, insert: Union[str, Sequence[int]] = "end") -> list[LayerSource]:
    """One `LayerSource` per child block. Shapes are validated by `plan.validate`."""
    if method == "stack":
        return [LayerSource(j % n_parent, False) for j in range(n_child)]
    if method == "interleave":
        return [LayerSource(j * n_parent // n_child, False) for j in range(n_child)]
    new = set(identity_positions(n_parent, n_child, insert))
    out: list[LayerSource] = []
    next_parent = 0
    for j in range(n_child):
        if j in new:
            out.append(LayerSource(max(next_parent - 1, 0), True))
        else:
            out.append(LayerSource(next_parent, False))
            next_parent += 1
    return out
