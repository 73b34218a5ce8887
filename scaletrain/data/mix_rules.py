"""The rules of a `data.mix` that need no data: each part's name, its share of a block of windows, and the
checks config.py makes (light: no torch, so a config mistake is refused before the heavy imports)."""

from __future__ import annotations

import os
import re
from pathlib import Path

BLOCK = 4096  # samples per block: weights are kept to 1/4096 of a batch stream
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def part_names(mix) -> list[str]:
    """Each part's name: given, else its source's file or directory name."""
    return [p.name or Path(os.path.expanduser(p.source.rstrip("/"))).name.split(".")[0] or "source" for p in mix]


def block_counts(weights: list[float]) -> list[int]:
    """Windows of each source in a block of BLOCK: the weights' shares, rounded by largest remainder."""
    top = max(weights)  # (relative first: two weights of 1e308 summed to inf)
    total = sum(w / top for w in weights)
    exact = [BLOCK * (w / top) / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: BLOCK - sum(counts)]:
        counts[i] += 1
    return counts


def validate_mix(data) -> None:
    """Config rules (config.py calls this when data.mix is set)."""
    if data.source != "stdlib":
        raise ValueError("set data.source or data.mix, not both: data.mix's entries name their own sources")
    if data.format != "text":
        raise ValueError(f"data.mix mixes running text; data.format={data.format} takes one data.source")
    names = part_names(data.mix)
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"data.mix name {name!r} must be letters, digits, '_', '.' or '-' (it names val/<name>/loss); "
                             "set the entry's name")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"data.mix has two sources named {twice[0]!r}; give the entries distinct names")
    counts = block_counts([p.weight for p in data.mix])
    if 0 in counts:
        small = data.mix[counts.index(0)]
        raise ValueError(f"data.mix weight {small.weight} of {small.source} is below 1/{BLOCK} of the total; raise it")
