"""Process-group setup for CPU and GPU ranks, with or without the `deepspeed` launcher."""

from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now, for a single-node rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_rank() -> int:
    """This process's global rank as its launcher set it, before `setup` (0 without a launcher)."""
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))


def launcher_world() -> tuple[int, int]:
    """(world size, ranks on this node) as the launcher set them, before `setup` (1, 1 without a launcher); under
    `--launcher openmpi` only mpirun's variables are set yet."""
    e = os.environ
    world = int(e.get("WORLD_SIZE", e.get("OMPI_COMM_WORLD_SIZE", "1")))
    return world, int(e.get("LOCAL_SIZE", e.get("LOCAL_WORLD_SIZE", e.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))))


def use_cpu_accelerator_without_cuda() -> None:
    """Before DeepSpeed is first imported: without CUDA it is the CPU accelerator (DeepSpeed's own detection picks
    and caches one at import, warning on every rank, and could choose xpu/mps)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def setup(threads: int = 0) -> Dist:
    """Initialise torch.distributed through DeepSpeed (gloo + shared memory on CPU, nccl on CUDA).

    Without a launcher we are a world of one: fill in the env the launcher would have set.
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:  # `deepspeed --launcher openmpi` (mpirun)
        e = os.environ
        if "MASTER_ADDR" not in e or "MASTER_PORT" not in e:  # DeepSpeed would fall back to mpi4py discovery:
            # an ImportError on every rank
            from scaletrain.errors import UserError

            missing = " and ".join(k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in e)
            raise UserError(f"started by mpirun without {missing}: mpirun does not set them; put MASTER_ADDR=<first host> "
                            "and MASTER_PORT=<free port> into the env file the launcher passes on (.deepspeed_env)")
        e.update(RANK=e["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=e["OMPI_COMM_WORLD_SIZE"],
                 LOCAL_RANK=e["OMPI_COMM_WORLD_LOCAL_RANK"], LOCAL_SIZE=e["OMPI_COMM_WORLD_LOCAL_SIZE"])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    use_cpu_accelerator_without_cuda()
    # DeepSpeed 0.19 gathers ZeRO partitions with the name torch 2.13 deprecated (same operation): a warning
    # on every rank that no user of ours can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks on one CPU share its cores: oversubscription costs far more than it gains.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(threads or max(1, cores // max(1, local_world)))
        from scaletrain.train.perf import tune_cpu_allocator

        tune_cpu_allocator()  # large activations were page-faulted afresh every step (see perf.py)
    from scaletrain.train.extensions_dir import import_muon_lazily, skip_cpu_shm_comm_op, use_private_extensions_dir

    use_private_extensions_dir()  # before deepspeed JIT-builds any op
    import deepspeed

    import_muon_lazily()
    if device.type == "cpu":
        skip_cpu_shm_comm_op()

    if not dist.is_initialized():
        one_timeout_for_every_group()
        deepspeed.init_distributed(dist_backend=cpu_backend() if device.type == "cpu" else None, verbose=False)
    return Dist(rank, world, local_rank, local_world, device)


def one_timeout_for_every_group() -> None:
    """DeepSpeed gives its collective timeout (10 minutes, or DEEPSPEED_TIMEOUT) to the world group only; ZeRO's
    data-parallel group comes from a plain new_group with torch's default, 30 minutes on CPU: a hung rank (stopped,
    deadlocked, swapping) held all the others silently for 30 minutes, whatever DEEPSPEED_TIMEOUT said."""
    from deepspeed.constants import default_pg_timeout
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = default_pg_timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = default_pg_timeout


def cpu_backend() -> str:
    """gloo, with all-reduce, all-gather and reduce-scatter through shared memory between ranks on one
    host (shm_collectives.py); SCALETRAIN_CPU_COLLECTIVES=gloo leaves plain gloo."""
    choice = os.environ.get("SCALETRAIN_CPU_COLLECTIVES", "shm")
    if choice not in ("shm", "gloo"):
        from scaletrain.errors import UserError

        raise UserError(f"SCALETRAIN_CPU_COLLECTIVES={choice!r} is not a choice: set it to shm (the default) or gloo")
    if choice == "gloo":
        return "gloo"
    from scaletrain.train.shm_collectives import register

    return register()


def collectives_status() -> str:
    """What the default process group runs collectives on (start-up line, bench JSON)."""
    if not dist.is_initialized():
        return "none"
    if dist.get_world_size() == 1:
        return "none needed (1 rank)"
    from scaletrain.train.shm_collectives import ShmProcessGroup

    if isinstance(dist.group.WORLD, ShmProcessGroup):
        return "shared memory (all-reduce, all-gather, reduce-scatter) + gloo"
    return dist.get_backend()


def shutdown() -> None:
    """Close the process group explicitly: left to interpreter teardown, gloo's threads intermittently abort
    a rank that has already checkpointed and said goodbye ("terminate called without an active exception",
    exit -6), and the launcher then reports the whole run as failed."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_solo_calls = 0


def main_rank_does(work, poll_s: float = 0.5):
    """Collective. Rank 0 runs `work()` alone -- minutes, maybe: tokenising a corpus, hashing or growing a large
    checkpoint -- while the others wait on the process group's key-value store, not in a collective: DeepSpeed's
    collectives time out after 10 minutes. The store lives in rank 0's process, so the waiting ends with an
    error if rank 0 dies. Returns work()'s result on rank 0 (None elsewhere); a UserError there is raised on
    every rank with the same message, any other failure as "rank 0 failed"."""
    global _solo_calls
    from scaletrain.errors import UserError, heard_elsewhere

    _solo_calls += 1
    key = f"scaletrain/solo/{_solo_calls}"
    world = dist.get_world_size() if dist.is_initialized() else 1
    store = None
    if world > 1:
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # (a torch without it: wait in a barrier instead)
            store = None
    if world == 1 or dist.get_rank() == 0:
        try:
            result = work()
        except UserError as e:
            _tell_and_wait(store, key, f"user:{e}", world)
            raise
        except BaseException as e:
            _tell_and_wait(store, key, f"fail:{type(e).__name__}: {(str(e).splitlines() or [''])[0]}", world)
            raise
        if store is not None:
            store.set(key, "ok")
        barrier()  # rank 0 must not end (taking the store with it) before the others have read the key
        return result
    if store is not None:
        delay = 0.01  # short work (a small checkpoint's manifest) is noticed at once, long work polled slowly
        while not store.check([key]):
            time.sleep(delay)
            delay = min(2 * delay, poll_s)
        said = store.get(key).decode(errors="replace")
        if said != "ok":
            store.add(f"{key}/seen", 1)
            if said.startswith("user:"):  # rank 0 prints it
                raise heard_elsewhere(UserError(said[len("user:"):]))
            raise RuntimeError(f"rank 0 failed ({said[len('fail:'):]})")
    barrier()
    return None


def _tell_and_wait(store, key: str, value: str, world: int, patience_s: float = 30.0) -> None:
    """Post rank 0's failure and give the others a moment to read it before rank 0 exits with its store."""
    if store is None:
        return
    store.set(key, value)
    deadline = time.monotonic() + patience_s
    while store.add(f"{key}/seen", 0) < world - 1 and time.monotonic() < deadline:
        time.sleep(0.01)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64 on CPU to keep losses bit-stable)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def stop_all_if(problem: str | None, elsewhere: str) -> None:
    """Collective. When any rank has a problem, every rank stops with a UserError: its own reason, or `elsewhere`
    (a rank must not raise alone: the others would wait for it in their next collective)."""
    from scaletrain.errors import UserError, heard_elsewhere

    if any_rank(problem is not None):  # `elsewhere` is said once, by rank 0; a rank's own problem by that rank
        raise heard_elsewhere(UserError(problem or elsewhere), problem is None and dist.is_initialized() and dist.get_rank() != 0)
