"""`main_rank_does`: rank 0's long solo work (tokenising, hashing, growing) outlasts the process group's timeout
without failing the waiting ranks, and rank 0's error reaches every rank as the same one line."""

import time

from scaletrain.errors import UserError
from scaletrain.train.distributed import all_reduce_sum, main_rank_does
from test_shm_collectives import _run

TIMEOUT_S = 2.0  # the process group's collective timeout in these runs; the solo work takes longer


def _slow_work(rank: int, world: int):
    t0 = time.monotonic()
    got = main_rank_does(lambda: (time.sleep(2.5 * TIMEOUT_S), "built")[1])
    waited = time.monotonic() - t0
    total = all_reduce_sum([1.0])[0]  # the group still works afterwards
    return {"got": got, "waited": waited, "total": total}


def _failing_work(rank: int, world: int):
    def work():
        time.sleep(0.3)
        raise UserError("data.source /nowhere does not exist; give a file or directory")

    try:
        main_rank_does(work)
    except UserError as e:
        return {"error": str(e), "printed": not e.heard_elsewhere}
    return {"error": None}


def test_the_others_outwait_the_collective_timeout(tmp_path):
    results = _run(_slow_work, 2, tmp_path, timeout_s=TIMEOUT_S)
    assert results[0]["got"] == "built" and results[1]["got"] is None
    assert all(r["waited"] >= 2.5 * TIMEOUT_S - 0.5 and r["total"] == 2.0 for r in results), results


def test_rank_0s_error_is_every_rank_s_error(tmp_path):
    results = _run(_failing_work, 3, tmp_path, timeout_s=30)
    assert [r["error"] for r in results] == ["data.source /nowhere does not exist; give a file or directory"] * 3
    assert [r["printed"] for r in results] == [True, False, False]  # the CLI prints it once, on rank 0


def _one_rank_cannot(rank: int, world: int):
    from scaletrain.train.distributed import stop_all_if

    try:
        stop_all_if("rank 1 cannot see /shared/cache" if rank == 1 else None, "another rank cannot (its error says)")
    except UserError as e:
        return {"error": str(e), "printed": not e.heard_elsewhere}
    return {"error": None}


def test_a_problem_on_one_rank_stops_every_rank_with_a_reason(tmp_path):
    results = _run(_one_rank_cannot, 3, tmp_path, timeout_s=30)
    assert [r["error"] for r in results] == ["another rank cannot (its error says)", "rank 1 cannot see /shared/cache",
                                             "another rank cannot (its error says)"]
    assert [r["printed"] for r in results] == [True, True, False]  # the reason, and once that another rank has one
