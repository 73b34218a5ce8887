#!/usr/bin/env python
"""Kill test: SIGKILL a multi-rank training run K times at random moments (some of them while a checkpoint
is being written), resume it each time, and require the per-step loss curve to equal an uninterrupted
run's, bit for bit (CPU, fp32).

    PYTHONPATH=. python scripts/crash_test.py --kills 20            # the README figure
    PYTHONPATH=. python scripts/crash_test.py --kills 5 --steps 24  # what the test suite runs

Ranks are started by scripts/local_ranks.py (one process each, RANK/WORLD_SIZE/MASTER_* in the env, as a
launcher or srun sets them) inside a process group of their own, and the whole group is SIGKILLed: no
handler, no flush, no cleanup runs. Kill moments, drawn from --seed:
  save    as soon as a `.tmp-global_step*` dir appears (a checkpoint is being written), plus 0-40 ms
          (0-5 ms until one kill has landed inside a save: the test's tiny model can write a checkpoint in
          less than 40 ms, and a kill after the rename tears nothing);
  train   uniformly within 2/K of the uninterrupted run's training time, once the run is training;
  start   uniformly within the start-up (DeepSpeed init, data, engine build).
After each kill the newest checkpoint must verify; the next start resumes from it. Loss values are read
back from TensorBoard with EventAccumulator: a killed run's event file holds steps past its last
checkpoint, and the resumed run's SummaryWriter(purge_step=...) makes the reader drop them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=172", "model.vocab_size=512", "model.max_seq_len=128",
    "train.seq_len=64", "train.micro_batch_size=2", "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr=1e-3",
    "train.log_every=1", "train.eval_every=0", "train.precision=fp32",
]


def start(ranks: int, overrides: list[str], env_extra: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """All ranks under one launcher (scripts/local_ranks.py) in a new session: one process group to kill."""
    # CPU ranks in fp32 (bitwise comparisons), also on a machine with GPUs: CUDA hidden, DeepSpeed's CPU accelerator
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               **(env_extra or {}))
    out = open(log_path, "a") if log_path else subprocess.DEVNULL
    train = ["launch/train.py", "--config", "configs/tiny.yaml", "--set", *overrides]
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "local_ranks.py"), str(ranks), *train],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def loss_curve(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def run_to_end(ranks: int, overrides: list[str], log_path: Path, timeout: float = 600) -> float:
    t0 = time.time()
    proc = start(ranks, overrides, log_path=log_path)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    if rc != 0:
        raise RuntimeError(f"training failed (rc={rc}); see {log_path}")
    return time.time() - t0


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _saving_since(ckpts: Path, t0: float) -> list[str]:
    """Temp dirs of a save this start began (a torn save of an earlier start leaves one behind until the next
    save completes: by name alone the kill would land mid-training and be counted as one during a save)."""
    found = []
    for p in ckpts.glob(".tmp-global_step*"):
        try:
            if p.stat().st_mtime >= t0:
                found.append(p.name)
        except OSError:  # removed meanwhile
            pass
    return found


def _one_kill(ranks, overrides, run_dir: Path, mode: str, rng: random.Random, train_secs: float, log_path: Path,
              startup_secs: float, save_delay: float) -> dict:
    ckpts = run_dir / "checkpoints"
    t0 = time.time()
    proc = start(ranks, overrides, log_path=log_path)
    before = _status(run_dir).get("pid")  # rank 0's pid: changes when this start reaches the training loop
    event = {"mode": mode, "killed": False}
    try:
        if mode == "start":
            time.sleep(rng.uniform(0, startup_secs))
        else:
            while proc.poll() is None:  # wait until this start is training (fit writes state=running)
                s = _status(run_dir)
                if s.get("state") == "running" and s.get("pid") != before:
                    break
                time.sleep(0.02)
            if mode == "train":
                time.sleep(rng.uniform(0, train_secs))
            else:
                while proc.poll() is None and not _saving_since(ckpts, t0):
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, save_delay))
                event["saving"] = _saving_since(ckpts, t0)
        event["killed"] = proc.poll() is None
    finally:
        kill_group(proc)
    from scaletrain.train.checkpoint import find_resumable, verify

    tag = find_resumable(ckpts, log=lambda m: None) if ckpts.is_dir() else None
    latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None
    if latest is not None and verify(ckpts / latest) is not None:
        raise AssertionError(f"after a kill `latest` names {latest}, which does not verify: {verify(ckpts / latest)}")
    event.update(after_s=round(time.time() - t0, 2), resumable=tag)
    return event


def crash_run(run_dir: Path, ranks: int, overrides: list[str], kills: int, seed: int, train_secs: float, log=print,
              startup_secs: float = 8.0) -> list[dict]:
    """Kill the run `kills` times (a run that finished before its kill ends the series early), then finish it.
    `train_secs`: how long the uninterrupted run trained; a `train` kill lands within 2/kills of it, so the
    series rarely finishes the run before its last kill. `startup_secs`: how long a start takes to begin
    training (a `start` kill lands within it)."""
    rng = random.Random(seed)
    train_secs = 2 * train_secs / max(1, kills)
    modes = ["save", "train", "save", "start", "train"]
    events = []
    log_path = run_dir.parent / f"{run_dir.name}.log"
    for i in range(kills):
        mode = modes[i % len(modes)] if i < len(modes) else rng.choice(["save", "save", "train", "start"])
        tore_a_save = any(e["killed"] and e.get("saving") for e in events)
        ev = _one_kill(ranks, overrides, run_dir, mode, rng, train_secs, log_path, startup_secs,
                       save_delay=0.04 if tore_a_save else 0.005)
        events.append(ev)
        log(f"kill {i + 1}/{kills}: {ev}")
        if not ev["killed"]:
            if _status(run_dir).get("state") == "finished":
                log("the run finished before this kill; no more kills")
                break
    run_to_end(ranks, overrides, log_path)
    return events


def compare(expected: dict[int, float], got: dict[int, float]) -> tuple[bool, str]:
    if sorted(got) != sorted(expected):
        return False, f"steps differ: missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}"
    diff = [s for s in expected if got[s] != expected[s]]
    if diff:
        s = diff[0]
        return False, f"{len(diff)} step(s) differ, first at step {s}: {got[s]!r} vs {expected[s]!r}"
    return True, f"all {len(expected)} steps bit-identical"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scaletrain-crash-test"))
    ap.add_argument("--reference", type=Path, default=None, help="an uninterrupted run dir of the same settings to compare with")
    args = ap.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    from scaletrain.data.sources import write_stdlib_sample

    corpus = write_stdlib_sample(work / "corpus")
    common = [*TINY, f"data.source={corpus}", f"data.cache_dir={work / 'cache'}", f"zero.stage={args.stage}",
              f"train.max_steps={args.steps}", f"train.save_every={args.save_every}", "train.keep_last=2"]
    ref = args.reference
    t0 = time.time()
    wall = None
    if ref is None:
        ref = work / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        wall = run_to_end(args.ranks, [*common, f"run.dir={ref}"], work / "reference.log")
    s = _status(ref)
    train_secs = max(1.0, float(s.get("seconds", 10)))
    startup_secs = max(1.0, wall - train_secs) if wall is not None else 8.0  # the reference's start-up + teardown
    crashed = work / "crashed"
    shutil.rmtree(crashed, ignore_errors=True)
    (work / "crashed.log").unlink(missing_ok=True)
    events = crash_run(crashed, args.ranks, [*common, f"run.dir={crashed}"], args.kills, args.seed, train_secs,
                       startup_secs=startup_secs)
    ok, msg = compare(loss_curve(ref), loss_curve(crashed))
    killed = sum(e["killed"] for e in events)
    in_save = sum(1 for e in events if e["killed"] and e.get("saving"))
    summary = {"ok": ok, "detail": msg, "kills": killed, "kills_during_save": in_save, "ranks": args.ranks,
               "zero_stage": args.stage, "steps": args.steps, "seconds": round(time.time() - t0)}
    print(("PASS: " if ok else "FAIL: ") + json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
