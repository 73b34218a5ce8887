"""The train/val split, decided per document by its content alone: independent of file order, worker count
and machine, the same for plain text, prompt/completion examples and classification rows."""

from __future__ import annotations

import hashlib


def split_key(text: str) -> float:
    """Uniform in [0, 1) from the content hash."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def is_val(text: str, val_fraction: float) -> bool:
    return split_key(text) < val_fraction
