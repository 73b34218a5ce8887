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


def phase_weights(data) -> list[tuple[int, list[float]]]:
    """[(at_step, weight of each data.mix part)]: (0, data.mix's weights), then one entry per data.mix_phases
    entry, each starting from the weights before it."""
    names = part_names(data.mix)
    out = [(0, [p.weight for p in data.mix])]
    for phase in data.mix_phases:
        out.append((phase.at_step, [phase.weights.get(n, w) for n, w in zip(names, out[-1][1])]))
    return out


def _validate_phases(data, names: list[str]) -> None:
    steps = [p.at_step for p in data.mix_phases]
    if steps != sorted(set(steps)):
        raise ValueError(f"data.mix_phases at_step values must rise ({steps}); order the phases by step")
    for phase in data.mix_phases:
        unknown = sorted(set(phase.weights) - set(names))
        if unknown:
            raise ValueError(f"data.mix_phases at_step {phase.at_step} names {unknown[0]!r}, which is no data.mix source "
                             f"(names: {', '.join(names)})")
        if any(w < 0 for w in phase.weights.values()):
            raise ValueError(f"data.mix_phases at_step {phase.at_step}: weights must be >= 0 (0 leaves a source out)")
    for step, weights in phase_weights(data)[1:]:
        if not any(weights):
            raise ValueError(f"data.mix_phases at_step {step} leaves no source with a weight above 0")
        counts = block_counts(weights)
        small = [n for n, w, c in zip(names, weights, counts) if w > 0 and c == 0]
        if small:
            raise ValueError(f"data.mix_phases at_step {step}: the weight of {small[0]} is below 1/{BLOCK} of the total; raise it")


def validate_mix(data) -> None:
    """Config rules (config.py calls this when data.mix or data.mix_phases is set)."""
    if not data.mix:
        raise ValueError("data.mix_phases changes the weights of data.mix: set data.mix too")
    if data.source != "stdlib":
        raise ValueError("set data.source or data.mix, not both: data.mix's entries name their own sources "
                         "(--set data.source=stdlib clears a config file's data.source)")
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
    _validate_phases(data, names)
