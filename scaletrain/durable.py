"""Writes that survive a crash: whole or not at all, and on the disk (not only in the page cache) before they
count. Temp names are unique per writer (host, pid and a random part): two jobs sharing a directory over
NFS can have the same pid, and a writer must never delete another one's half-written temp.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` and every directory, `root` included (before renaming it into place)."""
    for p in sorted(Path(root).rglob("*"), reverse=True):  # files before the dirs that list them
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(Path(root))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir to `final`, everything in it on the disk first and the rename after
    (OSError from the rename is the caller's: `final` appeared meanwhile, say)."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_matching(root: Path, patterns: tuple[str, ...]) -> None:
    """Delete what the glob `patterns` match under `root`, files and directories alike (the leftovers of writes a
    kill interrupted; only for names no live writer can be using)."""
    for pattern in patterns:
        for p in Path(root).glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def missing_levels(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, innermost first: what creating `path` makes."""
    return [p for p in (Path(path), *Path(path).parents) if not p.exists()]


def remove_levels(levels: list[Path]) -> None:
    """Undo `missing_levels` after a failed attempt: innermost first, a file unlinked, a directory removed while
    empty; the first level that holds something else stays, with those above it."""
    for p in levels:
        try:
            p.rmdir() if p.is_dir() else p.unlink()
        except OSError:
            break


def abandoned_temps(final: Path, quiet_s: float = 3600) -> list[Path]:
    """Temps of `final` that a killed writer left: written from this host (the name's host part equal to ours, not
    a prefix of it) by a pid no longer alive, and untouched for `quiet_s` (containers that share a hostname have
    pids of their own: a live writer elsewhere looks dead here, but keeps writing). A pid reused since only keeps
    a leftover longer; live work is never deleted."""
    host, found = socket.gethostname(), []
    for p in final.parent.glob(f"{glob.escape(f'.{final.name}.tmp-')}*"):
        writer, _, pid = p.name[len(f".{final.name}.tmp-"):].rpartition("-")[0].rpartition("-")
        if writer == host and pid.isdigit() and not pid_alive(int(pid)) and _quiet_for(p, quiet_s):
            found.append(p)
    return found


def _quiet_for(path: Path, seconds: float) -> bool:
    """Nothing under `path` (itself included) was modified in the last `seconds`."""
    import time

    try:
        newest = max([path.stat().st_mtime] + [q.stat().st_mtime for q in path.rglob("*")])
    except OSError:  # removed meanwhile
        return False
    return time.time() - newest > seconds


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs here: a zombie (exited, not yet reaped by its parent) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel, which counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            pass
        return True


def temp_dir_beside(final: Path) -> Path:
    """A new, empty hidden directory next to `final`, named for this writer only (mode from the umask, as
    the final directory should have: not tempfile's 0700)."""
    tmp = _temp_name(final)
    tmp.mkdir(parents=True)  # parents: a failing build elsewhere may have just removed an empty cache dir
    return tmp


def _write_synced_temp(path: Path, text: str) -> Path:
    """`text` in a new temp file beside `path`, on disk before it is given its name."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _write_synced_temp(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_new(path: Path, text: str) -> None:
    """Like write_text_atomic, but never replaces a file: FileExistsError if `path` exists by the time the text
    is on disk (os.link fails where rename would overwrite)."""
    tmp = _write_synced_temp(path, text)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create it exclusively, not atomically
            with open(path, "x") as f:
                try:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    path.unlink(missing_ok=True)  # not a truncated result that the next run would refuse to replace
                    raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
