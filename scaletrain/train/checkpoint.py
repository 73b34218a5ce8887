"""Crash-safe DeepSpeed checkpoints: temp dir -> manifest (sha256 per file) -> rename -> `latest` last.

Layout under `<run.dir>/checkpoints/`:
    global_step100/   DeepSpeed's files (mp_rank_*, zero_pp_rank_*), rng_rank{r}.pt, manifest.json
    latest            text file naming the newest complete tag (replaced atomically)
A kill at any moment leaves either the previous `latest` or the new one, never a half-written tag
behind it: a tag without a valid manifest is ignored, and a tag whose files do not match their
manifest is skipped in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from scaletrain import __version__
from scaletrain.checkpoint_names import MANIFEST, TAG_RE
from scaletrain.durable import fsync_dir, remove_matching, write_text_atomic
from scaletrain.train import rng
from scaletrain.train.disk_space import check_before_save, num_params
from scaletrain.train.distributed import Dist, barrier, main_rank_does

FORMAT = 1  # layout version in every manifest; a newer one is refused on resume (resume.py)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _in_parallel(fn, items: list) -> list:
    """fn over items on threads (hashlib and file reads release the GIL): a tag's rank files are hashed at once,
    where one after another left every rank waiting on rank 0 for seconds per GB at each save and start."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def tag_name(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(m.group(1))


def write_manifest(tag_dir: Path, meta: dict) -> None:
    def entry(p: Path) -> dict:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        return {"sha256": _sha256(p), "bytes": p.stat().st_size}

    paths = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {str(p.relative_to(tag_dir)): e for p, e in zip(paths, _in_parallel(entry, paths))}
    body = {**meta, "files": files, "scaletrain_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_text_atomic(tag_dir / MANIFEST, json.dumps(body, indent=1))


# tag dir -> stat signature of its manifest and files when they last verified. One start opens init.from several
# times (config check, rank 0's pin, weights, lineage): a big checkpoint is hashed once per process, not each time.
_VERIFIED: dict[Path, tuple] = {}


def _signature(paths: list[Path]) -> tuple:
    stats = [(p, p.stat()) for p in paths]
    return tuple((str(p), st.st_size, st.st_mtime_ns, st.st_ino) for p, st in stats)


def verify(tag_dir: Path) -> Optional[str]:
    """None when every file matches the manifest, else a one-line reason."""
    mpath = tag_dir / MANIFEST
    if not mpath.is_file():
        return f"{tag_dir.name} has no {MANIFEST} (incomplete save)"
    try:
        files = json.loads(mpath.read_text())["files"]
        entries = [(str(rel), int(info["bytes"]), str(info["sha256"])) for rel, info in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # (JSON, Unicode errors: ValueErrors)
        return f"{mpath} is not a valid manifest"
    outside = next((rel for rel, _, _ in entries if Path(rel).is_absolute() or ".." in Path(rel).parts), None)
    if outside is not None:  # a crafted manifest must not make us read (and vouch for) files elsewhere
        return f"{mpath} is not a valid manifest (it lists {outside!r}, outside its checkpoint)"
    missing = next((tag_dir / rel for rel, _, _ in entries if not (tag_dir / rel).is_file()), None)
    if missing is not None:
        return f"{missing} is missing"
    try:
        key, signature = tag_dir.resolve(), _signature([mpath, *(tag_dir / rel for rel, _, _ in entries)])
    except OSError as e:
        return f"{tag_dir} cannot be read ({e.strerror or e})"
    if _VERIFIED.get(key) == signature:  # nothing was rewritten, replaced or resized since it verified
        return None
    started = time.time_ns()
    total = sum(size for _, size, _ in entries)
    # minutes for a large model's tag (Adam moments included): a bar on a terminal, from one process only
    quiet = total < 1 << 30 or os.environ.get("RANK", "0") != "0"
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {tag_dir.name}", leave=False,
              disable=True if quiet else None) as bar:
        def problem(entry: tuple[str, int, str]) -> Optional[str]:
            rel, size, digest = entry
            p = tag_dir / rel
            try:
                if p.stat().st_size != size or _sha256(p) != digest:
                    return f"{p} does not match its sha256 in the manifest (corrupted or tampered)"
            except OSError as e:  # an unreadable file (EIO, EACCES), or a tag a live run just pruned
                return f"{p} cannot be read ({e.strerror or e})"
            bar.update(size)
            return None

        first = next((reason for reason in _in_parallel(problem, entries) if reason), None)
        if first is not None:  # (the first in manifest order, whichever thread found it first)
            return first
    # remembered only when every file is older than a second: a rewrite within the file system's timestamp
    # granularity could otherwise keep the same size and mtime ("racy git")
    if max(mtime for _, _, mtime, _ in signature) < started - 1_000_000_000:
        _VERIFIED[key] = signature
    return None


def tags_by_step(root: Path) -> list[tuple[int, str]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found, reverse=True)


def previous_checkpoint_bytes(root: Path) -> Optional[tuple[str, int, Optional[int]]]:
    """(tag, bytes, parameters) of the newest checkpoint that has a manifest, or None: what the next one's size
    is estimated from (parameters: None in manifests written before they recorded it)."""
    for _, tag in tags_by_step(root):
        try:
            manifest = read_manifest(root / tag)
            params = manifest.get("params")
            return tag, sum(int(f["bytes"]) for f in manifest["files"].values()), \
                (int(params) if isinstance(params, int) else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


def find_resumable(root: Path, log=print) -> Optional[str]:
    """The newest tag whose files verify, preferring the one `latest` names; says what it skipped."""
    candidates = [tag for _, tag in tags_by_step(root)]
    latest = root / "latest"
    try:
        named = latest.read_text(errors="replace").strip()  # a garbled `latest` names no tag: the newest wins
    except OSError:  # none yet, or unreadable: the newest tag that verifies
        named = None
    if named is not None:
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for tag in candidates:
        problem = verify(root / tag)
        if problem is None:
            return tag
        log(f"warning: skipping checkpoint {tag}: {problem}; falling back to an earlier one")
    return None


def save(engine, root: Path, step: int, client_state: dict, dist: Dist, keep_last: int, meta: dict,
         keep_every: int = 0, log=print, extra_files: Optional[dict[str, str]] = None,
         keep_steps: tuple[int, ...] = ()) -> Optional[Path]:
    """Collective: every rank must call it. Returns the final tag dir, or None when the disk is too full to
    hold another checkpoint (then nothing is written, the previous checkpoints stay, training goes on).
    `extra_files` (name -> text, main rank) are written into the tag before its manifest lists them;
    `keep_steps` are never pruned (growth boundaries: the parents in a grown run's family tree)."""
    from scaletrain.train.distributed import any_rank

    tag = tag_name(step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    # what a killed save or prune left must not count as used space in the check below (rank 0 alone, the
    # others waiting outside any collective: deleting a large dead save can take minutes on a network file system)
    main_rank_does(lambda: remove_leftovers(root))
    problem = check_before_save(engine, root, step, previous_checkpoint_bytes(root))  # every rank: node-local disks too
    if any_rank(problem is not None):
        if problem is not None:  # the rank that found it says so (another node's disk may be the full one)
            (log if dist.is_main else print)(f"warning: checkpoint {tag} NOT saved: {problem}")
        return None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of this same step
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
    torch.save(rng.capture(), tmp / f"rng_rank{dist.rank}.pt")
    barrier()

    def finish() -> None:  # rank 0 hashes every file of the tag (minutes for a large model) while the others wait
        for name, text in (extra_files or {}).items():
            write_text_atomic(tmp / name, text)
        write_manifest(tmp, {"format": FORMAT, "step": step, "world_size": dist.world, "params": num_params(engine.module),
                             "global_batch": client_state.get("global_batch"), **meta})
        old = root / f".old-{tag}"
        if final.exists():  # an older save of the same step (e.g. re-run after a crash): move it aside in one
            shutil.rmtree(old, ignore_errors=True)  # rename, so a kill never leaves a half-deleted tag dir
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        write_text_atomic(root / "latest", tag)
        prune(root, keep_last, keep_every, protect=tag, keep_steps=keep_steps)

    main_rank_does(finish)
    return final


def prune(root: Path, keep_last: int, keep_every: int = 0, protect: Optional[str] = None,
          keep_steps: tuple[int, ...] = ()) -> None:
    """Delete all but the newest `keep_last` complete tags (and stale temp dirs); milestones (steps that are
    multiples of `keep_every`), `keep_steps` and `protect` (the tag just written) stay.
    Tags newer than `protect` belong to a timeline this run abandoned (it resumed from an older tag because they
    failed to verify, or `latest` never reached them): they neither count towards `keep_last` — a damaged newer
    tag would otherwise push out the good one the run resumed from — nor are deleted; the run replaces each
    when it reaches that step."""
    newest = int(TAG_RE.match(protect).group(1)) if protect and TAG_RE.match(protect) else None
    complete = [(s, t) for s, t in tags_by_step(root)
                if (root / t / MANIFEST).is_file() and (newest is None or s <= newest)]
    for step, tag in complete[keep_last:]:
        if (keep_every and step % keep_every == 0) or step in keep_steps or tag == protect:
            continue
        # out of the tag namespace in one rename: a kill mid-delete leaves no manifest-less global_stepN that
        # no later prune would count or remove (a rename that fails deletes in place, as before)
        doomed = root / f".del-{tag}-{secrets.token_hex(4)}"
        try:
            os.rename(root / tag, doomed)
        except OSError:
            doomed = root / tag
        shutil.rmtree(doomed, ignore_errors=True)
    remove_leftovers(root)


def remove_leftovers(root: Path) -> None:
    """Temp dirs and files of saves, prunes and atomic writes that a kill interrupted."""
    remove_matching(root, (".tmp-global_step*", ".old-global_step*", ".del-global_step*", ".latest.tmp-*"))


def load(engine, root: Path, tag: str, dist: Dist) -> dict:
    """Load model/optimizer/scheduler into the engine; returns our client state."""
    from scaletrain.train.safe_load import restrict_engine_loads

    restrict_engine_loads(engine)  # DeepSpeed unpickles with weights_only=False; ours allows only its own types
    path, client = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    rng_file = root / tag / f"rng_rank{dist.rank}.pt"
    if rng_file.is_file():
        rng.restore(torch.load(rng_file, weights_only=True))
    return client
