"""Fork a pool of tokenisation workers that do not inherit the trainer's signal handlers.

The trainer traps SIGTERM/SIGUSR1/SIGINT (finish the step, checkpoint, exit) before it prepares data. A
forked worker would inherit those Python handlers, so the SIGTERM that `Pool.terminate()` sends on exit
would only set a flag there and the worker would block forever in its task queue (the parent hangs in
join). The signals are blocked while the workers are forked (one arriving meanwhile waits for the parent's
own handler); each worker restores the default actions before it unblocks them.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Any, Callable

_TRAPPED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _start_worker(initializer: Callable[..., None], initargs: tuple) -> None:
    for sig in _TRAPPED:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _TRAPPED)
    initializer(*initargs)


def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> Any:
    """A fork `multiprocessing.Pool` whose workers die on SIGTERM/SIGINT as plain processes do."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _TRAPPED)
    try:
        return mp.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
