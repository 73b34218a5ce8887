"""The shared-memory process group against gloo: same results, fallbacks where it cannot apply, no hangs."""

import functools
import glob
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaletrain.errors import UserError
from scaletrain.train import shm_collectives as shm
from scaletrain.train.distributed import cpu_backend, free_port


def _rank_main(rank: int, world: int, port: int, job, out: str, timeout_s: float, slot_bytes: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if slot_bytes:
        shm.SLOT_BYTES = slot_bytes  # small slots: tensors go through in pieces
    dist.init_process_group(shm.register(), rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        result = job(rank, world)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(job, world: int, tmp_path, timeout_s: float = 120, slot_bytes: int = 0, deadline_s: float = 240) -> list:
    out = str(tmp_path / "result")
    ranks = mp.start_processes(_rank_main, args=(world, free_port(), job, out, timeout_s, slot_bytes), nprocs=world,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + deadline_s
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail(f"ranks still running after {deadline_s} s: a hang")
    results = []
    for r in range(world):
        path = f"{out}.{r}"
        results.append(json.loads(Path(path).read_text()) if os.path.exists(path) else None)  # None: it left early
    return results


def _rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum the shared-memory path promises: rank order; 16-bit floats in fp32, rounded once."""
    wide = torch.float32 if parts[0].dtype == torch.bfloat16 else parts[0].dtype
    total = parts[0].to(wide, copy=True)
    for t in parts[1:]:
        total += t
    return total.to(parts[0].dtype)


def _sums_and_gathers(rank: int, world: int, largest: int = 300_001) -> dict:
    checked = []
    for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.int64):
        for n in (1, 1001, largest):
            g = torch.Generator().manual_seed(1000 * rank + n)
            x = (torch.randn(n, generator=g) * 100).to(dtype)
            everyone = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(everyone, x)  # list all-gather: gloo's path, the reference
            got = x.clone()
            dist.all_reduce(got)
            assert torch.equal(got, _rank_order_sum(everyone)), (dtype, n, "all-reduce")
            if world == 2:  # bitwise what gloo's own all-reduce gives (on more ranks ours sums bf16 in fp32)
                theirs = x.clone()
                dist.group.WORLD._gloo.allreduce([theirs]).wait()
                assert torch.equal(got, theirs), (dtype, n, "all-reduce vs gloo")
            # reduce-scatter: every rank sends block r = x * (r + 1) to rank r
            mine = torch.empty(n, dtype=dtype)
            dist.reduce_scatter_tensor(mine, torch.cat([x * (r + 1) for r in range(world)]))
            assert torch.equal(mine, _rank_order_sum([t * (rank + 1) for t in everyone])), (dtype, n, "reduce-scatter")
            gathered = torch.empty(world * n, dtype=dtype)
            dist.all_gather_into_tensor(gathered, x)
            assert torch.equal(gathered, torch.cat(everyone)), (dtype, n, "all-gather")
            checked.append(f"{dtype}/{n}")
    x = torch.arange(12.0).reshape(3, 4) * (rank + 1)
    col = x[:, 1]  # a strided view: summed whole (gloo's own sum of it gets all but the first element wrong)
    dist.all_reduce(col)
    assert torch.equal(x[:, 1], torch.tensor([1.0, 5, 9]) * sum(range(1, world + 1))), x
    # a Parameter (requires grad), as gloo takes it: the in-place sum must not be recorded by autograd
    param = torch.nn.Parameter(torch.full((1001,), float(rank + 1)))
    dist.all_reduce(param)
    assert torch.equal(param.detach(), torch.full((1001,), float(sum(range(1, world + 1)))))
    # an op the shared memory does not take, through gloo
    peak = torch.tensor([float(rank)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    assert peak.item() == world - 1
    work = dist.all_reduce(torch.ones(5), async_op=True)
    work.wait()
    return {"backend": dist.get_backend(), "group": type(dist.group.WORLD).__name__, "checked": checked,
            "in_dev_shm": glob.glob("/dev/shm/scaletrain-collectives-*")}


@pytest.mark.parametrize("world,slot_bytes", [(2, 0), (3, 4096)], ids=["2ranks", "3ranks-small-slots"])
def test_sums_and_gathers_equal_gloo(tmp_path, world, slot_bytes):
    before = set(glob.glob("/dev/shm/scaletrain-collectives-*"))  # (any other job's)
    # Small slots: 30k elements already go through in 15-59 pieces (each piece is a 3-rank handshake on 2 cores)
    job = functools.partial(_sums_and_gathers, largest=30_001) if slot_bytes else _sums_and_gathers
    results = _run(job, world, tmp_path, slot_bytes=slot_bytes)
    assert all(r["backend"] == shm.BACKEND and r["group"] == "ShmProcessGroup" for r in results)
    assert len(results[0]["checked"]) == 12
    assert set(results[0]["in_dev_shm"]) <= before  # ours was unlinked once every rank had mapped it


def _coalesced(rank: int, world: int) -> dict:
    """torch's _coalescing_manager (DeepSpeed's all_gather_coalesced uses it) with each op kind inside."""
    from torch.distributed.distributed_c10d import _coalescing_manager

    cpu, sizes = torch.device("cpu"), (5, 7)
    gathered = [torch.empty(world * n) for n in sizes]
    with _coalescing_manager(device=cpu):
        for out, n in zip(gathered, sizes):
            dist.all_gather_into_tensor(out, torch.full((n,), float(rank + 1)))
    scattered = [torch.empty(n) for n in sizes]
    with _coalescing_manager(device=cpu):
        for out, n in zip(scattered, sizes):
            dist.reduce_scatter_tensor(out, torch.arange(world * n, dtype=torch.float32))
    summed = [torch.ones(n) for n in sizes]
    with _coalescing_manager(device=cpu, async_ops=True) as cm:
        for t in summed:
            dist.all_reduce(t)
    cm.wait()
    sent = torch.full((3,), float(rank))
    with _coalescing_manager(device=cpu):
        dist.broadcast(sent, 1)  # not a coalescable op: runs on its own
    return {"gathered": [t.tolist() for t in gathered], "scattered": [t.tolist() for t in scattered],
            "summed": [t.tolist() for t in summed], "sent": sent.tolist()}


def test_coalescing_manager_works_on_the_group(tmp_path):
    got = _run(_coalesced, 2, tmp_path)[1]
    assert got["gathered"][1] == [1.0] * 7 + [2.0] * 7
    assert got["scattered"] == [[2.0 * (5 + i) for i in range(5)], [2.0 * (7 + i) for i in range(7)]]
    assert got["summed"] == [[2.0] * 5, [2.0] * 7] and got["sent"] == [1.0] * 3


def _deepspeed_like_broadcasts(rank: int, world: int) -> dict:
    """DeepSpeed broadcasts every parameter as `p.data.view(torch.uint8)` (tensors with Python objects) on a
    new group: through ProcessGroup's default dispatch that deadlocked on the GIL (see shm_collectives)."""
    group = dist.new_group(list(range(world)))
    torch.manual_seed(rank)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(20)]).to(torch.bfloat16)
    for _ in range(5):
        for p in model.parameters():
            dist.broadcast(p.data.view(torch.uint8), 0, group=group)
    dist.barrier(group=group)
    return {"first": model[0].weight.float().sum().item()}


def test_deepspeed_style_parameter_broadcasts_finish(tmp_path):
    results = _run(_deepspeed_like_broadcasts, 2, tmp_path, timeout_s=60, deadline_s=90)
    assert results[0]["first"] == results[1]["first"]


def _rank1_absent(how: str, rank: int, world: int) -> dict:
    if rank == 1:
        if how == "exits":
            os._exit(0)  # gone without a word (the launcher would notice, but maybe not before the others wait)
        time.sleep(3.5)  # misses the collective rank 0 waits in (2 s timeout)
        return {}
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(10))
    except RuntimeError as e:
        return {"error": str(e), "waited": time.monotonic() - start}
    return {"error": None}


def test_a_missing_rank_times_out_with_its_number(tmp_path):
    got = _run(functools.partial(_rank1_absent, "sleeps"), 2, tmp_path, timeout_s=2)[0]
    assert got["error"] and "timed out after 2 s waiting for rank(s) [1]" in got["error"]
    assert 1.5 < got["waited"] < 5.5


def test_a_rank_that_died_is_noticed_long_before_the_timeout(tmp_path):
    got = _run(functools.partial(_rank1_absent, "exits"), 2, tmp_path, timeout_s=600)[0]
    assert got["error"] and "rank(s) [1] exited" in got["error"] and got["waited"] < 10


class _OtherHost:
    """A store view for a rank on another machine: the file rank 0 names does not exist there."""

    def __init__(self, store):
        self.store = store

    def set(self, key, value):
        self.store.set(key, value)

    def get(self, key):
        return b"/dev/shm/scaletrain-collectives-on-another-host" if key == "path" else self.store.get(key)


def test_ranks_that_cannot_share_the_segment_all_fall_back():
    store = dist.HashStore()
    views = [store, _OtherHost(store)]
    got = [...] * 2

    def rank(r):
        got[r] = shm._map_segment(views[r], r, 2, shm.segment_bytes(2))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got == [None, None]  # both, not only the rank that failed: a half-shared group would hang
    created = store.get("path").decode()
    assert created and not os.path.exists(created)


def test_collectives_choice_is_checked(monkeypatch):
    monkeypatch.setenv("SCALETRAIN_CPU_COLLECTIVES", "gloo")
    assert cpu_backend() == "gloo"
    monkeypatch.setenv("SCALETRAIN_CPU_COLLECTIVES", "mpi")
    with pytest.raises(UserError, match="SCALETRAIN_CPU_COLLECTIVES='mpi'.*shm .*gloo"):
        cpu_backend()


def _setup_then_new_group(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DEEPSPEED_TIMEOUT="1", DS_ACCELERATOR="cpu")
    from scaletrain.train.distributed import setup

    setup(1)
    group = dist.new_group(list(range(world)))  # as DeepSpeed makes ZeRO's data-parallel group
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"world": dist.group.WORLD._timeout_s, "new_group": group._timeout_s}, f)
    dist.destroy_process_group()


def test_every_group_gets_deepspeeds_timeout(tmp_path):
    """ZeRO's reductions run on a group DeepSpeed makes with a plain new_group: it got torch's 30 minutes, not
    DeepSpeed's 10 (or DEEPSPEED_TIMEOUT): a stopped rank held the others silently for half an hour."""
    out = str(tmp_path / "result")
    mp.start_processes(_setup_then_new_group, args=(2, free_port(), out), nprocs=2, start_method="spawn", join=True)
    for r in range(2):
        assert json.loads(Path(f"{out}.{r}").read_text()) == {"world": 60.0, "new_group": 60.0}
