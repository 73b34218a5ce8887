"""Stop requests: SIGUSR1 (SLURM's warning before preemption), SIGTERM (scancel, a node drain) and Ctrl-C."""

from __future__ import annotations

import signal

from scaletrain.train.distributed import launcher_rank


class StopFlag:
    """Set by SIGUSR1/SIGTERM/Ctrl-C; read at step boundaries (a handler must not checkpoint mid-collective).
    A second Ctrl-C aborts at once (KeyboardInterrupt), as usual; the newest checkpoint stays resumable.
    (The `deepspeed` launcher also turns a Ctrl-C into SIGTERM for every rank and waits 30 s for them.)"""

    def __init__(self):
        self.requested, self.interrupted = False, False
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT:
            if self.interrupted:  # the second Ctrl-C (the launcher's SIGTERM after the first does not count)
                raise KeyboardInterrupt
            self.interrupted = True
            if launcher_rank() == 0:
                print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort now)", flush=True)
        self.requested = True
