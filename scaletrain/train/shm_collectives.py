"""All-reduce, all-gather and reduce-scatter through shared memory for CPU ranks on one host; gloo does the rest.

Why: on CPU, ZeRO's gradient all-reduce and parameter all-gather go through gloo, which moves every byte
through loopback TCP. At the bench's reference shape (5.3 M parameters, 2 ranks) the trace showed ~13 ms
of all-reduce and ~10 ms of all-gather per step, the cores idle: 9 % of our bf16 step. Here each rank
copies its part into a shared segment and the ranks sum disjoint slices of it, so a collective costs a
few memory copies: 5.3 M bf16 elements, 2 ranks on the EPYC, all-reduce 8.5 ms (gloo) vs 1.3-2.5 ms,
all-gather 6.5 vs 0.7-1.6 ms (README, Performance).

The process group (`ShmProcessGroup`) is a Python `ProcessGroup` with gloo registered as its CPU backend:
only `allreduce` (SUM of one tensor), `all_gather_single` (all_gather_into_tensor) and
`reduce_scatter_single` (reduce_scatter_tensor, SUM; ZeRO-3's gradients) take the shared-memory path; any
other op, reduce op or layout goes to gloo unchanged. A group whose ranks cannot map one segment (other
hosts) is plain gloo.

Segment layout: a header, one 64-byte flag per rank (a sequence number only its rank writes), then one slot
of `SLOT_BYTES` per rank. Each step of a collective ends with a barrier: a rank bumps its own flag and waits
until every flag has reached its number, so no atomics are needed. Tensors larger than a slot go through
in slot-sized pieces.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.durable import pid_alive

BACKEND = "scaletrain_shm"
# Per rank. 1, 4 and 16 MiB timed alike (5.3 M bf16 gradients in 3 pieces or 1); small keeps each group's
# segment small (Docker's default /dev/shm is 64 MB, DeepSpeed makes 2 groups).
SLOT_BYTES = 4 * 2**20
HEADER_BYTES = 64  # the token that proves the ranks share the segment
FLAG_BYTES = 64  # a cache line per rank's flag: no false sharing while they spin
SPINS_BEFORE_YIELD = 200
TOKEN = uuid.uuid4().bytes  # per process; rank 0's is the one compared


def _new_file(nbytes: int) -> str:
    """A file of `nbytes` in /dev/shm, its memory reserved (a full /dev/shm fails here, not later as a SIGBUS
    in the middle of a collective); "" where that is not possible."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    path = os.path.join(root, f"scaletrain-collectives-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return ""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return path
    except OSError:
        os.unlink(path)
        return ""
    finally:
        os.close(fd)


def _map_segment(store: dist.Store, rank: int, world: int, nbytes: int) -> mmap.mmap | None:
    """Rank 0 creates the file and writes a random token into it; every rank maps the file and reads the
    token back; then rank 0 unlinks it, so nothing is left behind even if the job is killed later (the
    memory goes with the last mapping). None on every rank unless every rank saw the token: ranks on other
    hosts (or in containers with their own /dev/shm) cannot share memory."""
    if rank == 0:
        store.set("path", _new_file(nbytes))
    path = store.get("path").decode()
    segment = None
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            segment = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    except (OSError, ValueError):  # no such file here (another host), or a shorter one
        pass
    if rank == 0:
        if segment is not None:
            segment[: len(TOKEN)] = TOKEN
        store.set("token", TOKEN)
    token = store.get("token")  # first: it waits until rank 0 has written the token
    shared = segment is not None and segment[: len(TOKEN)] == token
    store.set(f"shared{rank}", b"1" if shared else b"0")
    everyone = all(store.get(f"shared{j}") == b"1" for j in range(world))  # get waits for each rank's answer
    if rank == 0 and path:
        os.unlink(path)
    if segment is not None and not everyone:
        segment.close()
    return segment if everyone else None


class ShmProcessGroup(dist.ProcessGroup):
    def __init__(self, segment: mmap.mmap, rank: int, world: int, timeout: timedelta, gloo: dist.ProcessGroup,
                 pids: list[int] | None = None):
        super().__init__(rank, world)
        self._pids = pids  # the ranks' processes, to notice one that died instead of waiting out the timeout
        self._rank, self._world, self._gloo = rank, world, gloo
        self._timeout_s = timeout.total_seconds()
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
        self._segment = segment
        flags = np.frombuffer(segment, dtype=np.int64, count=world * FLAG_BYTES // 8, offset=HEADER_BYTES)
        self._flags = flags[:: FLAG_BYTES // 8]
        raw = torch.frombuffer(segment, dtype=torch.uint8)
        first_slot = HEADER_BYTES + world * FLAG_BYTES
        self._slots = [raw[first_slot + j * SLOT_BYTES:][:SLOT_BYTES] for j in range(world)]
        self._seq = 0
        self._fence = threading.Lock()

    def getBackendName(self) -> str:
        return BACKEND

    def __repr__(self) -> str:
        return f"ShmProcessGroup(rank={self._rank}, world={self._world})"

    # -- the shared-memory path ---------------------------------------------------------------------------

    def _barrier(self) -> None:
        with self._fence:  # a lock's acquire/release orders this thread's earlier stores before the flag's
            pass
        self._seq += 1
        self._flags[self._rank] = self._seq
        spins, deadline, next_check = 0, None, 0.0
        while int(self._flags.min()) < self._seq:
            spins += 1
            if spins % SPINS_BEFORE_YIELD == 0:
                os.sched_yield()  # ranks may outnumber cores
                now = time.monotonic()
                deadline = deadline or now + self._timeout_s
                if now > next_check:
                    next_check = now + 0.5
                    self._check_late(now > deadline)

    def _check_late(self, timed_out: bool) -> None:
        late = [j for j in range(self._world) if self._flags[j] < self._seq]
        gone = [j for j in late if self._pids and not pid_alive(self._pids[j])]
        if gone:  # (gloo would have seen its socket close)
            raise RuntimeError(f"shared-memory collective: rank(s) {gone} exited before joining it")
        if timed_out:
            raise RuntimeError(f"shared-memory collective timed out after {self._timeout_s:.0f} s "
                               f"waiting for rank(s) {late}")

    def _slot(self, j: int, dtype: torch.dtype) -> torch.Tensor:
        return self._slots[j].view(dtype)

    @torch.no_grad()  # a collective writes in place; gloo's do not record autograd either (a Parameter in works)
    def _allreduce_sum(self, x: torch.Tensor) -> None:
        flat = x.view(-1)
        per_piece = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per_piece):
            piece = flat[start:start + per_piece]
            n = piece.numel()
            slots = [self._slot(j, x.dtype)[:n] for j in range(self._world)]
            slots[self._rank].copy_(piece)
            self._barrier()
            # rank r sums share r of every slot into its own slot (shares are disjoint: no rank reads what
            # another writes)
            mine = [s[self._share(n, self._rank)] for s in slots]
            self._sum(mine, out=mine[self._rank])
            self._barrier()
            for j in range(self._world):
                piece[self._share(n, j)].copy_(slots[j][self._share(n, j)])
            self._barrier()  # before the next piece (or collective) overwrites the slots

    def _share(self, n: int, j: int) -> slice:
        """Rank j's part of n elements in the all-reduce (every rank computes the same split)."""
        return slice(n * j // self._world, n * (j + 1) // self._world)

    @staticmethod
    def _sum(parts: list[torch.Tensor], out: torch.Tensor) -> None:
        """out = the parts summed in rank order; 16-bit floats accumulate in fp32 and are rounded once."""
        if len(parts) == 2:  # torch adds 16-bit floats in fp32 too; no buffer to fault in (out may be a part)
            torch.add(parts[0], parts[1], out=out)
            return
        wide = torch.float32 if out.dtype in (torch.bfloat16, torch.float16) else out.dtype
        acc = parts[0].to(wide, copy=True)
        for part in parts[1:]:
            acc += part
        out.copy_(acc)

    @torch.no_grad()
    def _reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        blocks, flat_out = x.view(self._world, -1), out.view(-1)
        per_piece = SLOT_BYTES // (x.element_size() * self._world)
        for start in range(0, flat_out.numel(), per_piece):
            n = min(per_piece, flat_out.numel() - start)
            slots = [self._slot(j, x.dtype)[: self._world * n].view(self._world, n) for j in range(self._world)]
            slots[self._rank].copy_(blocks[:, start:start + n])  # every rank's block r goes to rank r
            self._barrier()
            self._sum([s[self._rank] for s in slots], out=flat_out[start:start + n])
            self._barrier()

    @torch.no_grad()
    def _allgather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        flat, whole = x.view(-1), out.view(self._world, -1)
        per_piece = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per_piece):
            piece = flat[start:start + per_piece]
            n = piece.numel()
            self._slot(self._rank, x.dtype)[:n].copy_(piece)
            self._barrier()
            for j in range(self._world):
                whole[j, start:start + n].copy_(self._slot(j, x.dtype)[:n])
            self._barrier()

    @staticmethod
    def _done(result) -> dist.Work:
        fut = torch.futures.Future()
        fut.set_result(result)
        return torch._C._distributed_c10d._create_work_from_future(fut)

    @staticmethod
    def _plain(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype != torch.bool and not t.is_complex()

    def _one_block_each(self, block: torch.Tensor, whole: torch.Tensor) -> bool:
        """Whether `whole` is the ranks' blocks end to end, as the shared-memory gather/scatter take them."""
        return (self._plain(block) and self._plain(whole) and block.is_contiguous() and whole.is_contiguous()
                and block.dtype == whole.dtype and whole.numel() == block.numel() * self._world)

    # -- the ProcessGroup API -----------------------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        opts = opts or dist.AllreduceOptions()
        if len(tensors) == 1 and opts.reduceOp == dist.ReduceOp.SUM and self._plain(tensors[0]):
            x = tensors[0]
            dense = x if x.is_contiguous() else x.contiguous()  # (gloo sums a strided view wrongly)
            self._allreduce_sum(dense)
            if dense is not x:
                x.copy_(dense)
            return self._done(tensors)
        return self._gloo.allreduce(tensors, opts)

    def all_gather_single(self, output, input, opts=None):
        opts = opts or dist.AllgatherOptions()
        if self._one_block_each(input, output):
            self._allgather(output, input)
            return self._done([output])
        return self._gloo._allgather_base(output, input, opts)

    _allgather_base = all_gather_single

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        if opts.reduceOp == dist.ReduceOp.SUM and self._one_block_each(output, input):
            self._reduce_scatter(output, input)
            return self._done([output])
        return self._gloo._reduce_scatter_base(output, input, opts)

    _reduce_scatter_base = reduce_scatter_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for out, x in zip(outputs, inputs):
            self.all_gather_single(out, x, opts).wait()
        return self._done(outputs)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for out, x in zip(outputs, inputs):
            self.reduce_scatter_single(out, x, opts).wait()
        return self._done(outputs)

    def allreduce_coalesced(self, tensors, opts=None):
        one = dist.AllreduceOptions()
        one.reduceOp = (opts or dist.AllreduceCoalescedOptions()).reduceOp
        for t in tensors:
            self.allreduce([t], one).wait()
        return self._done(tensors)

    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # torch's _coalescing_manager brackets its ops with these; every coalesced op above has finished when it
    # returns, so there is nothing to gather up (gloo's own pair takes other arguments and fails here)
    def _start_coalescing(self, device=None) -> None:
        pass

    def _end_coalescing(self, device=None) -> dist.Work:
        return self._done([])


# Every other op goes to gloo by name. Not through ProcessGroup's own dispatch (the default for a method a
# Python group does not define): that path holds the GIL while it waits for gloo's queue, and a gloo worker
# that frees a tensor with a Python object needs the GIL under the queue's lock -- a deadlock seen in
# DeepSpeed's parameter broadcast.
_TO_GLOO = {name: name for name in (
    "allgather", "allgather_coalesced", "alltoall", "alltoall_base", "barrier", "broadcast", "gather",
    "monitored_barrier", "recv", "recv_anysource", "reduce", "reduce_scatter", "scatter", "send", "shutdown",
    "abort")}
_TO_GLOO.update(all_to_all_single="alltoall_base")


def _delegate(gloo_name: str):
    def op(self, *args, **kwargs):
        return getattr(self._gloo, gloo_name)(*args, **kwargs)

    op.__name__ = gloo_name
    return op


for _name, _gloo_name in _TO_GLOO.items():
    setattr(ShmProcessGroup, _name, _delegate(_gloo_name))


def segment_bytes(world: int) -> int:
    return HEADER_BYTES + world * (FLAG_BYTES + SLOT_BYTES)


def _create(store: dist.Store, rank: int, world: int, timeout: timedelta):
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world, timeout)
    if world == 1:
        return gloo
    shm_store = dist.PrefixStore("shm", store)
    segment = _map_segment(shm_store, rank, world, segment_bytes(world))
    if segment is None:
        return gloo
    shm_store.set(f"pid{rank}", f"{os.getpid()} {_pid_namespace()}")
    pids, spaces = zip(*(shm_store.get(f"pid{j}").decode().split(" ", 1) for j in range(world)))
    # ranks sharing /dev/shm from separate PID namespaces cannot see each other's pids: check none there
    same_space = len(set(spaces)) == 1 and spaces[0] != "?"
    return ShmProcessGroup(segment, rank, world, timeout, gloo, [int(p) for p in pids] if same_space else None)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def register() -> str:
    """Make `BACKEND` a torch.distributed backend name (once per process) and return it."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    return BACKEND
