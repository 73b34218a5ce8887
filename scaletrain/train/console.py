"""A rank's stdout and stderr outliving their reader.

Ranks a multi-node launcher starts over ssh print through that ssh connection. When the job is cancelled, the
launcher, pdsh and ssh on the first node die first and the connection closes; the ranks are asked to checkpoint
and stop (our stop flag) but their next log line raised BrokenPipeError, killing rank 0 between steps, or in
the middle of a save while the others waited in a collective. Console output is the one thing a rank can lose:
once its reader is gone, writes are dropped and training (or the stop) goes on. The same while the disk under
a log file is full.
"""

from __future__ import annotations

import errno
import sys

_LOST = (errno.EPIPE, errno.ECONNRESET, errno.EIO)  # reader gone; EIO: a hung-up terminal
# A full disk under a log file (SLURM writes the job's output into run.dir, beside the checkpoints): the lines
# are dropped while it lasts, and written again once there is space.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class _Survivor:
    """Wraps a text stream: write/flush drop their output once the stream's reader has gone."""

    def __init__(self, stream):
        self._stream, self.lost = stream, False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._failed(e)
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError as e:
                self._failed(e)

    def _failed(self, e: OSError) -> None:
        if e.errno in _LOST:
            self.lost = True
        elif e.errno not in _FULL:
            raise e

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self._stream, name)


def survive_lost_console() -> None:
    """Make this process's sys.stdout and sys.stderr drop output instead of raising once their reader is gone."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Survivor):
            setattr(sys, name, _Survivor(stream))
