"""A real SLURM cluster (scripts/local_slurm.sh: munge + slurmctld + slurmd on this machine, CPU node).

1. `scaletrain submit` a 2-rank CPU job, `scancel --signal=USR1 --batch` it mid-run: the trainer checkpoints
   and exits 0, the batch script requeues the job, the requeued job resumes from the checkpoint and finishes
   at max_steps; one continuous loss curve in TensorBoard.
2. Time-limit walk (srun mode): a 3-minute limit (longer on a busy machine) with `--signal=B:USR1@60` cuts every allocation short; the job
   checkpoints, requeues itself and resumes until max_steps.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from cluster_utils import REPO, VENV, ensure_tools, log, rank_env, require_root, script
from launch_utils import TINY, small_corpus, wait_for

TOKENS_PER_STEP = 2 * 2 * 64   # ranks x micro_batch x seq_len
SPEED: dict[str, float] = {}   # steps/s measured by the first test, sizes the walk


@pytest.fixture(scope="module")
def slurm():
    """scripts/local_slurm.sh up; in the finalizer cancel this module's jobs (by id) and, when the daemons
    were not running before, scripts/local_slurm.sh down (also when `up` failed half-way)."""
    require_root("SLURM test")
    ensure_tools(["sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munge"], "SLURM test")
    was_up = script("local_slurm.sh", "status").returncode == 0
    jobs: list[str] = []
    try:
        t0 = time.time()
        script("local_slurm.sh", "up")
        log(f"local_slurm.sh up: {time.time() - t0:.1f} s")
        yield jobs
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
        if not was_up:
            script("local_slurm.sh", "down")
            log("local_slurm.sh down")


def submit(jobs: list[str], tmp: Path, max_steps: int, *flags: str) -> tuple[str, Path]:
    corpus = small_corpus(tmp / "corpus")
    run_dir = tmp / "run"
    cmd = [str(VENV / "bin" / "python"), "-m", "scaletrain.cli", "submit", "--config", "configs/tiny.yaml", "--set", *TINY,
           f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}", f"run.dir={run_dir}", "train.precision=fp32",
           f"train.max_steps={max_steps}", "--gpus-per-node", "0", "--ranks-per-node", "2", "--python", str(VENV), *flags]
    # sbatch exports this environment to the job: the ranks get the same PATH and op build dir as the prebuild.
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    jobs.append(m[1])
    assert f"run dir:     {run_dir}" in proc.stdout and f"tensorboard --logdir {tmp}" in proc.stdout, proc.stdout
    assert (run_dir / "submit.sbatch").is_file()
    return m[1], run_dir


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"Restarts=(\d+)", out)
    assert m, out
    return int(m[1])


def log_text(run_dir: Path, job: str) -> str:
    p = run_dir / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def tb_events(run_dir: Path, tag: str) -> list:
    """Every event TensorBoard's reader keeps for `tag` (events purged by a resume are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tb").is_dir():
        return []
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


def check_curve(run_dir: Path, max_steps: int, resumed_at: list[int]) -> dict[int, float]:
    """Steps 1..max_steps exactly once, the data position exact at every step, no loss jump at a resume."""
    loss = tb_events(run_dir, "train/loss")
    steps = [e.step for e in loss]
    assert steps == list(range(1, max_steps + 1)), f"steps in TensorBoard: {steps}"
    tokens = [(e.step, e.value) for e in tb_events(run_dir, "train/consumed_tokens")]
    assert tokens == [(s, s * TOKENS_PER_STEP) for s in range(1, max_steps + 1)]
    values = {e.step: e.value for e in loss}
    assert values[max_steps] < values[1] - 0.5, values
    for k in resumed_at:   # a restart from scratch would jump back towards ln(vocab) (checked once it fell)
        if values[1] - values[k] > 1.0:
            assert abs(values[k + 1] - values[k]) < 0.5 * (values[1] - values[k]), f"loss jumps at the resume after step {k}"
    return values


def requeue_gaps(text: str) -> list[int]:
    """Seconds from each `requeueing` line of the batch script to the next start's first line (SLURM's part)."""
    stamps = re.findall(r"^\[scaletrain (\d\d):(\d\d):(\d\d) job \d+ restart (\d+)\] (requeueing|nodes:)", text, re.M)
    secs = [(int(h) * 3600 + int(m) * 60 + int(s), what) for h, m, s, _, what in stamps]
    return [(b - a) % 86400 for (a, wa), (b, wb) in zip(secs, secs[1:]) if wa == "requeueing" and wb == "nodes:"]


def runs_json(run_dir: Path) -> dict:
    proc = subprocess.run([str(VENV / "bin" / "python"), "-m", "scaletrain.cli", "runs", str(run_dir), "--json"],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (info,) = json.loads(proc.stdout)
    return info


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    max_steps = 300
    t0 = time.time()
    job, run_dir = submit(slurm, tmp_path, max_steps, "--time", "00:10:00")
    out = lambda: log_text(run_dir, job)  # noqa: E731

    # Mid-run: signal as soon as the trainer says "running" (the batch script would wait for that itself), so
    # the stop lands within the first steps however fast or slow this machine is.
    assert wait_for(lambda: status(run_dir).get("state") == "running" or not in_queue(job), timeout=900, interval=0.2), \
        f"job {job} did not start training:\n{out()[-4000:]}"
    assert in_queue(job), f"job {job} ended before it could be signalled:\n{out()[-4000:]}"
    t_running = time.time() - t0
    SPEED["startup_s"] = t_running
    info = runs_json(run_dir)
    assert (info["state"], info["slurm_job_id"]) == ("running", job), info   # live pids on this host
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)

    # Requeued: the same job runs again (SLURM_RESTART_COUNT=1 reaches the trainer) and finishes.
    assert wait_for(lambda: status(run_dir).get("slurm_restart_count", 0) >= 1, timeout=900, interval=0.2), \
        f"job {job} was not requeued/restarted:\n{out()[-4000:]}"
    t_restarted = time.time() - t_signal
    assert wait_for(lambda: status(run_dir).get("state") == "finished" and not in_queue(job), timeout=900, interval=0.5), \
        f"job {job} did not finish after the requeue:\n{out()[-4000:]}"
    t_total = time.time() - t0

    text = out()
    assert "got SIGUSR1" in text and "requeueing" in text, text[-4000:]
    m = re.search(r"stop requested by signal: checkpointed at step (\d+)", text)
    assert m, text[-4000:]
    stopped = int(m[1])
    assert 1 <= stopped < max_steps
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{stopped}'} at step {stopped}" in text, text[-4000:]
    assert "state=finished" in text
    assert restarts(job) >= 1
    st = status(run_dir)
    assert (st["step"], st["slurm_job_id"], st["slurm_restart_count"]) == (max_steps, job, 1), st
    loss = tb_events(run_dir, "train/loss")
    seg = [e for e in loss if e.step > stopped + 1]
    SPEED["steps_per_s"] = (seg[-1].step - seg[0].step) / max(seg[-1].wall_time - seg[0].wall_time, 1e-3)
    check_curve(run_dir, max_steps, [stopped])
    # The same training without SLURM and without interruption (same 2 ranks on this node): bit for bit.
    t_ref0 = time.time()
    ref = tmp_path / "ref"
    args = (run_dir / "submit.sbatch").read_text().split("TRAIN=(", 1)[1].split(")\n", 1)[0].split()
    args = [a if not a.startswith("run.dir=") else f"run.dir={ref}" for a in args]
    proc = subprocess.run([str(VENV / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", str(29000 + int(job) % 500), *args],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = [(e.step, e.value) for e in tb_events(ref, "train/loss")]
    assert [(e.step, e.value) for e in loss] == expected, "requeued run's loss curve differs from the uninterrupted run's"
    t_ref = time.time() - t_ref0

    info = runs_json(run_dir)
    assert (info["state"], info["step"], info["checkpoint"], info["slurm_job_id"], info["slurm_restart_count"]) == \
        ("finished", max_steps, f"global_step{max_steps}", job, 1), info
    log(f"USR1 test: submit -> training {t_running:.1f} s; scancel -> requeued job training again {t_restarted:.1f} s "
        f"(requeue -> restart by SLURM: {requeue_gaps(text)} s); stopped at step {stopped}; total {t_total:.1f} s; "
        f"{SPEED['steps_per_s']:.1f} steps/s; uninterrupted reference run {t_ref:.1f} s, identical curve")


def test_time_limit_walk_requeues_until_max_steps(slurm, tmp_path):
    """A time limit shorter than the training, srun mode, `--grace 60`. SLURM sends the warning signal up to one
    check period early (sbatch(1): "up to 60 seconds earlier"; slurmctld checks once a minute here), so USR1
    arrives 60-120 s before the limit and the job checkpoints, requeues itself and resumes, allocation after
    allocation, until max_steps. On a quiet machine the limit is 3 minutes; it grows with the start-up time
    measured above (a busy machine) so that every allocation still trains >= 30 s. max_steps is ~1.25
    allocations' worth of training at the measured speed: one allocation cannot hold it, two usually do."""
    rate, startup = SPEED.get("steps_per_s", 10.0), SPEED.get("startup_s", 30.0)
    limit = max(180, 60 * math.ceil((150 + startup) / 60))   # >= 30 s of training in every allocation
    max_steps = int(min(max(rate * (limit - 60 - startup) * 1.25, 200), 20000))
    t0 = time.time()
    job, run_dir = submit(slurm, tmp_path, max_steps, "--time", f"00:{limit // 60:02d}:00", "--grace", "60", "--mode", "srun")
    assert wait_for(lambda: status(run_dir).get("state") == "finished" and not in_queue(job), timeout=4 * limit + 300, interval=1), \
        f"walk did not finish in {4 * limit + 300} s (max_steps {max_steps}, status {status(run_dir)}):\n{log_text(run_dir, job)[-4000:]}"
    t_total = time.time() - t0
    text = log_text(run_dir, job)
    stops = [int(s) for s in re.findall(r"stop requested by signal: checkpointed at step (\d+)", text)]
    assert stops, f"never stopped by the time limit (finished within one allocation?):\n{text[-4000:]}"
    n = restarts(job)
    assert n == len(stops) >= 1 and status(run_dir)["slurm_restart_count"] == n, (n, stops, status(run_dir))
    for k in stops:
        assert f"resumed from {run_dir / 'checkpoints' / f'global_step{k}'} at step {k}" in text
    assert "DUE TO TIME LIMIT" not in text   # every allocation ended by our own requeue, never killed by the limit
    check_curve(run_dir, max_steps, stops)
    log(f"walk: --time {limit // 60} min, {max_steps} steps, {n} time-limit requeue(s) at steps {stops} (requeue -> restart: "
        f"{requeue_gaps(text)} s), total {t_total:.1f} s")


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_plain_scancel_checkpoints_and_ends(slurm, tmp_path, mode):
    """Plain `scancel` (SIGTERM to every process of the job, SIGKILL KillWait seconds later): the ranks
    checkpoint and the job ends without a requeue. The one-node runner (deepspeed mode) and the srun task
    used to die of the TERM at once, ending the step while the ranks were still saving: SLURM kills what is
    left of a step when it ends."""
    job, run_dir = submit(slurm, tmp_path, 100000, "--time", "00:10:00", "--mode", mode)
    assert wait_for(lambda: status(run_dir).get("state") == "running" or not in_queue(job), timeout=900, interval=0.2), \
        f"job {job} did not start training:\n{log_text(run_dir, job)[-4000:]}"
    assert wait_for(lambda: len(tb_events(run_dir, "train/loss")) >= 3, timeout=300, interval=0.5)  # a few steps in
    t0 = time.time()
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert wait_for(lambda: not in_queue(job), timeout=300, interval=0.5)
    text = log_text(run_dir, job)
    m = re.search(r"stop requested by signal: checkpointed at step (\d+)", text)
    assert m and status(run_dir).get("state") == "preempted", f"{status(run_dir)}\n{text[-4000:]}"
    step = int(m[1])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{step}"
    assert "got SIGTERM" in text and "requeueing" not in text and restarts(job) == 0, text[-4000:]
    # The batch shell waited for DeepSpeed's launcher, which waits for the ranks' save (a tiny model saves before
    # SLURM's clean-up reaches it either way; a large one did not): the runner did not die of the TERM (143).
    m = re.search(r"training exited with code (\d+), state=(\w+)", text)
    assert m and m[1] != "143" and m[2] == "preempted", text[-4000:]
    assert "Main process received SIGTERM" in text[: m.start()], text[-4000:]   # the launcher's last word came first
    log(f"plain scancel ({mode} mode): checkpointed at step {step}, job gone {time.time() - t0:.1f} s after scancel")
