#!/usr/bin/env python
"""Start N ranks of a training script on this machine as `deepspeed --num_gpus N` does, without its cost.

The `deepspeed` launcher is two Python start-ups (its runner, then `deepspeed.launcher.launch`) that each
import torch, plus a 1 s polling loop at exit: ~7 s of every multi-rank run on a 2-core machine, most of a
test's short run. This one takes ~0.05 s and keeps the launcher's contract: each rank gets RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT and `--local_rank=r`; a rank that fails takes the others down
(SIGTERM, then SIGKILL) and its exit code is the launcher's; SIGINT/SIGTERM to the launcher become SIGTERM for
every rank (exit code 1), as there. Unlike there, nothing a rank started outlives the launcher: a rank killed
while its compiler ran (the first CPU-kernel build) left ninja and cc1plus compiling for a minute after.
The test suite and scripts/crash_test.py start their ranks with it; the README quick-start test, the
preemption test and the cluster tests run the real `deepspeed` launcher.

    python scripts/local_ranks.py N launch/train.py --config configs/tiny.yaml [--set ...]
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 30  # as DeepSpeed's launcher: SIGTERM, then SIGKILL whatever is left after this long


def free_port() -> int:  # scaletrain.train.distributed has one too; importing it would import torch (~2 s)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adopt_orphans() -> None:
    """Linux: processes the ranks started and left behind (their rank died) become this launcher's children,
    so `reap` can find them; elsewhere nothing changes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap() -> None:
    """Kill whatever the ranks started that is still running once they have all exited."""
    try:
        import psutil
    except ImportError:
        return
    left = psutil.Process().children(recursive=True)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)


def stop(ranks: list[subprocess.Popen], sig: int) -> None:
    for p in ranks:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.time() + GRACE_S
    for p in ranks:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python scripts/local_ranks.py N script.py [args ...]", file=sys.stderr)
        return 2
    n, script, args = int(argv[0]), argv[1], argv[2:]
    adopt_orphans()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(n),
               LOCAL_SIZE=str(n), CROSS_RANK="0", CROSS_SIZE="1")
    ranks = [subprocess.Popen([sys.executable, "-u", script, f"--local_rank={r}", *args],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(n)]

    def forward(_signum, _frame):
        # SIGTERM, as DeepSpeed's launcher sends: a terminal's Ctrl-C has reached the ranks already (one process
        # group), and a second SIGINT would make the trainer abort instead of checkpointing.
        stop(ranks, signal.SIGTERM)
        reap()
        sys.exit(1)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        codes = [p.poll() for p in ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            stop(ranks, signal.SIGTERM)
            reap()
            return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal N: 128 + N, as a shell says
        if all(c == 0 for c in codes):
            reap()
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
