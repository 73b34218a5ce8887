"""manifest.json: the sha256 and size of a directory's files, written last, checked before the files are trusted.

Training checkpoints list every file of their tag (a tag without a manifest is an incomplete save). The
checkpoint dirs `grow` and `import-hf` write list their weights and optimizer state, the files that would
otherwise be read silently when damaged (a flipped bit in a safetensors file loads without complaint).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from scaletrain import __version__
from scaletrain.checkpoint_names import MANIFEST
from scaletrain.durable import write_text_atomic


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def in_parallel(fn, items: list) -> list:
    """fn over items on threads (hashlib and file reads release the GIL): a tag's rank files are hashed at once,
    where one after another left every rank waiting on rank 0 for seconds per GB at each save and start."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def write_manifest(d: Path, meta: dict, include: Callable[[Path], bool] = lambda rel: True) -> None:
    """fsync and hash the files of `d` (those whose relative path `include` accepts), then write the manifest."""
    def entry(p: Path) -> dict:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        return {"sha256": sha256_file(p), "bytes": p.stat().st_size}

    paths = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST and include(p.relative_to(d))]
    files = {str(p.relative_to(d)): e for p, e in zip(paths, in_parallel(entry, paths))}
    body = {**meta, "files": files, "scaletrain_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_text_atomic(d / MANIFEST, json.dumps(body, indent=1))


def read_manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


# dir -> stat signature of its manifest and files when they last verified. One start opens init.from several
# times (config check, rank 0's pin, weights, lineage): a big checkpoint is hashed once per process, not each time.
_VERIFIED: dict[Path, tuple] = {}


def _signature(paths: list[Path]) -> tuple:
    stats = [(p, p.stat()) for p in paths]
    return tuple((str(p), st.st_size, st.st_mtime_ns, st.st_ino) for p, st in stats)


def verify(d: Path) -> Optional[str]:
    """None when every file the manifest lists matches it, else a one-line reason."""
    mpath = d / MANIFEST
    if not mpath.is_file():
        return f"{d.name} has no {MANIFEST} (incomplete save)"
    try:
        files = read_manifest(d)["files"]
        entries = [(str(rel), int(info["bytes"]), str(info["sha256"])) for rel, info in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # (JSON, Unicode errors: ValueErrors)
        return f"{mpath} is not a valid manifest"
    outside = next((rel for rel, _, _ in entries if Path(rel).is_absolute() or ".." in Path(rel).parts), None)
    if outside is not None:  # a crafted manifest must not make us read (and vouch for) files elsewhere
        return f"{mpath} is not a valid manifest (it lists {outside!r}, outside its checkpoint)"
    missing = next((d / rel for rel, _, _ in entries if not (d / rel).is_file()), None)
    if missing is not None:
        return f"{missing} is missing"
    try:
        key, signature = d.resolve(), _signature([mpath, *(d / rel for rel, _, _ in entries)])
    except OSError as e:
        return f"{d} cannot be read ({e.strerror or e})"
    if _VERIFIED.get(key) == signature:  # nothing was rewritten, replaced or resized since it verified
        return None
    started = time.time_ns()
    total = sum(size for _, size, _ in entries)
    # minutes for a large model's tag (Adam moments included): a bar on a terminal, from one process only
    quiet = total < 1 << 30 or os.environ.get("RANK", "0") != "0"
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {d.name}", leave=False,
              disable=True if quiet else None) as bar:
        def problem(entry: tuple[str, int, str]) -> Optional[str]:
            rel, size, digest = entry
            p = d / rel
            try:
                if p.stat().st_size != size or sha256_file(p) != digest:
                    return f"{p} does not match its sha256 in the manifest (corrupted or tampered)"
            except OSError as e:  # an unreadable file (EIO, EACCES), or a tag a live run just pruned
                return f"{p} cannot be read ({e.strerror or e})"
            bar.update(size)
            return None

        first = next((reason for reason in in_parallel(problem, entries) if reason), None)
        if first is not None:  # (the first in manifest order, whichever thread found it first)
            return first
    # remembered only when every file is older than a second: a rewrite within the file system's timestamp
    # granularity could otherwise keep the same size and mtime ("racy git")
    if max(mtime for _, _, mtime, _ in signature) < started - 1_000_000_000:
        _VERIFIED[key] = signature
    return None
