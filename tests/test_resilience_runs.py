"""Crash-proof training, end to end on CPU ranks (fp32): the kill test (K=5), resume at another world size
and ZeRO stage, milestone retention, and the NaN/Inf guard with an injected fault.

Ranks are started by scripts/local_ranks.py (through scripts/crash_test.py: env RANK/WORLD_SIZE, one process
group) -- the deepspeed launcher adds two interpreter start-ups per run and nothing these tests look at.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from launch_utils import REPO, small_corpus

sys.path.insert(0, str(REPO / "scripts"))
import crash_test as ct  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, RESUME_AT = 24, 12


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resilience")


def _common(work: Path) -> list[str]:
    corpus = small_corpus(work / "corpus")
    return [*ct.TINY, f"data.source={corpus}", f"data.cache_dir={work / 'cache'}", f"train.max_steps={STEPS}",
            "train.save_every=3", "train.keep_last=2", "train.keep_every=6"]


@pytest.fixture(scope="module")
def ref2(work) -> Path:
    """Uninterrupted: 2 ranks, ZeRO-2, 1 micro-batch each (global batch 4)."""
    d = work / "ref2"
    ct.run_to_end(2, [*_common(work), "zero.stage=2", f"run.dir={d}"], work / "ref2.log")
    return d


def test_milestones_survive_pruning(ref2):
    """keep_last=2 plus keep_every=6: every multiple of 6, and the newest two."""
    tags = sorted(int(p.name[len("global_step"):]) for p in (ref2 / "checkpoints").glob("global_step*"))
    assert tags == [6, 12, 18, 21, 24]


def test_kill_test_five_sigkills_bitwise(work, ref2):
    """SIGKILL the whole process group 5 times (twice while a checkpoint is being written), resume each
    time: the TensorBoard loss curve equals the uninterrupted run's bit for bit."""
    d = work / "crashed"
    events = ct.crash_run(d, 2, [*_common(work), "zero.stage=2", f"run.dir={d}"], kills=5, seed=1,
                          train_secs=float(json.loads((ref2 / "status.json").read_text())["seconds"]), log=print)
    assert sum(e["killed"] for e in events) >= 4, events  # (one may land after the run finished)
    assert any(e["killed"] and e.get("saving") for e in events), events  # at least one kill tore a save apart
    ok, detail = ct.compare(ct.loss_curve(ref2), ct.loss_curve(d))
    assert ok, detail
    assert json.loads((d / "status.json").read_text())["state"] == "finished"


def _resume_copy(src: Path, dst: Path, at: int) -> None:
    """`dst` = `src` as it was when checkpoint `at` was the newest (later tags gone, TensorBoard kept:
    the resumed run must purge the steps after `at` itself)."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("global_step*"):
        if int(p.name[len("global_step"):]) > at:
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"global_step{at}")


def _resume_and_compare(work: Path, src: Path, at: int, ranks: int, stage: int, reference: Path) -> tuple[float, str]:
    d = work / f"resume_at{at}_{ranks}r_z{stage}"
    _resume_copy(src, d, at)
    log = work / f"{d.name}.log"
    ct.run_to_end(ranks, [*_common(work), f"zero.stage={stage}", f"run.dir={d}"], log)
    expected, got = ct.loss_curve(reference), ct.loss_curve(d)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == expected[s] for s in range(1, at + 1))
    delta = max(abs(got[s] - expected[s]) for s in range(at + 1, STEPS + 1))
    manifest = json.loads((d / "checkpoints" / f"global_step{STEPS}" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["zero_stage"], manifest["global_batch"]) == (ranks, stage, 4)
    return delta, log.read_text()


def test_resume_2_to_1_then_1_to_2_and_zero2_to_zero3(work, ref2):
    """The saved topology differs -> resharded automatically, with grad_accum adjusted so the global batch
    and the data position carry over. 2 ranks (ZeRO-2) -> 1 rank at step 12; that run's 1-rank checkpoint
    of step 18 -> 2 ranks under ZeRO-3. Each loss curve within 1e-4 of the uninterrupted 2-rank run's."""
    delta1, text = _resume_and_compare(work, ref2, RESUME_AT, 1, 2, ref2)
    assert "saved by 2 rank(s), ZeRO-2 fp32; this run is 1 rank(s), ZeRO-2 fp32: resharding" in text
    assert "train.grad_accum 1 -> 2 keeps the global batch at 4 sequences" in text
    one_rank = work / f"resume_at{RESUME_AT}_1r_z2"
    # the 2-rank start's rank1.pid is gone: `scaletrain runs` would take its reused pid for a live rank
    assert sorted(p.name for p in (one_rank / "pids").iterdir() if p.name.endswith(".pid")) == ["rank0.pid"]
    delta2, text = _resume_and_compare(work, one_rank, 18, 2, 3, ref2)
    assert "saved by 1 rank(s), ZeRO-2 fp32; this run is 2 rank(s), ZeRO-3 fp32: resharding" in text
    print(f"world-size resume: 2->1 max |dloss| {delta1:.2e}; 1->2 with ZeRO-2->3 max |dloss| {delta2:.2e}")
    assert delta1 <= 1e-4 and delta2 <= 1e-4


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(work, ref2):
    """A flipped byte in the newest tag (the one `latest` names): the restart names the bad file, resumes from
    the tag before it, and the loss curve still equals the uninterrupted run's, bit for bit."""
    d = work / "damaged"
    _resume_copy(ref2, d, 21)
    shard = max((d / "checkpoints" / "global_step21").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # a rank 0 killed inside write_text_atomic leaves its temp file; the next start clears them
    stale = [d / ".status.json.tmp-host-123-0a1b2c3d", d / ".config.yaml.tmp-host-123-0a1b2c3d"]
    for f in stale:
        f.write_text('{"state": "runn')
    log = work / "damaged.log"
    ct.run_to_end(2, [*_common(work), "zero.stage=2", f"run.dir={d}"], log)
    text = log.read_text()
    warning = next((ln for ln in text.splitlines() if "warning: skipping checkpoint global_step21" in ln), "")
    assert shard.name in warning and "does not match its sha256" in warning, text[-3000:]
    assert f"resumed from {d / 'checkpoints' / 'global_step18'}" in text, text[-3000:]
    assert not any(f.exists() for f in stale)
    ok, detail = ct.compare(ct.loss_curve(ref2), ct.loss_curve(d))
    assert ok, detail


def test_nan_guard_skips_counts_and_aborts(work):
    """NaN injected on rank 0 only at steps 3, 5, 6, 7 (max_skipped=3): step 3 is skipped on both ranks
    without changing weights or Adam state, the count reaches TensorBoard, and three in a row stop the run
    with one line, exit 1, status failed, and the checkpoints intact."""
    d = work / "nan"
    log = work / "nan.log"
    proc = ct.start(2, [*_common(work), "zero.stage=2", "train.max_steps=10", "train.save_every=1",
                    "train.keep_last=10", "train.max_skipped=3", f"run.dir={d}"],
                    env_extra={"SCALETRAIN_INJECT_NAN_AT_STEP": "3,5,6,7"}, log_path=log)
    try:
        rc = proc.wait(timeout=300)
    finally:
        ct.kill_group(proc)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    # every rank stops; one line says why (rank 0's), not one a rank
    assert len(errors) == 1 and "training stopped at step 7" in errors[0] and "train.max_skipped=3" in errors[0], errors
    assert "warning: step 3 skipped" in text
    assert json.loads((d / "status.json").read_text())["state"] == "failed"

    from scaletrain.growth.ds_reader import DeepSpeedReader
    from scaletrain.train.checkpoint import find_resumable

    def state(step):
        r = DeepSpeedReader(d / "checkpoints" / f"global_step{step}", True)
        return {n: (r.read(n), r.moment(n, "exp_avg"), r.moment(n, "exp_avg_sq")) for n in r.names()}, r.adam_step

    (before, adam_before), (after, adam_after) = state(2), state(3)
    assert adam_before == adam_after == 2
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], after[n])), "a skipped step changed the state"
    assert not torch.equal(state(4)[0]["model.norm.weight"][0], after["model.norm.weight"][0])  # step 4 trained
    assert find_resumable(d / "checkpoints", log=lambda m: None) == "global_step6"  # nothing saved after the abort
    skipped = _scalars(d, "train/skipped_steps")
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 1 and skipped[6] == 3

    # a growth boundary put before the checkpoint a start resumes: one line, nothing written
    args = [*_common(work), "zero.stage=2", "train.max_steps=10", "train.save_every=1", "train.keep_last=10",
            "train.max_skipped=3", f"run.dir={d}"]
    files = sorted((p, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file())
    proc = ct.start(2, [*args, "growth.schedule=[{at_step: 4, set: {model.num_layers: 4}}]"], log_path=work / "past.log")
    try:
        assert proc.wait(timeout=300) == 2
    finally:
        ct.kill_group(proc)
    errors = {ln for ln in (work / "past.log").read_text().splitlines() if ln.startswith("error:")}
    assert len(errors) == 1 and "at_step 4 lies before checkpoint global_step6" in errors.pop()
    assert sorted((p, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()) == files
    # resumed without the NaNs: the count carries on from the checkpoint (DeepSpeed keeps "skipped_steps" to itself)
    ct.run_to_end(2, args, work / "nan-resumed.log")
    skipped = _scalars(d, "train/skipped_steps")
    assert [skipped[s] for s in range(7, 11)] == [3, 3, 3, 3], skipped


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}
