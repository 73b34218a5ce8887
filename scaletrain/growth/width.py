"""Width growth as index maps: which parent unit each child unit copies, and how to fill new units.

Every widened axis (residual stream, attention heads, KV heads, FFN neurons) is a `DimMap`: child index
-> parent index or -1 (new). One generic `grow_linear` then builds any projection from its output and input
maps. The rules that make the child compute exactly the parent's function (see docs in `plan.py`):

* a copied input unit is read by every copy with the weight divided by its number of copies;
* new input units are read with random weights only where they are guaranteed to hold zero (zero residual
  coordinates), zero otherwise; new output units are random for readers (q/k/v/gate/up) and zero for writers
  into the residual stream (o_proj/down_proj rows of zero coordinates, which must stay zero);
* the residual stream is x' = [c*x, ..., c*x (k copies), 0_r] with c = sqrt(D/(k*d)). Then
  mean(x'^2) == mean(x^2) exactly, so every RMSNorm keeps its eps (a shared config value) and only the
  gains change (g/c). For integer factors c == 1 and this is plain duplication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DimMap:
    """One axis: `src[j]` = parent index copied by child index j, or -1 for a new unit."""

    src: torch.Tensor  # long [n_child]
    n_parent: int

    @property
    def n_child(self) -> int:
        return int(self.src.numel())

    @property
    def copied(self) -> torch.Tensor:
        return self.src >= 0

    @property
    def count(self) -> torch.Tensor:
        """Per child index: how many child copies its parent unit has (1 for new units)."""
        per_parent = torch.bincount(self.src[self.copied], minlength=self.n_parent).float()
        return torch.where(self.copied, per_parent[self.src.clamp(min=0)], torch.ones(()))

    def expand(self, size: int) -> "DimMap":
        """Unit map -> element map for units of `size` elements (heads of head_dim rows)."""
        inner = torch.arange(size)
        src = torch.where(self.src[:, None] >= 0, self.src[:, None] * size + inner, -1).reshape(-1)
        return DimMap(src, self.n_parent * size)


def tiled(n_parent: int, n_child: int, fill_copies: bool) -> DimMap:
    """[0..p-1] repeated; the tail beyond whole repeats is new (-1) or, if fill_copies, continues the cycle."""
    idx = torch.arange(n_child)
    whole = (n_child // n_parent) * n_parent
    src = idx % n_parent
    if not fill_copies:
        src = torch.where(idx < whole, src, -1)
    return DimMap(src, n_parent)


@dataclass(frozen=True)
class HiddenMap:
    """The residual stream: k tiled copies scaled by c, then r zero coordinates."""

    map: DimMap
    k: int
    c: float

    @classmethod
    def build(cls, d: int, big_d: int) -> "HiddenMap":
        k = big_d // d
        return cls(tiled(d, big_d, fill_copies=False), k, 1.0 if big_d == k * d else math.sqrt(big_d / (k * d)))


def head_maps(h: int, kv: int, h2: int, kv2: int, fill_copies: bool) -> tuple[DimMap, DimMap]:
    """(query-head map, kv-head map) such that every copied query head reads a copy of its own KV head.

    Child KV head m copies parent KV m % K for the whole rounds m < K*(K'//K) (and, with fill_copies, for the
    rest too); otherwise it is new. The query slots of all child groups that copy parent KV q are filled in
    order with q's G query heads, cyclically: tiling for K'=nK, interleaving for K'=K (the GQA trap: plain
    tiling with K kept would pair copies with the wrong KV head). Leftover slots hold new heads.
    Raises ValueError when some parent KV group has fewer child slots than query heads.
    """
    g, g2 = h // kv, h2 // kv2
    kv_map = tiled(kv, kv2, fill_copies)
    q_src = torch.full((h2,), -1, dtype=torch.long)
    for q in range(kv):
        groups = [m for m in range(kv2) if int(kv_map.src[m]) == q]
        slots = [m * g2 + t for m in groups for t in range(g2)]
        if len(slots) < g:
            raise ValueError(f"parent kv head {q} serves {g} query heads but the child has only {len(slots)} slots for its copies")
        used = len(slots) if fill_copies else (len(slots) // g) * g
        for s, j in enumerate(slots[:used]):
            q_src[j] = q * g + s % g
    return DimMap(q_src, h), kv_map


def _gen(seed: int, name: str) -> torch.Generator:
    """A generator per tensor name, so a streaming caller may build tensors in any order."""
    import zlib

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))


def zero_sum_noise(rows: int, in_map: DimMap, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise [rows, n_child_in] that sums to zero over the copies of each parent input unit, per row.

    Reading identical copies, (W/n + N_1) x + ... + (W/n + N_n) x == W x, so the forward stays exact while
    the copies' upstream gradients differ (HyperCloning's +N/-N, generalised to n copies)."""
    z = torch.randn(rows, in_map.n_child, generator=gen).mul_(std)  # in place: a child-sized fp32 temporary less
    n, p = in_map.n_child, in_map.n_parent
    if n % p == 0 and torch.equal(in_map.src, torch.arange(n) % p):  # whole tiles (integer factors): same
        z = z.view(rows, n // p, p)                                   # result, without gathers (the hot path)
        return z.sub_(z.mean(dim=1, keepdim=True)).view(rows, n)
    z = torch.where(in_map.copied, z, torch.zeros(()))
    src = in_map.src.clamp(min=0)
    sums = torch.zeros(rows, in_map.n_parent).index_add_(1, src[in_map.copied], z[:, in_map.copied])
    return torch.where(in_map.copied, z - sums[:, src] / in_map.count, torch.zeros(()))


def grow_linear(
    w: torch.Tensor,
    out_map: DimMap,
    in_map: DimMap,
    *,
    out_scale: float = 1.0,
    split: bool = True,
    new_rows: str = "zero",
    new_cols: str = "zero",
    init_std: float = 0.02,
    noise: float = 0.0,
    gen: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A child projection [n_out, n_in] from parent `w` [out, in] (nn.Linear layout).

    Copied entries: out_scale * w[src_out, src_in] / copies(src_in) (no division with split=False: the
    embedding writes, rather than reads, its copied columns). New rows / new columns: "zero" or
    "random" (N(0, init_std)); a new row wins over a new column. `noise` (relative to the split entries'
    RMS) adds zero-sum noise over input copies, which keeps the function exact."""
    n_out, n_in = out_map.n_child, in_map.n_child
    cols, cols_ok = in_map.src.clamp(min=0), in_map.copied
    all_cols = bool(cols_ok.all())
    scale = out_scale / (in_map.count if split else torch.ones(n_in))
    noise_std = noise * _rms(w) * out_scale / in_map.count if noise > 0 else None
    out = torch.empty(n_out, n_in, dtype=w.dtype)
    # Block by rows: each block's fp32 temporaries are a few times 16 MB, where whole-tensor ones were ~4.5x the
    # child in fp32 (a 128k x 4096 embedding: ~9 GB).
    step = max(1, _BLOCK_ELEMENTS // max(1, n_in))
    for r0 in range(0, n_out, step):
        src = out_map.src[r0:r0 + step]
        rows_ok = src >= 0
        all_rows = bool(rows_ok.all())
        core = w.index_select(0, src.clamp(min=0)).float().index_select(1, cols).mul_(scale[None, :])
        if noise_std is not None:
            core.add_(zero_sum_noise(len(src), in_map, noise_std, gen))
        if not (all_cols and all_rows):
            fill = torch.zeros(())
            if (new_rows == "random" and not all_rows) or (new_cols == "random" and not all_cols):
                rnd = torch.randn(core.shape, generator=gen).mul_(init_std)
                fill = torch.where(rows_ok[:, None], rnd if new_cols == "random" else fill,
                                   rnd if new_rows == "random" else fill)
            core = torch.where(rows_ok[:, None] & cols_ok[None, :], core, fill)
        out[r0:r0 + step] = core
    return out


_BLOCK_ELEMENTS = 1 << 22


def _rms(w: torch.Tensor) -> torch.Tensor:
    """Root mean square of `w` in fp32 (fp64 sums), a block of rows at a time: no whole fp32 copy."""
    step = max(1, _BLOCK_ELEMENTS // max(1, w[0].numel()))
    sq = sum(w[r:r + step].float().pow(2).sum(dtype=torch.float64) for r in range(0, w.shape[0], step))
    return (sq / w.numel()).sqrt().float()


def grow_vector(g: torch.Tensor, m: DimMap, scale: float) -> torch.Tensor:
    """RMSNorm gain: copies scaled; new coordinates (which only ever see zeros at growth time) get the
    mean copied gain, so they behave like an ordinary coordinate once training makes them non-zero."""
    dtype = g.dtype
    g = g.float()
    out = torch.where(m.copied, g[m.src.clamp(min=0)], g.mean()) * scale
    return out.to(dtype)


def grow_bias(b: torch.Tensor, m: DimMap, scale: float = 1.0) -> torch.Tensor:
    """A bias (or LayerNorm shift) along a grown axis: copies scaled, new units 0 -- a new residual coordinate
    must stay 0 and a new reader unit's bias is an ordinary fresh init."""
    dtype = b.dtype
    return torch.where(m.copied, b.float()[m.src.clamp(min=0)] * scale, torch.zeros(())).to(dtype)


def grad_scale_kv(q_map: DimMap, kv_map: DimMap, g_parent: int) -> torch.Tensor:
    """Per child KV head: (child dL/dk) / (parent dL/dk of the KV head it copies).

    A copied query head's attention gradient is 1/copies of its parent's (its o_proj columns are split), so a
    child KV head collects sum(1/copies) over the copied query heads in its group; this is exactly the
    parent's gradient times that sum / G when the group holds each parent head equally often (all tiling /
    interleaving layouts), and the average otherwise."""
    g2 = q_map.n_child // kv_map.n_child
    inv = torch.where(q_map.copied, 1.0 / q_map.count, torch.zeros(()))
    return torch.where(kv_map.copied, inv.view(kv_map.n_child, g2).sum(1) / g_parent, torch.zeros(()))
