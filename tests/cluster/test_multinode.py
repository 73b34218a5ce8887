"""A real 2-node DeepSpeed job over ssh: `deepspeed --hostfile` (pdsh launcher) to two hosts made by
scripts/local_cluster.sh (network namespaces, each with its own sshd, hostname and PID namespace), ZeRO-3 on
CPU ranks (gloo between the hosts). Stop it mid-run with SIGUSR1 to rank 0 on host1 (what SLURM sends before
preemption), launch the same command again: it resumes from the checkpoint and finishes, one continuous curve."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster_utils import REPO, VENV, ensure_tools, kill_tree, log, rank_env, require_root, script
from launch_utils import TINY, small_corpus, wait_for

HOSTS = ["host1", "host2"]
MAX_STEPS = 30
LAUNCH_TIMEOUT = 900   # generous: 2-host gloo steps crawl when the machine's cores are shared with other jobs


@pytest.fixture(scope="module")
def cluster():
    """scripts/local_cluster.sh up; down in the finalizer (also when `up` itself failed half-way), unless the
    cluster was already up before this module (then it belongs to someone else and stays)."""
    require_root("multi-node test")
    ensure_tools(["sshd", "ssh", "pdsh", "ip"], "multi-node test")
    was_up = script("local_cluster.sh", "status").returncode == 0
    cluster_dir = Path(os.environ.get("SCALETRAIN_CLUSTER_DIR", "/run/scaletrain-cluster"))
    try:
        t0 = time.time()
        script("local_cluster.sh", "up", env={"SCALETRAIN_VENV": str(VENV)})
        log(f"local_cluster.sh up: {time.time() - t0:.1f} s")
        yield cluster_dir
    finally:
        if not was_up:
            script("local_cluster.sh", "down")
            log("local_cluster.sh down")


def _launch(cluster: Path, overrides: list[str], port: int) -> subprocess.Popen:
    # The hosts get only PYTHON* variables from the runner; the rest comes from the env file (one KEY=VALUE a line).
    cmd = [str(VENV / "bin" / "deepspeed"), "--hostfile", str(cluster / "hostfile"), "--num_nodes", "2", "--num_gpus", "1",
           "--master_port", str(port), "launch/train.py", "--config", "configs/tiny.yaml", "--set", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=rank_env(DS_ENV_FILE=str(cluster / "deepspeed_env")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"launch did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"launcher exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _wait_running(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until the trainer says "running" (its signal handlers are installed by then)."""
    started = wait_for(lambda: _state(run_dir) == "running" or proc.poll() is not None, timeout=LAUNCH_TIMEOUT, interval=0.2)
    assert started and proc.poll() is None, f"training did not start:\n{proc.stdout.read() if proc.poll() is not None else ''}"


def _state(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def _steps(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event TensorBoard's reader keeps (purged ones dropped), in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tb").is_dir():
        return []
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_two_node_zero3_over_ssh_checkpoint_and_resume(cluster, tmp_path):
    for h in HOSTS:   # really separate hosts: own hostname and address, reached over ssh
        out = subprocess.run(["ssh", h, "hostname; hostname -I"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split()[0] == h, out
    corpus = small_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}",
                 "zero.stage=3", "train.precision=fp32", f"train.max_steps={MAX_STEPS}", "train.save_every=10"]
    port = random.randint(21000, 29000)

    # 1st launch: stop it mid-run with USR1 to rank 0 (a pid in host1's own PID namespace: signal it there) as
    # soon as the trainer says "running" (its handler is installed by then): the stop lands within the first
    # steps however fast or slow this machine is.
    t0 = time.time()
    proc = _launch(cluster, overrides, port)
    try:
        _wait_running(proc, run_dir)
        t_running = time.time() - t0
        pid = (run_dir / "pids" / "rank0.pid").read_text().strip()
        kill = subprocess.run(["ssh", "host1", f"kill -USR1 {pid}"], capture_output=True, text=True, timeout=60)
        assert kill.returncode == 0, kill
        out1 = _finish(proc)
    finally:
        kill_tree(proc)
    t_first = time.time() - t0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 1 <= status["step"] < MAX_STEPS, (status, out1[-3000:])
    assert status["world_size"] == 2 and status["host"] == "host1", status
    stopped = status["step"]
    assert "stop requested by signal" in out1
    assert "host1" in out1 and "host2" in out1   # the runner started ranks on both hosts (pdsh output prefixes)

    # 2nd launch, same command: resumes from the stop checkpoint on both hosts and finishes.
    t1 = time.time()
    proc = _launch(cluster, overrides, port + 1)
    try:
        out2 = _finish(proc)
    finally:
        kill_tree(proc)
    t_second = time.time() - t1
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{stopped}'}" in out2, out2[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == MAX_STEPS, status
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{MAX_STEPS}"

    # One continuous curve: every step once, the data position exact across the restart, and the loss at every
    # step equal to an uninterrupted 1-rank run on the same global batch (2 micro-batches accumulated).
    loss = _steps(run_dir, "train/loss")
    assert [s for s, _ in loss] == list(range(1, MAX_STEPS + 1)), [s for s, _ in loss]
    tokens_per_step = 2 * 2 * 64   # ranks x micro_batch x seq_len
    assert _steps(run_dir, "train/consumed_tokens") == [(s, float(s * tokens_per_step)) for s in range(1, MAX_STEPS + 1)]
    t2 = time.time()
    ref_dir = tmp_path / "ref"
    ref = subprocess.run([str(VENV / "bin" / "python"), "launch/train.py", "--config", "configs/tiny.yaml", "--set",
                          *[o for o in overrides if not o.startswith(("run.dir=", "zero.stage="))],
                          f"run.dir={ref_dir}", "zero.stage=0", "train.grad_accum=2"],
                         cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = dict(_steps(ref_dir, "train/loss"))
    worst = max(abs(v - expected[s]) / abs(expected[s]) for s, v in loss)
    assert worst < 1e-5, f"2-host curve differs from the 1-rank reference by up to {worst:.2e} (relative)"
    t_ref = time.time() - t2

    # `scaletrain runs` reads it back from the run dir.
    runs = subprocess.run([str(VENV / "bin" / "python"), "-m", "scaletrain.cli", "runs", str(run_dir), "--json"],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert runs.returncode == 0, runs.stderr
    (info,) = json.loads(runs.stdout)
    assert (info["state"], info["step"], info["max_steps"], info["checkpoint"]) == ("finished", MAX_STEPS, MAX_STEPS, f"global_step{MAX_STEPS}")
    log(f"2-node ZeRO-3: running after {t_running:.1f} s, stopped at step {stopped} (launch 1: {t_first:.1f} s), "
        f"resumed and finished in {t_second:.1f} s; max rel. diff to the 1-rank reference {worst:.1e} ({t_ref:.1f} s)")


def test_openmpi_launcher_two_nodes(cluster, tmp_path):
    """`deepspeed --hostfile H --launcher openmpi`: mpirun starts the ranks on both hosts (over ssh + orted);
    ranks learn RANK/WORLD_SIZE from OMPI_COMM_WORLD_*, MASTER_ADDR/PORT come from the env file."""
    if shutil.which("mpirun") is None:
        ensure_tools(["mpirun"], "openmpi launcher test")   # skips without root/apt; else install it:
        proc = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", "openmpi-bin"],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert proc.returncode == 0, proc.stderr[-2000:]
    port = random.randint(21000, 29000)
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text((cluster / "deepspeed_env").read_text().rstrip("\n") + "\n"
                        f"MASTER_ADDR=10.201.0.11\nMASTER_PORT={port}\n")
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"run.dir={run_dir}", "zero.stage=3", "train.precision=fp32", "train.max_steps=4"]
    cmd = [str(VENV / "bin" / "deepspeed"), "--hostfile", str(cluster / "hostfile"), "--launcher", "openmpi",
           "--launcher_args=--allow-run-as-root", "launch/train.py", "--config", "configs/tiny.yaml", "--set", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(DS_ENV_FILE=str(env_file)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = _finish(proc)
    finally:
        kill_tree(proc)
    assert "mpirun -n 2 -hostfile" in out and "2 rank(s) on cpu" in out, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"], status["world_size"], status["host"]) == ("finished", 4, 2, "host1"), status
    log(f"openmpi launcher, 2 hosts: {time.time() - t0:.1f} s")


def test_term_to_the_launching_side_still_checkpoints_on_both_hosts(cluster, tmp_path):
    """What `scancel` does to a deepspeed-mode batch step: SIGTERM to the runner, pdsh and the ssh clients at once.
    DeepSpeed's runner then pkills each host's launcher, which passes TERM to its ranks and gives them 30 s; but the
    ssh connections the ranks print through are gone, and rank 0's next log line raised BrokenPipeError: state
    "failed", no checkpoint. Now both ranks finish the step, checkpoint and stop."""
    import psutil
    import signal

    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"run.dir={run_dir}", "zero.stage=3", "train.precision=fp32", "train.max_steps=400", "train.log_every=1"]
    port = random.randint(21000, 29000)
    t0 = time.time()
    proc = _launch(cluster, overrides, port)
    try:
        _wait_running(proc, run_dir)
        wait_for(lambda: _steps(run_dir, "train/loss") or proc.poll() is not None, timeout=120, interval=0.5)
        launching = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        names = [p.name() for p in launching]
        assert any(n.startswith("pdsh") for n in names) and "ssh" in names, names
        for p in launching:
            p.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        state = wait_for(lambda: _state(run_dir) in ("preempted", "failed", "finished"), timeout=120, interval=0.5)
    finally:
        kill_tree(proc)
    status = json.loads((run_dir / "status.json").read_text())
    assert state and status["state"] == "preempted", status
    tag = f"global_step{status['step']}"
    assert wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), timeout=60, interval=0.5)
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert len(list((run_dir / "checkpoints" / tag).glob("zero_pp_rank_*_model_states.pt"))) == 2   # both hosts saved
    log(f"TERM to the launching side: preempted at step {status['step']} with a checkpoint ({time.time() - t0:.1f} s)")
