"""Helpers for tests that start real training processes (1 rank in-process-free, N ranks via `deepspeed`)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import preloaded_cli
from preloaded_cli import communicate_or_kill, kill_group  # (tests import them from here)
from scaletrain.data.sources import write_stdlib_sample

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A model and data small enough that a 2-rank DeepSpeed run takes seconds on 2 CPU cores.
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=172", "model.vocab_size=512", "model.max_seq_len=128",
    "train.seq_len=64", "train.micro_batch_size=2", "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr=1e-3",
    "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
    "train.peak_flops=1e11",  # MFU against a given figure: measuring costs ~1 s a start (test_training_runs measures)
]


small_corpus = write_stdlib_sample  # ~40 stdlib modules as .txt: real text, tokenised in about a second


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("DS_ACCELERATOR", "cpu")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def train_cmd(ranks: int, overrides: list[str], config: str = "configs/tiny.yaml", launcher: str = "local") -> list[str]:
    """1 rank: plain python. N ranks: `launcher="deepspeed"` is the real `deepspeed --num_gpus N`;
    "local" (scripts/local_ranks.py) gives the ranks the same environment ~7 s sooner."""
    args = ["launch/train.py", "--config", config, "--set", *overrides]
    if ranks == 1:
        return [sys.executable, *args]
    if launcher == "local":
        return [sys.executable, str(REPO / "scripts" / "local_ranks.py"), str(ranks), *args]
    assert launcher == "deepspeed", launcher
    port = str(random.randint(20000, 40000))
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, *args]


def run_training(ranks: int, overrides: list[str], timeout: int = 300, check: bool = True,
                 launcher: str = "local") -> subprocess.CompletedProcess:
    """Run to completion (stdout and stderr as one stream). On timeout the whole process group is killed:
    killing only the launcher would leave its ranks holding the output pipes, and the test would wait for them
    forever. One rank runs as a fork of the preloaded process (see run_cli); N ranks, and every process a test
    signals or reads while it runs (start_training), are fresh interpreters."""
    cmd = train_cmd(ranks, overrides, launcher=launcher)
    if ranks == 1 and not no_fork():  # a fork, as run_cli's commands
        returncode, out, _ = preloaded_cli.run(tuple(cmd[2:]), REPO, env(), timeout, main=cmd[1], merged=True)
    else:
        proc = start_training(ranks, overrides, launcher=launcher)
        out, _ = communicate_or_kill(proc, timeout, f"training did not finish in {timeout} s: {' '.join(cmd)}")
        returncode = proc.returncode
    done = subprocess.CompletedProcess(cmd, returncode, out, "")
    if check and done.returncode != 0:
        raise AssertionError(f"training failed rc={done.returncode}\n{out[-6000:]}")
    return done


def start_training(ranks: int, overrides: list[str], launcher: str = "local") -> subprocess.Popen:
    """Start in a process group of its own (stdout and stderr merged), so `kill_group` reaches every rank."""
    return subprocess.Popen(train_cmd(ranks, overrides, launcher=launcher), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def live_rank_pids(run_dir: Path) -> list[int]:
    """Pids from run_dir/pids/rank*.pid whose processes still exist."""
    pids = []
    for pid_file in (run_dir / "pids").glob("rank*.pid"):
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


def signal_ranks(run_dir: Path, sig: int = signal.SIGUSR1) -> None:
    """Signal every live rank of a run (what SLURM's warning signal does); gone ones are skipped."""
    for pid in live_rank_pids(run_dir):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float = 120, interval: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value, read back with TensorBoard's own reader (handles purged/resumed event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def tb_steps(run_dir: Path, tag: str) -> list[int]:
    """Every step `tag` has an event at, in order, repeats included (tb_scalars keeps one value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def run_cli(*args: str, cwd: Path | str = REPO, timeout: float = 120) -> tuple[int, str, str]:
    """`python -m scaletrain.cli ARGS` with the repo on PYTHONPATH -> (returncode, stdout, stderr).
    A fork of a process that has imported torch, deepspeed and the CLI already (tests/preloaded_cli.py: ~2 s
    less per command); SCALETRAIN_TEST_NO_FORK=1 starts a fresh interpreter instead. Either way in a process
    group of its own: on timeout every process it started is killed too (see run_training)."""
    return preloaded_cli.run(args, cwd, env(), timeout, fresh=no_fork())


def no_fork() -> bool:
    return os.environ.get("SCALETRAIN_TEST_NO_FORK") == "1"
