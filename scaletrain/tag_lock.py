"""Readers of a checkpoint tag and the trainer that prunes it, on one filesystem: `eval`, `export-hf`,
`generate`, `grow` or a child run's `init.from` may read a run's newest tag while that run is still training,
and its next save prunes the oldest tags -- mid-read, the reader's next file was gone ("damaged").

A reader holds a shared `flock` on the tag directory for as long as it reads (the `ReadLock` object's life);
`prune` takes an exclusive one without waiting, and a tag someone is reading is left for a later save to
remove. Where the filesystem has no locks (some network mounts) both sides go on without them, as before.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


class ReadLock:
    """A shared lock on one tag dir, released by `release()` or when the object is dropped."""

    def __init__(self, fd: int):
        self._fd: Optional[int] = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing the descriptor drops its flock)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def read_lock(tag_dir: Path) -> Optional[ReadLock]:
    """Hold `tag_dir` against pruning; None when it is no longer there (pruned just before)."""
    try:
        fd = os.open(tag_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a prune holds its exclusive lock only for a rename
    except OSError:  # no locks on this filesystem
        return ReadLock(fd)
    try:
        still_there = os.stat(tag_dir).st_ino == os.fstat(fd).st_ino  # (a prune renames the tag away first)
    except OSError:
        still_there = False
    if not still_there:
        os.close(fd)
        return None
    return ReadLock(fd)


def lock_to_delete(tag_dir: Path) -> tuple[bool, Optional[int]]:
    """(may delete, descriptor to close after deleting): False while a reader holds the tag."""
    try:
        fd = os.open(tag_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    except OSError:  # no locks on this filesystem
        pass
    return True, fd
