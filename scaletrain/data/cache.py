"""The data cache of a config, whichever kind: one data.source's (prepare.py) or a data.mix's (mixture.py).
What code outside scaletrain/data/ calls to find, open or build the tokens it trains and evaluates on."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from scaletrain.data import mixture, prepare
from scaletrain.data.prepare import DataCache


def find_cache(cfg) -> Path:
    """The cache dir `cfg.data` tokenises into."""
    return mixture.find_mixture(cfg) if cfg.data.mix else prepare.find_cache(cfg)[0]


def open_cache(path: Path) -> Optional[DataCache]:
    """The cache in `path` (a mixture's opens its parts); None when none was built there."""
    meta = prepare.read_meta(path)
    if meta is None:
        return None
    return mixture.open_mixture(path, meta) if "mixture" in meta else prepare.open_cache(path, meta)


def prepare_data(cfg, progress: bool = True) -> DataCache:
    """Build (or reuse) the cache of `cfg.data`."""
    return mixture.prepare_mixture(cfg, progress) if cfg.data.mix else prepare.prepare_data(cfg, progress)
