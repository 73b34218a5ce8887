"""Readers of a checkpoint tag and the trainer that prunes it: `eval`, `export-hf`, `generate`, `grow` or a
child run's `init.from` may read a run's newest tag while that run is still training, and its next save prunes
the oldest tags -- mid-read, the reader's next file was gone ("damaged").

A reader holds a shared `flock` on the tag's `reading.lock` (an empty file every save writes into the tag) for
as long as it reads (the `ReadLock` object's life); `prune` takes an exclusive one without waiting, and a tag
someone is reading is left for a later save to remove. A regular file, not the directory: NFS shares locks
between machines only on files (a login node's `eval` against a run training on compute nodes). NFS turns
flock into POSIX locks, which any close of the same file in the process drops: nothing else opens
`reading.lock`, and readers take the lock after verifying the tag's files, not before. Tags written before
this file existed are locked through their directory (one host's readers only). Where the filesystem has no
locks at all, both sides go on without them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

READ_LOCK = "reading.lock"


class ReadLock:
    """A shared lock on one tag, released by `release()` or when the object is dropped."""

    def __init__(self, fd: int):
        self._fd: Optional[int] = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing the descriptor drops its flock)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _target(tag_dir: Path) -> tuple[Path, int]:
    f = tag_dir / READ_LOCK
    return (f, os.O_RDONLY) if f.is_file() else (tag_dir, os.O_RDONLY | os.O_DIRECTORY)


def read_lock(tag_dir: Path) -> Optional[ReadLock]:
    """Hold `tag_dir` against pruning; None when it is no longer there (pruned just before)."""
    path, flags = _target(tag_dir)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a prune holds its exclusive lock only for a rename
    except OSError:  # no locks on this filesystem
        return ReadLock(fd)
    try:
        still_there = os.stat(path).st_ino == os.fstat(fd).st_ino  # (a prune renames the tag away first)
    except OSError:
        still_there = False
    if not still_there:
        os.close(fd)
        return None
    return ReadLock(fd)


def lock_to_delete(tag_dir: Path) -> tuple[bool, Optional[int]]:
    """(may delete, descriptor to close after deleting): False while a reader holds the tag."""
    path, flags = _target(tag_dir)
    try:  # (an exclusive lock over NFS needs the file open for writing)
        fd = os.open(path, os.O_RDWR if flags == os.O_RDONLY else flags)
    except OSError:
        try:
            fd = os.open(path, flags)
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
