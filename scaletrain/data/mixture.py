"""A data mixture: several sources, each tokenised into its own cache with one shared tokenizer, drawn in fixed
proportions (`data.mix: [{source, weight, name}]` instead of `data.source`).

    <data.cache_dir>/mix-<fingerprint>/   meta.json (the parts: name, source, weight, their cache dirs), the
                                          shared tokenizer; each part is an ordinary cache beside it (prepare.py)

Sampling keeps the one-integer data position of `sampler.py`: global sample g lies in block g // BLOCK, and
each block of BLOCK samples holds exactly `counts[s]` windows of source s (the weights rounded to 1/BLOCK) at
positions shuffled by (seed, block). Sample g is then the k-th window source s gives, k = counts[s] * block +
its draws earlier in the block, taken from that source's own shuffled, epoch-cycling stream. So any sample's
window follows from g alone: the same batches for any world size, exact resume, and a small source is simply
repeated (more epochs) when its weight asks for more windows than it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from scaletrain.data.hf_tokenizer import copy_tokenizer_dir
from scaletrain.data.mix_rules import BLOCK, block_counts, part_names
from scaletrain.data.prepare import (CACHE_FORMAT, TOKENIZER_SAMPLE_SEED, DataCache, open_cache, open_or_build,
                                     prepare_data, sweep_abandoned, tokenizer_digest, tokenizer_key)
from scaletrain.data.sources import iter_documents, resolve_source
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from scaletrain.durable import publish_dir, temp_dir_beside
from scaletrain.errors import UserError


def find_mixture(cfg) -> Path:
    """The mixture's cache dir: named after every part's files, weights and names, and the tokenizer settings."""
    d = cfg.data
    key = {"format": CACHE_FORMAT, "vocab_size": cfg.model.vocab_size, "tokenizer": tokenizer_key(d.tokenizer),
           "val_fraction": d.val_fraction, "sample_lines": d.tokenizer_sample_lines,
           "parts": [[resolve_part(p, d.text_field).fingerprint(), p.weight, name]
                     for p, name in zip(d.mix, part_names(d.mix))]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(d.cache_dir)) / f"mix-{digest}"


def _part_config(cfg, source: str, tokenizer: Path):
    part = cfg.model_copy(deep=True)
    part.data.mix = []
    part.data.source, part.data.tokenizer = source, str(tokenizer)
    return part


def resolve_part(part, text_field: str):
    """The part's Source; its errors name the data.mix entry (they say data.source for a single source)."""
    try:
        return resolve_source(part.source, text_field)
    except UserError as e:
        raise UserError(str(e).replace("data.source '", "data.mix source '", 1)) from None


def _trained_tokenizer(cfg, progress: bool) -> Path:
    """One tokenizer for the mixture's sources, trained on a line sample of all of them, once per set of sources:
    `<data.cache_dir>/mixtok-<key>/tokenizer.model`. The order of the list, the weights and the names do not
    change it (a reordered list would otherwise sample other lines, train another tokenizer and re-tokenise
    every source; new weights would read every source again)."""
    d = cfg.data
    sources = {}
    for p in d.mix:  # (a source named twice is sampled once)
        src = resolve_part(p, d.text_field)
        sources.setdefault(src.fingerprint(), src)
    key = {"format": CACHE_FORMAT, "sources": sorted(sources), "vocab_size": cfg.model.vocab_size,
           "sample_lines": d.tokenizer_sample_lines, "text_field": d.text_field}
    final = Path(os.path.expanduser(d.cache_dir)) / f"mixtok-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    if (final / "tokenizer.model").is_file():
        return final / "tokenizer.model"
    sweep_abandoned(final)
    if progress:
        print(f"data.mix: training one tokenizer on a sample of the lines of all {len(sources)} sources", flush=True)
    tmp = temp_dir_beside(final)
    try:
        docs = (text for fp in sorted(sources) for _, text in iter_documents(sources[fp]))
        train_tokenizer(docs, cfg.model.vocab_size, tmp / "tokenizer.model", d.tokenizer_sample_lines, seed=TOKENIZER_SAMPLE_SEED)
        try:
            publish_dir(tmp, final)
        except OSError:  # another process trained the same one first: keep theirs
            if not (final / "tokenizer.model").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "tokenizer.model"


def _shared_tokenizer(cfg, progress: bool) -> Path:
    """data.tokenizer (checked), else the mixture's trained one."""
    if not cfg.data.tokenizer:
        return _trained_tokenizer(cfg, progress)
    given = Path(os.path.expanduser(cfg.data.tokenizer))
    load_tokenizer(given) if given.is_dir() else Tokenizer(given)  # a bad one's error names it, not a copy
    return given


def _copy_tokenizer(tokenizer: Path, out: Path) -> Path:
    if tokenizer.is_dir():
        copy_tokenizer_dir(tokenizer, out / "tokenizer")
        return out / "tokenizer"
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out / "tokenizer.model"


def prepare_mixture(cfg, progress: bool = True) -> "MixtureCache":
    """Build (or reuse) every part's cache and the mixture's own dir; the dir appears only once all parts exist."""
    def build(tmp: Path) -> dict:  # the parts' caches (each published on its own), then the mixture's meta
        tokenizer = _copy_tokenizer(_shared_tokenizer(cfg, progress), tmp)
        parts, infos = [], []
        for p, name in zip(cfg.data.mix, part_names(cfg.data.mix)):
            if progress:
                print(f"data.mix: {name} ({p.source})", flush=True)
            part = prepare_data(_part_config(cfg, p.source, tokenizer), progress)
            parts.append(part)
            infos.append({"name": name, "source": p.source, "weight": p.weight, "cache": part.dir.name})
        first = parts[0].meta
        return {"mixture": infos, "format": CACHE_FORMAT, "data_format": "text", "vocab_size": cfg.model.vocab_size,
                "tokenizer_vocab": first["tokenizer_vocab"], "eos_id": first["eos_id"], "dtype": first["dtype"],
                "tokenizer_sha256": tokenizer_digest(tokenizer),
                "docs": {k: sum(c.meta["docs"][k] for c in parts) for k in ("train", "val")},
                "tokens": {k: sum(c.meta["tokens"][k] for c in parts) for k in ("train", "val")}}

    return open_or_build(find_mixture(cfg), open_mixture, build)


def open_mixture(path: Path, meta: dict) -> "MixtureCache":
    """The mixture whose meta.json `open_cache` has read; its parts must all be there."""
    parts = []
    for info in meta["mixture"]:
        part = open_cache(path.parent / info["cache"])
        if part is None:
            raise UserError(f"data cache {path} names part {info['name']} in {path.parent / info['cache']}, which is "
                            "missing; delete the mixture's directory to rebuild it")
        parts.append(part)
    return MixtureCache(path, meta, parts)


@dataclass
class MixtureCache(DataCache):
    """The mixture's dir (meta.json, the shared tokenizer) and its parts' caches."""
    parts: list = field(default_factory=list)

    def tokens(self, split: str) -> np.ndarray:
        return np.concatenate([np.asarray(p.tokens(split)) for p in self.parts])

    def stream(self, split: str, seq_len: int, seed: int, required: bool = True,
               phases: Optional[list[tuple[int, list[float]]]] = None) -> Optional["MixtureStream"]:
        """Train: every part must hold a window. Val: the parts that do (a part without is left out of val), in
        data.mix's weights. `phases`: see MixtureStream (train only)."""
        parts = []
        for i, (info, cache) in enumerate(zip(self.meta["mixture"], self.parts)):
            s = cache.stream(split, seq_len, seed + i, required=False)  # each part its own shuffle
            if s is None and required:
                raise UserError(f"data.mix source {info['name']} ({info['source']}) has {len(cache.tokens(split)):,} "
                                f"{split} tokens, fewer than train.seq_len+1 = {seq_len + 1}; lower train.seq_len or add data")
            if s is not None:
                parts.append((info["name"], info["weight"], s))
        if phases is not None and len(parts) != len(self.parts):
            raise ValueError("phases need every part")
        return MixtureStream(parts, seed, phases) if parts else None


class MixtureStream:
    """The window-stream interface of `sampler.WindowStream` over several parts. A window id is the part's
    offset (the windows of the parts before it) plus the part's own window id.

    `phases`: [(first sample, weight of each part)], the first at sample 0 (data.mix_phases, in samples). A phase
    lays out its own blocks from its first sample, and each part's draws carry on from where the phases before
    it left them: no window of a part is skipped or drawn twice at a boundary."""

    def __init__(self, parts: list[tuple[str, float, object]], seed: int,
                 phases: Optional[list[tuple[int, list[float]]]] = None):
        self.parts = parts  # (name, weight, stream)
        self.seed = seed
        phases = phases or [(0, [w for _, w, _ in parts])]
        self.starts = np.asarray([start for start, _ in phases], dtype=np.int64)
        self.counts = np.asarray([block_counts(w) for _, w in phases], dtype=np.int64)  # [phase, part]
        sizes = [s.num_windows for _, _, s in parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_windows = int(self.offsets[-1])
        self._key, self._source, self._draw = None, None, None
        self.drawn_before = np.zeros_like(self.counts)  # [phase, part]: the part's windows drawn by earlier phases
        for p in range(1, len(phases)):
            length = int(self.starts[p] - self.starts[p - 1])
            full, rest = divmod(length, BLOCK)
            source, _ = self._layout(p - 1, full)
            self.drawn_before[p] = self.drawn_before[p - 1] + full * self.counts[p - 1] + \
                np.bincount(source[:rest], minlength=len(parts))

    def fit_note(self) -> Optional[str]:
        return None

    def _layout(self, phase: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of a phase's block, how many of its source's windows come before it there)."""
        if (phase, block) != self._key:
            counts = self.counts[phase]
            seed = [self.seed, block, 0x6D6978] if phase == 0 else [self.seed, phase, block, 0x6D6978]
            source = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(self.parts)), counts))
            draw = np.empty(BLOCK, dtype=np.int64)
            for s in range(len(self.parts)):
                draw[source == s] = np.arange(counts[s])
            self._key, self._source, self._draw = (phase, block), source, draw
        return self._source, self._draw

    def window_ids(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            g = start + i
            phase = int(np.searchsorted(self.starts, g, side="right")) - 1
            block, pos = divmod(g - int(self.starts[phase]), BLOCK)
            source, draw = self._layout(phase, block)
            s = int(source[pos])
            k = int(self.drawn_before[phase, s]) + block * int(self.counts[phase, s]) + int(draw[pos])
            out[i] = self.offsets[s] + self.parts[s][2].window_ids(k, 1)[0]
        return out

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(window_ids, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        rows: list = [None] * len(ids)
        for s in np.unique(which):
            at = np.nonzero(which == s)[0]
            x, y = self.parts[s][2].batch(ids[at] - self.offsets[s])
            for j, r in enumerate(at):
                rows[r] = (x[j], y[j])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
