"""Write a stream of tensors as (sharded) safetensors without holding more than one tensor in memory.

`safetensors.save_file` needs every tensor at once; the format does not: an 8-byte header length, a JSON
header (dtype, shape, byte offsets) and the raw bytes in header order. Shards are planned from the
(name, shape, dtype) specs a `WeightSource` gives before any tensor is read, each header is written, and the
tensors are streamed in behind it. Layout as Hugging Face: `model.safetensors`, or
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
On the way the content id is computed: sha256 over per-tensor hashes of (name, dtype, shape, bytes),
sorted by name, so it does not depend on shard layout or tensor order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm

from scaletrain.errors import UserError

TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"
Spec = tuple[str, tuple, torch.dtype]


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes (decimal units like Hugging Face; KiB/MiB/GiB are binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]I?)?B?)\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size '{text}' is not a size; use e.g. 2GB, 500MB or 1GiB")
    unit = m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise UserError(f"--max-shard-size '{text}' must be positive")
    return size


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: list[Spec], max_bytes: int) -> list[list[Spec]]:
    """Consecutive groups of specs, each at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        b = nbytes(spec[1], spec[2])
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += b
    return shards


def _header(shard: list[Spec]) -> bytes:
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard:
        b = nbytes(shape, dtype)
        entries[name] = {"dtype": TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + b]}
        offset += b
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{TO_ST.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
    h.update(_bytes(t))
    return h.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]}\n".encode())
    return h.hexdigest()[:16]


def write_safetensors(out_dir: Path, specs: list[Spec], tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                      dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict:
    """Write `tensors` (in the order of `specs`) into out_dir; `dtype` converts floating tensors.
    Returns {"files": [...], "total_size": bytes, "content_id": str, "dtypes": [...]}."""
    conv = lambda dt: dtype if dtype is not None and dt.is_floating_point else dt  # noqa: E731
    specs = [(n, tuple(s), conv(dt)) for n, s, dt in specs]
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(nbytes(s, d) for _, s, d in specs)
    it: Iterator = iter(tensors)
    digests: dict[str, str] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=None if progress else True)
    for shard, fname in zip(shards, names):
        with open(out_dir / fname, "wb") as f:
            f.write(_header(shard))
            for name, shape, dt in shard:
                got, t = next(it, (None, None))
                if got != name:
                    raise RuntimeError(f"tensor stream out of order: expected {name}, got {got}")
                if tuple(t.shape) != shape:
                    raise UserError(f"{name} has shape {list(t.shape)}, its header says {list(shape)}; the source is inconsistent")
                t = t.to(dt).contiguous()
                digests[name] = tensor_digest(name, t)
                f.write(_bytes(t))
                bar.update(nbytes(shape, dt))
                del t
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    extra = next(it, None)
    if extra is not None:  # a tensor the specs did not plan would otherwise be left out of the files silently
        raise RuntimeError(f"tensor stream has {extra[0]} after the last planned tensor; specs and tensors disagree")
    if n > 1:
        weight_map = {name: fname for shard, fname in zip(shards, names) for name, _, _ in shard}
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"files": names, "total_size": total, "content_id": combine_digests(digests), "dtypes": sorted({TO_ST[d] for _, _, d in specs})}
