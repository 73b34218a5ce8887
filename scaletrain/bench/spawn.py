"""Start N ranks for a benchmark job without any launcher.

torch.multiprocessing (spawn) + the environment the `deepspeed` launcher would set, then the very
same `distributed.setup` the trainer uses (threads per rank, CPU allocator tuning, gloo/nccl), so the
benchmark's ranks are configured exactly like training ranks. Rank 0's return value comes back.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _worker(local_rank: int, ranks: int, port: int, device: str, threads: int, job: Callable, args: tuple, out: str,
            env: dict) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(local_rank),
                      LOCAL_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    if device == "cpu":  # before anything initialises CUDA: CPU ranks even on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    from scaletrain.train.distributed import barrier, setup, shutdown

    dist = setup(threads)
    # No barrier on failure: the other ranks sit in another collective, so a failing rank would wait there
    # until the process-group timeout; raising ends it, and mp.spawn then terminates the others.
    result = job(dist, *args)
    if dist.is_main:
        Path(out).write_text(json.dumps(result))
    barrier()
    shutdown()
    # The result is on disk. Skip interpreter teardown: destructors of background threads (gloo,
    # inductor workers) intermittently abort a clean exit with "terminate called without an active
    # exception", which spawn() would report as a failed rank. multiprocessing's own finalizers still run:
    # they unlink the semaphores made here (tqdm's lock, under inductor), which the parent's resource tracker
    # otherwise reported as "leaked" at the end of every bench.
    from multiprocessing import util

    util._run_finalizers(0)
    util._run_finalizers()
    os._exit(0)


def run_ranks(job: Callable, args: tuple, ranks: int, device: str = "cpu", threads: int = 0, env: dict | None = None) -> dict:
    """Run `job(dist, *args)` on `ranks` fresh processes (with `env` added to their environment);
    returns rank 0's (JSON-able) result."""
    import torch.multiprocessing as mp

    from scaletrain.train.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="scaletrain-bench-") as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(_worker, args=(ranks, free_port(), device, threads, job, args, str(out), env or {}), nprocs=ranks, join=True)
        return json.loads(out.read_text())
