"""In-process checks of the reliability pieces: retention, the disk-space check and the NaN guard's optimizer
wrapper (the multi-rank behaviour is in test_resilience_runs.py; the memory plan is in test_memory_plan.py)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.errors import UserError
from scaletrain.train import checkpoint, disk_space
from scaletrain.train.distributed import Dist
from scaletrain.train.guard import StepGuard

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")


def _tag(root: Path, step: int, nbytes: int = 10) -> Path:
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    (d / "w.pt").write_bytes(b"x" * nbytes)
    checkpoint.write_manifest(d, {"step": step})
    return d


def test_prune_keeps_newest_and_milestones(tmp_path):
    for s in range(1, 11):
        _tag(tmp_path, s)
    (tmp_path / ".tmp-global_step11").mkdir()
    checkpoint.prune(tmp_path, keep_last=2, keep_every=4, protect="global_step10")
    left = sorted(s for s, _ in checkpoint.tags_by_step(tmp_path))
    assert left == [4, 8, 9, 10]
    assert not (tmp_path / ".tmp-global_step11").exists()


def test_prune_after_resuming_past_a_damaged_tag_keeps_the_good_one(tmp_path):
    """Tag 300 failed to verify, so the run resumed from 200 and just saved 210: with keep_last=2 the tags kept
    are 210 and 200 (a good fallback), not 210 and the damaged 300; 300 is left for step 300's save to replace."""
    for s in (100, 200, 300):
        _tag(tmp_path, s)
    (tmp_path / "global_step300" / "w.pt").write_bytes(b"y" * 10)  # bit rot: the manifest no longer matches
    _tag(tmp_path, 210)
    checkpoint.prune(tmp_path, keep_last=2, protect="global_step210")
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [200, 210, 300]
    assert checkpoint.find_resumable(tmp_path, log=lambda m: None) == "global_step210"


def test_prune_keeps_growth_boundaries(tmp_path):
    """A grown run's boundary checkpoints are the parents its family tree names: never pruned."""
    for s in range(1, 8):
        _tag(tmp_path, s)
    checkpoint.prune(tmp_path, keep_last=1, keep_steps=(2, 5))
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [2, 5, 7]


def test_prune_leaves_a_tag_someone_is_reading_for_a_later_save(tmp_path):
    """eval / export-hf / a child's init.from reading a run that still trains: the tag vanished under them."""
    from scaletrain.tag_lock import read_lock

    for s in range(1, 5):
        _tag(tmp_path, s)
    reading = read_lock(tmp_path / "global_step1")
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step4")
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [1, 4]
    reading.release()
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step4")
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [4]
    assert read_lock(tmp_path / "global_step1") is None  # a tag pruned before the reader could hold it
    (tmp_path / "global_step4" / "reading.lock").touch()  # what saves write: the lock is on this file
    reading = read_lock(tmp_path / "global_step4")
    _tag(tmp_path, 5)
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step5")
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [4, 5]
    del reading
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step5")
    assert sorted(s for s, _ in checkpoint.tags_by_step(tmp_path)) == [5]


class _Engine:
    """Enough of a DeepSpeed engine for checkpoint.save's disk check; saving would be a failure here."""

    def __init__(self):
        self.module = torch.nn.Linear(100, 100)

    def save_checkpoint(self, *a, **k):
        raise AssertionError("save_checkpoint must not be reached when the disk is full")


def test_full_disk_skips_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    prev = _tag(root, 5, nbytes=1000)
    checkpoint.write_text_atomic(root / "latest", "global_step5")
    before = {p: p.read_bytes() for p in prev.iterdir()}
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 2000)
    said = []
    out = checkpoint.save(_Engine(), root, 10, {"global_batch": 4}, Dist(0, 1, 0, 1, torch.device("cpu")),
                          keep_last=2, meta={}, log=said.append)
    assert out is None
    assert len(said) == 1 and "global_step10 NOT saved" in said[0] and "global_step5" in said[0]
    assert "free disk space or lower train.keep_last" in said[0]
    assert {p: p.read_bytes() for p in prev.iterdir()} == before
    assert (root / "latest").read_text() == "global_step5" and not (root / "global_step10").exists()


def test_disk_estimate_before_the_first_checkpoint_counts_parameters(tmp_path):
    assert checkpoint.previous_checkpoint_bytes(tmp_path / "none") is None
    need, why = disk_space.estimate(1_000_000, None)
    assert need == int(1_000_000 * 16 * disk_space.MARGIN) and "parameters" in why


def test_disk_estimate_follows_a_model_that_grew(tmp_path):
    """The first save after an in-run growth holds the larger model: the previous checkpoint's size is scaled by
    the parameters (it was taken as is, and the disk filled up part-way through the save)."""
    root = tmp_path / "checkpoints"
    d = _tag(root, 5, nbytes=1000)
    checkpoint.write_manifest(d, {"step": 5, "params": 100})
    prev = checkpoint.previous_checkpoint_bytes(root)
    assert prev[0] == "global_step5" and prev[2] == 100
    grown, why = disk_space.estimate(250, prev)
    assert grown == int(prev[1] * 2.5 * disk_space.MARGIN) and "250 now" in why.replace(",", "")
    assert disk_space.estimate(100, prev)[0] == int(prev[1] * disk_space.MARGIN)
    older = (prev[0], prev[1], None)  # a manifest from before parameters were recorded: its size as it is
    assert disk_space.estimate(250, older)[0] == int(prev[1] * disk_space.MARGIN)


def test_leftovers_of_a_killed_save_do_not_block_the_next_one(tmp_path, monkeypatch):
    """A SIGKILL mid-save leaves .tmp-global_stepN: it is cleared before the free-space check (it used to count
    as used space, refusing every later save, and was only ever removed after a successful one)."""
    root = tmp_path / "checkpoints"
    _tag(root, 5, nbytes=1000)
    checkpoint.write_manifest(root / "global_step5", {"step": 5, "params": 10_100})  # _Engine's Linear(100, 100)
    stale = root / ".tmp-global_step10"
    stale.mkdir()
    (stale / "big.pt").write_bytes(b"x" * 5000)
    (root / ".latest.tmp-host-1-ab").write_text("global_step9")  # an interrupted atomic write
    free = lambda path: 3000 - sum(f.stat().st_size for f in root.rglob("*.pt"))  # noqa: E731
    monkeypatch.setattr(disk_space, "free_bytes", free)
    monkeypatch.setattr(disk_space, "SLACK", 0)
    with pytest.raises(AssertionError, match="must not be reached"):  # the check passed: the save began
        checkpoint.save(_Engine(), root, 10, {"global_batch": 4}, Dist(0, 1, 0, 1, torch.device("cpu")),
                        keep_last=2, meta={}, log=lambda m: None)
    assert not stale.exists() and not list(root.glob(".latest.tmp-*"))


def test_prune_removes_a_tag_in_one_rename(tmp_path, monkeypatch):
    """A kill during the delete leaves a hidden .del- dir that the next prune removes, never a global_stepN
    without its manifest (which no prune counted, so it stayed forever)."""
    for s in (1, 2, 3):
        _tag(tmp_path, s)
    real = checkpoint.shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda p, **k: None if ".del-" in str(p) else real(p, **k))
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step3")  # "killed" before the delete finished
    assert [t for _, t in checkpoint.tags_by_step(tmp_path)] == ["global_step3"]
    monkeypatch.undo()
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3"]


def test_prune_deletes_in_place_when_the_rename_fails(tmp_path, monkeypatch):
    """A rename that fails (a file system that refuses it) must not stop the run after a good save."""
    for s in (1, 2, 3):
        _tag(tmp_path, s)
    real = checkpoint.os.rename
    monkeypatch.setattr(checkpoint.os, "rename", lambda a, b: (_ for _ in ()).throw(OSError(16, "busy"))
                        if ".del-" in str(b) else real(a, b))
    checkpoint.prune(tmp_path, keep_last=1, protect="global_step3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3"]


def test_unreadable_checkpoint_file_is_a_reason_not_a_traceback(tmp_path):
    d = _tag(tmp_path, 5)
    (d / "w.pt").unlink()
    (d / "w.pt").mkdir()  # is_file() is False: "missing"; now a file that vanishes between listing and reading:
    (d / "w.pt").rmdir()
    (d / "w.pt").symlink_to(tmp_path / "nowhere")
    assert "is missing" in checkpoint.verify(d)
    _tag(tmp_path, 6)
    import os
    os.chmod(tmp_path / "global_step6" / "w.pt", 0)
    if os.access(tmp_path / "global_step6" / "w.pt", os.R_OK):  # root reads anything: simulate EIO instead
        real_open = open

        def failing_open(path, *a, **k):
            if str(path).endswith("global_step6/w.pt"):
                raise OSError(5, "Input/output error")
            return real_open(path, *a, **k)
        import builtins
        builtins.open, restore = failing_open, real_open
        try:
            why = checkpoint.verify(tmp_path / "global_step6")
        finally:
            builtins.open = restore
    else:
        why = checkpoint.verify(tmp_path / "global_step6")
    assert "cannot be read" in why


# ---- NaN guard --------------------------------------------------------------------------------------------

class _Sched:
    def __init__(self):
        self.steps_done = 0

    def step(self):
        self.steps_done += 1


class _FakeEngine:
    """ZeRO-0 fp32 as DeepSpeed runs it: the engine steps the torch optimizer itself and reports no norm."""

    def __init__(self):
        self.module = torch.nn.Linear(4, 4)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1, fused=True)
        self.lr_scheduler = _Sched()
        self._step_applied = True

    def get_global_grad_norm(self):
        return None

    def step(self):
        self.optimizer.step()
        self.lr_scheduler.step()


def test_guard_skips_a_non_finite_update_and_aborts_after_max_skipped(monkeypatch):
    monkeypatch.setenv("SCALETRAIN_INJECT_NAN_AT_STEP", "2")
    eng = _FakeEngine()
    norm = [1.0]
    g = StepGuard(eng, max_skipped=2, rank=0, norm_fallback=lambda: norm[0], log=lambda m: None)
    assert torch.isnan(g.inject(torch.tensor(1.0), 2, 0)) and g.inject(torch.tensor(1.0), 3, 0) == 1.0
    assert StepGuard(eng, 2, rank=1, norm_fallback=lambda: 1.0).inject(torch.tensor(1.0), 2, 0) == 1.0  # rank 0 only

    def step(loss, grad_value):
        eng.module.weight.grad = torch.full_like(eng.module.weight, grad_value)
        eng.module.bias.grad = torch.full_like(eng.module.bias, grad_value)
        norm[0] = grad_value
        g.before_update(eng, loss)
        eng.step()
        return g.after_update(eng.lr_scheduler.steps_done, loss)

    assert step(1.0, 0.5) is False
    w, state = eng.module.weight.detach().clone(), {k: v.clone() for k, v in eng.optimizer.state[eng.module.weight].items()}
    assert step(math.nan, 0.5) is True  # bad loss, finite gradient: still skipped
    assert torch.equal(eng.module.weight, w)
    assert all(torch.equal(eng.optimizer.state[eng.module.weight][k], v) for k, v in state.items())
    assert step(1.0, 0.5) is False and g.consecutive == 0 and g.total == 1
    assert step(1.0, math.inf) is True  # bad gradient norm
    with pytest.raises(UserError, match="train.max_skipped=2"):
        step(math.nan, math.nan)
    assert g.total == 3 and eng.lr_scheduler.steps_done == 5  # skipped steps keep their lr-schedule slot
    # fp16: a finite loss with an overflowing gradient is the loss scaler's routine, never divergence
    eng.fp16_enabled = lambda: True
    g.consecutive = 0
    for _ in range(5):
        assert step(1.0, math.inf) is True
    assert g.consecutive == 0 and g.total == 8
    assert step(math.nan, 0.5) is True and g.consecutive == 1  # a non-finite loss still counts


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """python, numpy and torch generators resume exactly; the file passes the checkpoint safety check."""
    import random

    import numpy as np

    from scaletrain.train import rng
    from scaletrain.train.safe_load import check_file

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # mid-stream, gaussian cache filled
    torch.save(rng.capture(), tmp_path / "rng_rank0.pt")
    want = (random.random(), np.random.normal(), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    check_file(tmp_path / "rng_rank0.pt")
    rng.restore(torch.load(tmp_path / "rng_rank0.pt", weights_only=True))
    assert (random.random(), np.random.normal(), float(torch.rand(1))) == want
    # a checkpoint from before python/numpy states were saved: its torch state is restored, the others left alone
    torch.manual_seed(4)
    old_torch = torch.get_rng_state()
    expect_torch = float(torch.rand(1))
    py_next = random.getstate()
    rng.restore({"torch": old_torch})
    assert float(torch.rand(1)) == expect_torch and random.getstate() == py_next


def test_damaged_manifest_and_latest_are_reasons_not_exceptions(tmp_path):
    """A manifest entry without its size, a manifest that is not a mapping, a `latest` that is not text: each
    checkpoint is skipped with a reason and the newest good one is found (a traceback would hang the other ranks)."""
    import json

    good, no_size, listed = _tag(tmp_path, 1), _tag(tmp_path, 2), _tag(tmp_path, 3)
    m = json.loads((no_size / checkpoint.MANIFEST).read_text())
    del m["files"]["w.pt"]["bytes"]
    (no_size / checkpoint.MANIFEST).write_text(json.dumps(m))
    (listed / checkpoint.MANIFEST).write_text("[1, 2]")
    (tmp_path / "latest").write_bytes(b"\xff\xfeglobal_step3")
    said = []
    assert checkpoint.find_resumable(tmp_path, log=said.append) == good.name
    assert len(said) == 2 and all("not a valid manifest" in line for line in said), said



def test_growth_boundary_without_room_for_the_parent_checkpoint_is_one_line():
    """The child is grown from the parent's checkpoint files: when the disk check skipped that save, the boundary
    stops with the reason instead of opening a checkpoint that does not exist."""
    from types import SimpleNamespace

    from scaletrain.growth import in_run

    trainer = SimpleNamespace(step=40, saved_step=20, dist=None, save=lambda: None, log=print)
    with pytest.raises(UserError, match="could not be written.*resumes from step 20"):
        in_run.grow(trainer, metrics=None)


def test_verify_hashes_an_unchanged_tag_once_and_a_changed_one_again(tmp_path, monkeypatch):
    """init.from is opened several times per start: a big checkpoint is hashed once per process. A file
    rewritten since (new mtime) is hashed again and caught; a just-written tag is never remembered."""
    import os

    tag = _tag(tmp_path, 7)
    hashed = []
    from scaletrain import manifest

    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert checkpoint.verify(tag) is None and checkpoint.verify(tag) is None
    assert hashed == ["w.pt", "w.pt"], "files written within the last second are not remembered"
    old = 1_000_000_000
    for p in tag.iterdir():
        os.utime(p, ns=(old, old))
    hashed.clear()
    assert checkpoint.verify(tag) is None and checkpoint.verify(tag) is None
    assert hashed == ["w.pt"]
    (tag / "w.pt").write_bytes(b"z" * 10)  # same size, new mtime
    assert "does not match" in checkpoint.verify(tag)


def test_a_resume_with_another_tokenizer_is_refused(tmp_path):
    """The run dir's tokenizer copy is what export/eval/generate use: a resume whose data now gets another
    tokenizer (data.source changed, data.tokenizer unset: a new one is trained) is refused with the fix; a
    copy left by a start that saved nothing is replaced. (Rank 0 checks it alone; test_main_rank_does.py shows its
    error reaching every rank.)"""
    from scaletrain.train.run_lineage import check_tokenizer

    run, cache = tmp_path / "run", tmp_path / "cache"
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.model").write_bytes(b"the run's pieces")
    cache.mkdir()
    (cache / "tokenizer.model").write_bytes(b"the run's pieces")
    check_tokenizer(run, cache / "tokenizer.model", resuming=True)  # the same: fine
    (cache / "tokenizer.model").write_bytes(b"other pieces")
    with pytest.raises(UserError, match=rf"another tokenizer .* data.tokenizer={run / 'tokenizer' / 'tokenizer.model'}"):
        check_tokenizer(run, cache / "tokenizer.model", resuming=True)
    assert (run / "tokenizer" / "tokenizer.model").read_bytes() == b"the run's pieces"
    check_tokenizer(run, cache / "tokenizer.model", resuming=False)
    assert not (run / "tokenizer").exists()


@pytest.mark.parametrize("named", ["unset", "the HF dir itself", "a file inside it"])
def test_a_fine_tune_resumes_after_its_init_from_source_is_gone(tmp_path, named):
    """init.from was deleted (a purged scratch dir); the run has its own checkpoint and tokenizer copy: the start
    warns and takes the run's tokenizer, whether data.tokenizer was unset or named the source's (as the run's
    config.yaml does: an HF dir itself, or a file under a checkpoint dir)."""
    from scaletrain.train.init_from import resolve

    base, run = tmp_path / "base", tmp_path / "run"
    (run / "checkpoints" / "global_step4").mkdir(parents=True)
    (run / "checkpoints" / "global_step4" / "manifest.json").write_text("{}")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    tok = {"unset": [], "the HF dir itself": [f"data.tokenizer={base}"],
           "a file inside it": [f"data.tokenizer={base / 'tokenizer' / 'tokenizer.model'}"]}[named]
    cfg = load_config(TINY_YAML, [f"init.from={base}", f"run.dir={run}", *tok])
    said = []
    out = resolve(cfg, warn=said.append)
    assert out.data.tokenizer == str((run / "tokenizer").resolve())
    assert len(said) == 1 and "resuming" in said[0] and "from its own checkpoints" in said[0]
    (run / "checkpoints" / "global_step4" / "manifest.json").unlink()  # nothing saved yet: the source is needed
    with pytest.raises(UserError, match="init.from"):
        resolve(cfg, warn=said.append)


def test_one_process_opens_a_tag_s_lock_file_once_however_many_readers_it_has(tmp_path):
    """A child run's rank 0 pins init.from's tag, then loads and records it through more readers: under NFS's POSIX
    locks, closing a second descriptor of reading.lock dropped the pin's lock too."""
    from scaletrain import tag_lock

    tag = _tag(tmp_path, 1)
    (tag / tag_lock.READ_LOCK).touch()
    pin, load = tag_lock.read_lock(tag), tag_lock.read_lock(tag)
    assert len(tag_lock._HELD) == 1 and next(iter(tag_lock._HELD.values()))[1] == 2
    load.release()
    assert tag_lock.lock_to_delete(tag) == (False, None)  # the pin still holds it
    pin.release()
    assert not tag_lock._HELD
    free, fd = tag_lock.lock_to_delete(tag)
    assert free and fd is not None
    os.close(fd)
