"""Crash-safe DeepSpeed checkpoints: temp dir -> manifest (sha256 per file) -> rename -> `latest` last.

Layout under `<run.dir>/checkpoints/`:
    global_step100/   DeepSpeed's files (mp_rank_*, zero_pp_rank_*), rng_rank{r}.pt, manifest.json
    latest            text file naming the newest complete tag (replaced atomically)
A kill at any moment leaves either the previous `latest` or the new one, never a half-written tag
behind it: a tag without a valid manifest is ignored, and a tag whose files do not match their
manifest is skipped in favour of the previous good one.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from scaletrain.checkpoint_names import MANIFEST, TAG_RE
from scaletrain.durable import fsync_dir, remove_matching, write_text_atomic
from scaletrain.manifest import read_manifest, verify, write_manifest  # noqa: F401  (verify: this module's API too)
from scaletrain.tag_lock import READ_LOCK, lock_to_delete
from scaletrain.train import rng
from scaletrain.train.disk_space import check_before_save, num_params
from scaletrain.train.distributed import Dist, barrier, main_rank_does

FORMAT = 1  # layout version in every manifest; a newer one is refused on resume (resume.py)


def tag_name(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(m.group(1))


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


def find_resumable(root: Path, log=print, hold: Optional[Callable[[Path], bool]] = None) -> Optional[str]:
    """The newest tag whose files verify, preferring the one `latest` names; says what it skipped. `hold(tag_dir)`:
    called before a tag is verified (a reader's lock against pruning: hashing a large tag takes minutes); False
    skips the tag (pruned meanwhile)."""
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
        if hold is not None and not hold(root / tag):
            continue
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
        (tmp / READ_LOCK).touch()  # what readers of a live run lock against pruning (tag_lock.py); not in the manifest
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
        free, fd = lock_to_delete(root / tag)
        if not free:  # eval, export-hf, a child's init.from... is reading it: a later save removes it
            continue
        # out of the tag namespace in one rename: a kill mid-delete leaves no manifest-less global_stepN that
        # no later prune would count or remove (a rename that fails deletes in place, as before)
        doomed = root / f".del-{tag}-{secrets.token_hex(4)}"
        try:
            os.rename(root / tag, doomed)
        except OSError:
            doomed = root / tag
        finally:
            if fd is not None:
                os.close(fd)
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
    if engine.lr_scheduler is not None:  # ZeRO-1/2 load the optimizer after the scheduler, and with it the lr saved
        sched = engine.lr_scheduler      # then: a resume with another train.max_steps took its first step at that
        sched.load_state_dict(sched.state_dict())  # lr, not the schedule's (the log showed the schedule's)
    rng_file = root / tag / f"rng_rank{dist.rank}.pt"
    if rng_file.is_file():
        rng.restore(torch.load(rng_file, weights_only=True))
    return client
