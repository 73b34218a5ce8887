"""Readers of a checkpoint tag and the trainer that prunes it: `eval`, `export-hf`, `generate`, `grow` or a
child run's `init.from` may read a run's newest tag while that run is still training, and its next save prunes
the oldest tags -- mid-read, the reader's next file was gone ("damaged").

A reader holds a shared `flock` on the tag's `reading.lock` (an empty file every save writes into the tag) for
as long as it reads (the `ReadLock` object's life); `prune` takes an exclusive one without waiting, and a tag
someone is reading is left for a later save to remove. A regular file, not the directory: NFS shares locks
between machines only on files (a login node's `eval` against a run training on compute nodes). NFS turns
flock into POSIX locks, which any close of the same file in the process drops: `reading.lock` is in no manifest
(verification never opens it) and a process opens it once however many readers it has. Tags written before
this file existed are locked through their directory (one host's readers only). Where the filesystem has no
locks at all, both sides go on without them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

READ_LOCK = "reading.lock"


_HELD: dict[tuple[int, int], list[int]] = {}  # (st_dev, st_ino) -> [descriptor, holders] of this process


class ReadLock:
    """A shared lock on one tag, released by `release()` or when the object is dropped. A process opens each
    lock file once however many readers it has (a child's init.from pins, loads and records one tag): under
    NFS's POSIX locks, closing a second descriptor of the file would drop the first one's lock too."""

    def __init__(self, key: tuple[int, int]):
        self._key: Optional[tuple[int, int]] = key

    def release(self) -> None:
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # (closing the descriptor drops its flock)

    def __del__(self) -> None:
        self.release()


def _target(tag_dir: Path) -> tuple[Path, int]:
    f = tag_dir / READ_LOCK
    return (f, os.O_RDONLY) if f.is_file() else (tag_dir, os.O_RDONLY | os.O_DIRECTORY)


def read_lock(tag_dir: Path) -> Optional[ReadLock]:
    """Hold `tag_dir` against pruning; None when it is no longer there (pruned just before)."""
    path, flags = _target(tag_dir)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    if key in _HELD:  # this process holds it already
        _HELD[key][1] += 1
        return ReadLock(key)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a prune holds its exclusive lock only for a rename
        st = os.stat(path)  # (a prune renames the tag away first)
        still_there = (st.st_dev, st.st_ino) == key and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == key
    except OSError as e:
        still_there = e.filename is None  # flock unsupported here (no filename): go on unlocked; stat failed: gone
    if not still_there:
        os.close(fd)
        return None
    _HELD[key] = [fd, 1]
    return ReadLock(key)


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
