"""Is there room for the next checkpoint? Checked before every save, so a full disk costs one skipped save
(with a clear message) instead of a crash half-way through writing shards.

The size estimate is the newest complete checkpoint's size from its manifest (the next one has the same
tensors), or, before the first save, 16 bytes per parameter: fp32 master (4) + Adam moments (8) + the
module's own copy (4 in fp32; 2 in bf16, so this over-estimates a little). A margin covers DeepSpeed's
small extra files and rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

BYTES_PER_PARAM = 16
MARGIN = 1.10
SLACK = 64_000_000  # never fill a disk to its last bytes: logs, TensorBoard and the OS need some too


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def num_params(module) -> int:
    """Parameters of the whole model, also under ZeRO-3 (where each rank holds only a partition)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def estimate(params: int, prev: Optional[tuple[str, int, Optional[int]]] = None) -> tuple[int, str]:
    """(bytes the next checkpoint needs, where the figure comes from). `prev`: (tag, bytes, parameters) of the
    newest complete checkpoint (checkpoint.previous_checkpoint_bytes), None before the first. A model that grew
    since (in-run growth) scales the previous size by its parameters."""
    fresh = (int(params * BYTES_PER_PARAM * MARGIN), f"{params:,} parameters x {BYTES_PER_PARAM} bytes")
    if prev is None:
        return fresh
    tag, size, prev_params = prev
    if prev_params is None or prev_params == params:  # (None: a manifest from before parameters were recorded)
        return int(size * MARGIN), f"the previous checkpoint {tag} took {_fmt(size)}"
    scaled = size * params / max(prev_params, 1)
    return int(scaled * MARGIN), (f"the previous checkpoint {tag} took {_fmt(size)} for {prev_params:,} parameters; "
                                  f"the model has {params:,} now")


def free_bytes(path: Path) -> int:
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def check_before_save(engine, root: Path, step: int, prev: Optional[tuple[str, int]]) -> Optional[str]:
    """None when the next checkpoint fits, else the one-line reason (with what to do)."""
    need, why = estimate(num_params(engine.module), prev)
    free = free_bytes(root)
    if free >= need + SLACK:
        return None
    return (f"{root} has {_fmt(free)} free but the checkpoint of step {step} needs about {_fmt(need)} ({why}) and "
            f"{_fmt(SLACK)} stay free for logs; training continues and the previous checkpoints are kept: free disk space or lower train.keep_last")
