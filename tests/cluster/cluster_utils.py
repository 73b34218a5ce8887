"""Helpers for the cluster tests: the daemons' up/down scripts, env files, stopping launchers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)            # the venv running pytest: the ranks must use the same one
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the ranks see as PATH on every "host" and in SLURM jobs, as in the deepspeed_env that
# scripts/local_cluster.sh writes.
NODE_PATH = f"{SYSTEM_PATH}:{VENV / 'bin'}"


def log(msg: str) -> None:
    print(f"[cluster-tests {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools(executables: list[str], what: str) -> None:
    """Skip (with the reason) only where the tools are missing AND cannot be installed (no root or no apt);
    otherwise the up script installs them and any failure there is a test failure."""
    missing = [e for e in executables if shutil.which(e) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{what}: {', '.join(missing)} not installed and not root (cannot apt-get install)")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{what}: {', '.join(missing)} not installed and no apt-get here")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (network namespaces / SLURM daemons)")


def script(name: str, action: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(REPO / "scripts" / name), action], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0 and action != "status":
        raise AssertionError(f"scripts/{name} {action} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def rank_env(**extra: str) -> dict:
    """Environment for training ranks started from here (SLURM jobs inherit it from sbatch)."""
    e = dict(os.environ)
    e.update(PATH=NODE_PATH, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    return e


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop a launcher we started and everything it started (pdsh, ssh, local ranks), by PID. The launchers
    stay in pytest's process group, so a `timeout` around pytest (.ci/run) reaches them too."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
