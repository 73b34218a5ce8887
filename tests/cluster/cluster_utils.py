"""Helpers for the cluster tests: the daemons' up/down scripts, a private DeepSpeed op cache, env files."""

from __future__ import annotations

import hashlib
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
# What the ranks see as PATH on every "host" and in SLURM jobs. The venv goes last, as in the deepspeed_env
# that scripts/local_cluster.sh writes: the ninja found first decides whether the shm op is rebuilt.
NODE_PATH = f"{SYSTEM_PATH}:{VENV / 'bin'}"
# DeepSpeed JIT-builds its CPU shared-memory comm op on every rank. A private build dir per venv: other
# engineers' runs on this machine neither rebuild it under us (different ninja/flags) nor leave a stale
# `lock` behind that would hang every later rank; built once per machine, then reused.
TORCH_EXT_DIR = Path.home() / ".cache" / "scaletrain" / f"torch_extensions-{hashlib.sha1(str(VENV).encode()).hexdigest()[:10]}"


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
    e.update(PATH=NODE_PATH, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(TORCH_EXT_DIR),
             PYTHONUNBUFFERED="1", **extra)
    return e


def clear_stale_locks(ext_dir: Path = TORCH_EXT_DIR, min_age: float = 30) -> None:
    """Remove `lock` files no build holds: torch's FileBaton waits forever on a lock whose builder was killed."""
    import psutil

    for lock in ext_dir.glob("*/*/lock"):
        build_dir = str(lock.parent)
        try:
            if time.time() - lock.stat().st_mtime < min_age:
                continue
        except FileNotFoundError:
            continue
        busy = False
        for p in psutil.process_iter(["cwd"]):
            if (p.info.get("cwd") or "").startswith(build_dir):
                busy = True
                break
        if not busy:
            log(f"removing stale {lock} (no build process in {build_dir})")
            lock.unlink(missing_ok=True)


def prebuild_shm_op(timeout: float = 900) -> float:
    """Build DeepSpeed's shm comm op once, with exactly the ranks' PATH and build dir; returns seconds."""
    TORCH_EXT_DIR.mkdir(parents=True, exist_ok=True)
    clear_stale_locks()
    t0 = time.time()
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                          env=rank_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"building DeepSpeed's shm op failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t0


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
