"""`scaletrain runs` and `scaletrain submit` through the real CLI, without daemons: synthetic run dirs (live,
crashed, remote, preempted SLURM, finished with TensorBoard events) and stand-in sbatch/scontrol executables.
The real SLURM and multi-node runs are in tests/cluster (SCALETRAIN_CLUSTER_TESTS=1)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_utils import REPO

TINY_YAML = str(REPO / "configs" / "tiny.yaml")


def cli(*args: str, path: str | None = None, cwd: Path = REPO) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if path is not None:
        env["PATH"] = path
    p = subprocess.run([sys.executable, "-m", "scaletrain.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


# ---- scaletrain runs -----------------------------------------------------------------------------------


def _run(root: Path, name: str, status: dict | None, pids: dict[int, int] | None = None, tag: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("run:\n  dir: x\n")
    if status is not None:
        (d / "status.json").write_text(json.dumps(status))
    for rank, pid in (pids or {}).items():
        (d / "pids").mkdir(exist_ok=True)
        (d / "pids" / f"rank{rank}.pid").write_text(str(pid))
    if tag:
        (d / "checkpoints" / tag).mkdir(parents=True)
        (d / "checkpoints" / tag / "manifest.json").write_text("{}")
        (d / "checkpoints" / "latest").write_text(tag)
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    here = socket.gethostname()
    done = _run(root, "done", {"state": "finished", "step": 20, "max_steps": 20, "loss": 4.5, "host": here}, tag="global_step20")
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(done / "tb"))
    for s in range(1, 21):
        w.add_scalar("train/loss", 6.0 - s * 0.05, s)
        w.add_scalar("train/tokens_per_sec", 1000.0 + s, s)
    w.close()
    os.utime(done / "status.json")  # written after the last event, like the trainer's final status
    _run(root, "live", {"state": "running", "step": 3, "max_steps": 50, "host": here}, pids={0: os.getpid()})
    _run(root, "dead", {"state": "running", "step": 3, "max_steps": 50, "host": here}, pids={0: _dead_pid(), 1: _dead_pid()})
    remote = _run(root, "remote", {"state": "running", "step": 7, "max_steps": 50, "host": "some-other-node"})
    old = time.time() - 3600
    os.utime(remote / "status.json", (old, old))
    _run(root, "proj/slurm", {"state": "preempted", "step": 40, "max_steps": 100, "loss": 5.0, "host": "node7",
                              "slurm_job_id": "77", "slurm_restart_count": 2}, tag="global_step40")
    nan = _run(root, "proj/nan", {"state": "preempted", "step": 0, "max_steps": 9, "loss": float("nan")},  # older versions wrote NaN
               tag="global_step4")
    (nan / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")  # garbled: not even text; the tags decide
    hostfile_only = _run(root, "proj/multinode", {"state": "finished", "step": 9, "max_steps": 9})
    (hostfile_only / "slurm-123.hostfile").write_text("n1 slots=1\n")
    (root / "proj" / "not-a-run").mkdir()
    queued = root / "proj" / "queued"  # `scaletrain submit` wrote it; the job has not started yet
    queued.mkdir()
    (queued / "submit.sbatch").write_text("#!/bin/bash\n")
    (queued / "submitted.json").write_text(json.dumps({"job": "88", "script": str(queued / "submit.sbatch")}))
    return root


def _no_controller(tmp: Path) -> str:
    """PATH whose squeue cannot reach a controller (as where SLURM is installed but not running)."""
    fake = _fake_bin(tmp, squeue='echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1')
    return fake + ":" + os.environ["PATH"]


def test_runs_json_states(runs_root, tmp_path):
    rc, out, err = cli("runs", str(runs_root), "--json", path=_no_controller(tmp_path))
    assert rc == 0, err
    strict = json.loads(out, parse_constant=lambda c: pytest.fail(f"runs --json wrote {c}, which is not JSON"))
    info = {Path(i["run"]).relative_to(runs_root).as_posix(): i for i in strict}
    assert sorted(info) == ["dead", "done", "live", "proj/multinode", "proj/nan", "proj/queued", "proj/slurm", "remote"]
    assert (info["proj/nan"]["loss"], info["proj/nan"]["checkpoint"]) == (None, "global_step4")
    assert (info["proj/queued"]["state"], info["proj/queued"]["slurm_job_id"]) == ("submitted", "88")
    d = info["done"]
    assert (d["state"], d["step"], d["max_steps"], d["loss"], d["checkpoint"]) == ("finished", 20, 20, 4.5, "global_step20")
    assert d["tokens_per_sec"] == pytest.approx(1020.0)
    assert info["live"]["state"] == "running"        # its pid (this test process) is alive
    assert info["dead"]["state"] == "crashed"        # says running, no rank alive
    assert info["dead"]["written_state"] == "running"
    assert info["remote"]["state"] == "stale"        # other host, silent for an hour
    s = info["proj/slurm"]
    assert (s["state"], s["slurm_job_id"], s["slurm_restart_count"], s["checkpoint"]) == ("preempted", "77", 2, "global_step40")
    assert info["proj/multinode"]["slurm_job_id"] == "123"   # from the batch script's hostfile


def test_runs_table_and_single_run_dir(runs_root, tmp_path):
    rc, out, err = cli("runs", str(runs_root), path=_no_controller(tmp_path))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "STATE", "STEP", "LOSS", "TOK/S", "CHECKPOINT", "SLURM", "UPDATED"]
    row = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert row["done"][1:6] == ["finished", "20/20", "4.5000", "1,020", "global_step20"]
    assert row["proj/slurm"][1:7] == ["preempted", "40/100", "5.0000", "-", "global_step40", "77"] and "r2" in row["proj/slurm"]
    assert row["dead"][1] == "crashed"
    rc, out, _ = cli("runs", str(runs_root / "done"))
    assert rc == 0 and len(out.splitlines()) == 2 and "finished" in out


def test_runs_asks_squeue_about_every_job_it_shows(tmp_path):
    """The queue decides what a stale status cannot: a job SLURM requeued by itself waits (not crashed), a new
    submission of an ended run is queued, and a submission SLURM no longer lists never started."""
    here = socket.gethostname()
    root = tmp_path / "runs"
    _run(root, "requeued", {"state": "running", "step": 5, "max_steps": 9, "host": here, "slurm_job_id": "55"},
         pids={0: _dead_pid()})
    again = _run(root, "again", {"state": "finished", "step": 9, "max_steps": 9, "host": here, "slurm_job_id": "60"})
    old = time.time() - 60
    os.utime(again / "status.json", (old, old))
    (again / "submitted.json").write_text(json.dumps({"job": "66"}))  # newer than status.json: not started yet
    gone = _run(root, "gone", None)
    (gone / "submitted.json").write_text(json.dumps({"job": "88"}))
    # says running on another node, SLURM no longer lists its job (killed at its time limit, OOM): crashed
    _run(root, "ended", {"state": "running", "step": 5, "max_steps": 9, "host": "node9", "slurm_job_id": "91"})
    squeue = _fake_bin(tmp_path, squeue='echo "$3" > "$(dirname "$0")/asked"; echo "55 PENDING"; echo "66 PENDING"')
    rc, out, err = cli("runs", str(root), "--json", path=squeue + ":" + os.environ["PATH"])
    assert rc == 0, err
    info = {Path(i["run"]).name: i for i in json.loads(out)}
    assert (tmp_path / "bin" / "asked").read_text().split() == ["55,66,88,91"]
    assert (info["requeued"]["state"], info["requeued"]["slurm_state"]) == ("requeued", "PENDING")
    assert (info["again"]["state"], info["again"]["slurm_job_id"], info["again"]["slurm_state"]) == ("submitted", "66", "PENDING")
    assert (info["gone"]["state"], info["gone"]["slurm_job_id"]) == ("dropped", "88")
    assert (info["ended"]["state"], info["ended"]["slurm_state"]) == ("crashed", None)


def test_runs_bad_and_empty_dirs(tmp_path):
    one_line_error(*cli("runs", str(tmp_path / "missing"))[::2], "does not exist")
    (tmp_path / "f").write_text("x")
    one_line_error(*cli("runs", str(tmp_path / "f"))[::2], "is not a directory")
    (tmp_path / "empty").mkdir()
    rc, out, _ = cli("runs", str(tmp_path / "empty"))
    assert rc == 0 and out.startswith("no runs under")


# ---- scaletrain submit ---------------------------------------------------------------------------------


def _fake_bin(tmp: Path, **scripts: str) -> str:
    """A PATH holding only stand-in executables NAME -> shell body."""
    b = tmp / "bin"
    b.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = b / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    return str(b)


def _submit_args(tmp: Path, *extra: str) -> list[str]:
    return ["submit", "--config", TINY_YAML, "--set", f"run.dir={tmp / 'run'}", "train.max_steps=5",
            "--gpus-per-node", "0", "--ranks-per-node", "2", "--python", sys.executable, *extra]


def test_submit_bad_time_missing_tools_unreachable(tmp_path):
    empty = _fake_bin(tmp_path)
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "5:00"), path=empty)[::2], "--time '5:00' is not a time limit")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "00:75:00"), path=empty)[::2], "out of range")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "00:10:00"), path=empty)[::2], "sbatch not found")
    only_sbatch = _fake_bin(tmp_path, sbatch="echo 1")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10", "--mode", "srun"), path=only_sbatch)[::2], "srun not found")
    down = _fake_bin(tmp_path, sbatch="echo 1", srun="true",
                     scontrol='echo "Slurmctld(primary) at ctl is DOWN"; echo "*****"; exit 1')
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=down)[::2], "SLURM not reachable")
    assert not (tmp_path / "run").exists()   # nothing written when the submission cannot happen
    ping_ok = _fake_bin(tmp_path, scontrol='echo "Slurmctld(primary) at ctl is UP"',
                        sbatch='echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=ping_ok)[::2], "SLURM not reachable")
    gres = _fake_bin(tmp_path, sbatch='echo "sbatch: error: Invalid generic resource (gres) specification" >&2; exit 1')
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=gres)[::2], "use --gpus-per-node 0")
    assert not (tmp_path / "run").exists()   # refused by sbatch: no run dir left behind
    nested = [a.replace(f"run.dir={tmp_path / 'run'}", f"run.dir={tmp_path / 'new' / 'exp' / 'run'}")
              for a in _submit_args(tmp_path, "--time", "10")]
    one_line_error(*cli(*nested, path=gres)[::2], "use --gpus-per-node 0")
    assert not (tmp_path / "new").exists()   # nor the parents it had to create
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "submit.sbatch").write_text("the script of an earlier job\n")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=gres)[::2], "use --gpus-per-node 0")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["submit.sbatch"]
    assert (tmp_path / "run" / "submit.sbatch").read_text() == "the script of an earlier job\n"   # kept as it was


def test_sbatch_that_does_not_answer_keeps_the_script_it_may_run(tmp_path, monkeypatch):
    """A timeout (or Ctrl-C) leaves open whether SLURM queued the job: nothing is rolled back, the user is told
    to look before submitting again."""
    monkeypatch.setenv("SCALETRAIN_SBATCH_TIMEOUT", "1")
    slow = _fake_bin(tmp_path, scontrol='echo "Slurmctld(primary) at ctl is UP"', sbatch=f"exec {shutil.which('sleep')} 5")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=slow)[::2], "may still have been queued")
    assert (tmp_path / "run" / "submit.sbatch").is_file()


def test_submit_prints_job_run_dir_and_tensorboard(tmp_path):
    record = tmp_path / "sbatch-args"
    path = _fake_bin(tmp_path, scontrol='echo "Slurmctld(primary) at ctl is UP"', sbatch=f'echo "$@" > {record}; echo "4242;local"')
    rc, out, err = cli(*_submit_args(tmp_path, "--time", "00:30:00", "--partition", "cpu"), path=path)
    assert rc == 0, err
    run_dir = tmp_path / "run"
    assert "submitted job 4242" in out and f"run dir:     {run_dir}" in out
    assert f"tensorboard --logdir {tmp_path}" in out and f"{run_dir}/slurm-4242.out" in out
    script = run_dir / "submit.sbatch"
    assert record.read_text().split() == ["--parsable", str(script)]
    text = script.read_text()
    assert "#SBATCH --partition=cpu" in text and "#SBATCH --time=00:30:00" in text and "RANKS_PER_NODE=2" in text
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert directives and not any("gpu" in d or "gres" in d for d in directives)   # CPU nodes: no GPU request at all


def test_submit_dry_run_prints_script(tmp_path):
    path = _fake_bin(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    rc, out, err = cli(*_submit_args(tmp_path, "--time", "01:00:00", "--dry-run"), path=path)
    assert rc == 0, err
    assert out.startswith("#!/bin/bash") and "#SBATCH --time=01:00:00" in out and "not submitted" in err
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "run").exists()   # only printed


def test_submit_refuses_run_dir_of_a_live_job(tmp_path):
    """One run dir per job: the job recorded in status.json (or, from older multi-node jobs, a
    slurm-<job>.hostfile) still listed by squeue -> one line, exit 2, nothing written or submitted."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status = run_dir / "status.json"
    status.write_text(json.dumps({"state": "preempted", "step": 3, "slurm_job_id": "77", "slurm_restart_count": 1}))
    record = tmp_path / "sbatch-args"
    tools = dict(scontrol='echo "Slurmctld(primary) at ctl is UP"', sbatch=f'echo "$@" > {record}; echo 4243')
    queued = _fake_bin(tmp_path, squeue='[ "$1 $2 $3" = "-h -j 77" ] && echo "77 PENDING"; exit 0', **tools)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=queued)[::2], "belongs to SLURM job 77 (PENDING)")
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before and not record.exists()

    status.write_text(json.dumps({"state": "finished", "slurm_job_id": None}))   # older multi-node job: id from its hostfile
    (run_dir / "slurm-77.hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=queued)[::2], "scancel 77")

    (tmp_path / "gone").mkdir()
    (tmp_path / "plain").mkdir()
    gone = _fake_bin(tmp_path / "gone", squeue='echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', **tools)
    rc, out, err = cli(*_submit_args(tmp_path, "--time", "10"), path=gone)
    assert rc == 0 and "submitted job 4243" in out, err
    no_squeue = _fake_bin(tmp_path / "plain", **tools)   # squeue not installed: the check is skipped
    rc, out, err = cli(*_submit_args(tmp_path, "--time", "10"), path=no_squeue)
    assert rc == 0 and "submitted job 4243" in out, err

    # a job that is only queued (no status.json of its own yet) still owns the run dir
    (tmp_path / "q").mkdir()
    status.unlink()
    (run_dir / "slurm-77.hostfile").unlink()
    pending = _fake_bin(tmp_path / "q", squeue='[ "$1 $2 $3" = "-h -j 4243" ] && echo "4243 PENDING"; exit 0', **tools)
    one_line_error(*cli(*_submit_args(tmp_path, "--time", "10"), path=pending)[::2], "belongs to SLURM job 4243 (PENDING)")
    assert json.loads((run_dir / "submitted.json").read_text())["job"] == "4243"
