"""`scaletrain runs [DIR]`: every run under DIR (default runs/) with its state, step, loss, tokens/s, newest
checkpoint and SLURM job -- read from the run dirs themselves (status.json, pids/, tb/, checkpoints/), no daemon.

State is what the trainer last wrote, checked against reality:
  running    status.json says so and a rank process from pids/ is alive (or SLURM says the job runs)
  crashed    status.json says "running" but no rank process is alive (killed without a chance to say so)
  running?   says "running" on another host that cannot be checked from here, updated in the last 10 minutes
  stale      the same, but nothing was written for 10 minutes or more
  finished / preempted / failed / early_stopped   as the trainer wrote it (preempted: checkpointed and
             exited on USR1/TERM; a requeued SLURM job shows its queue state next to it)
  submitted  `scaletrain submit` sent it to SLURM (submitted.json, newer than status.json) and no rank has
             started yet
  requeued   says "running", its ranks are gone, and SLURM holds the job in the queue again (requeued)
  dropped    submitted, but SLURM no longer lists the job and no rank ever started (cancelled while queued,
             or the batch script stopped before training: see slurm-<job>.out)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from scaletrain.checkpoint_names import MANIFEST, TAG_RE
from scaletrain.cluster.slurm import SUBMITTED, hostfile_job, submitted_job
from scaletrain.errors import UserError

STALE_AFTER_S = 600


# ---- reading one run dir -------------------------------------------------------------------------------


def is_run_dir(p: Path) -> bool:
    return (p / "status.json").is_file() or (p / SUBMITTED).is_file() or ((p / "config.yaml").is_file() and ((p / "tb").is_dir() or (p / "checkpoints").is_dir()))


def find_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run dirs at or below `root` (not inside other run dirs), sorted by path."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return
        for c in children:
            if is_run_dir(c):
                found.append(c)
            elif depth < max_depth:
                walk(c, depth + 1)

    walk(root, 1)
    return found


def _read_status(run: Path) -> tuple[dict, Optional[float]]:
    p = run / "status.json"
    try:
        status = json.loads(p.read_text())
        if isinstance(status, dict):
            return status, p.stat().st_mtime
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, RecursionError):
        pass
    return {"state": "unreadable"}, p.stat().st_mtime if p.exists() else None


def tb_last(tb_dir: Path, tags: tuple[str, ...] = ("train/loss", "train/tokens_per_sec")) -> dict[str, tuple[int, float, float]]:
    """tag -> (step, value, wall_time) of the newest event (by wall time: after a resume the newest event
    is the current position, whatever older event files still hold)."""
    files = sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime) if tb_dir.is_dir() else []
    if not files:
        return {}
    try:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    except ImportError:
        return {}
    last: dict[str, tuple[int, float, float]] = {}
    # The newest file that has the tags is enough; older ones only matter when it has none of them yet.
    for f in reversed(files):
        try:
            for ev in LegacyEventFileLoader(str(f)).Load():
                for v in ev.summary.value:
                    if v.tag in tags and v.WhichOneof("value") == "simple_value":
                        if v.tag not in last or ev.wall_time >= last[v.tag][2]:
                            last[v.tag] = (int(ev.step), float(v.simple_value), float(ev.wall_time))
        except Exception:  # a file being written or truncated: use what was read
            pass
        if last:
            break
    return last


def newest_checkpoint(run: Path) -> Optional[str]:
    """The tag `checkpoints/latest` names (what a restart resumes from), else the highest complete tag."""
    root = run / "checkpoints"
    latest = root / "latest"
    try:
        tag = latest.read_text().strip()
        if (root / tag).is_dir():
            return tag
    except (OSError, ValueError):  # unreadable, or not text (UnicodeDecodeError): the tags decide
        pass
    tags = [(int(m[1]), p.name) for p in root.glob("global_step*") if (m := TAG_RE.match(p.name)) and (p / MANIFEST).is_file()]
    return max(tags)[1] if tags else None


def _alive(pid: int, not_after: Optional[float]) -> bool:
    """A live, non-zombie python process that already existed when its pid file was written."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if not_after is not None and p.create_time() > not_after + 5:
            return False  # pid reused by a newer process
        return any("python" in part for part in p.cmdline()[:2])
    except (psutil.Error, OSError):
        return False


def local_ranks_alive(run: Path, status: dict) -> bool:
    """Whether a rank on rank 0's host (this one) is alive. Ranks are numbered node by node, so those are ranks
    0 .. local_ranks-1; the other nodes' pid files hold pids of their own hosts, meaningless here."""
    from scaletrain.train.pid_files import rank_pid_files

    local = status.get("local_ranks")
    pid_files = [f for rank, f in rank_pid_files(run)[0].items() if not isinstance(local, int) or rank < local]
    for f in pid_files:
        try:
            if _alive(int(f.read_text().strip()), f.stat().st_mtime):
                return True
        except (OSError, ValueError):
            continue
    if not pid_files and isinstance(status.get("pid"), int):
        return _alive(status["pid"], None)
    return False


def slurm_job(run: Path, status: dict) -> tuple[Optional[str], Optional[int]]:
    """(job id, restart count): what the trainer recorded, else the newest slurm-<job>.hostfile the batch
    script wrote (multi-node deepspeed mode: ranks started over ssh do not see SLURM_* variables)."""
    if status.get("slurm_job_id"):
        return str(status["slurm_job_id"]), status.get("slurm_restart_count")
    return hostfile_job(run), None


def pending_submission(run: Path, status_mtime: Optional[float]) -> Optional[str]:
    """The job `scaletrain submit` sent after status.json was last written (none of its ranks has started:
    they write status.json first), e.g. a new submission of a finished run; None otherwise."""
    job = submitted_job(run)
    if job is None or status_mtime is None:
        return job
    try:
        return job if (run / SUBMITTED).stat().st_mtime > status_mtime else None
    except OSError:
        return None


def current_job(run: Path, status: dict, status_mtime: Optional[float]) -> tuple[Optional[str], Optional[int], bool]:
    """(job id, restart count, only submitted) of the run's newest SLURM job; `status` as `_read_status` gives it."""
    pending = pending_submission(run, status_mtime)
    if pending:
        return pending, None, True
    return (*slurm_job(run, status), False)


_QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")  # SLURM states of a job waiting to (re)start


def squeue_states(jobs: list[str], timeout: float = 5) -> Optional[dict[str, str]]:
    """job id -> SLURM state (PENDING, RUNNING, ...) for jobs still known to the controller; None when SLURM
    is not installed or not answering (the listing never waits on it for long)."""
    exe = shutil.which("squeue")
    if not jobs or exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-h", "-j", ",".join(jobs), "-o", "%i %T"], capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode != 0 and "invalid job id" not in proc.stderr.lower():
        return None  # controller not answering (an unknown id is not an error: the job has left the queue)
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def run_info(run: Path, queue: Optional[dict[str, str]] = None, now: Optional[float] = None) -> dict:
    now = time.time() if now is None else now
    status, status_mtime = _read_status(run)
    tb = tb_last(run / "tb")
    written = status.get("state", "unknown" if status_mtime is None else "unreadable")
    step, loss = status.get("step"), status.get("loss")
    # status.json is written at start, at each checkpoint and at the end: while a run goes (or after it died without a word),
    # TensorBoard's newest event is the position; the final status is authoritative once written.
    if "train/loss" in tb and (written in ("running", "unknown", "unreadable") or loss is None) \
            and (status_mtime is None or tb["train/loss"][2] >= status_mtime - 1):
        step, loss = tb["train/loss"][0], tb["train/loss"][1]
    tps = tb.get("train/tokens_per_sec", (None, None, None))[1]
    job, restarts, submitted = current_job(run, status, status_mtime)
    if submitted:  # queued by `scaletrain submit`, no rank started yet
        written = "submitted"
    queue_state = queue.get(job) if queue is not None and job else None
    last_write = max([t for t in (status_mtime, *(v[2] for v in tb.values())) if t is not None], default=None)

    state = written
    if submitted and queue is not None and queue_state is None:
        state = "dropped"
    if written == "running":
        host = status.get("host")
        gone = "requeued" if queue_state in _QUEUED else "crashed"  # SLURM requeued it (node failure, preemption)
        if host is None or host == socket.gethostname():
            state = "running" if local_ranks_alive(run, status) else gone
        elif queue is not None and job:  # SLURM answered: a job it no longer lists has ended without a word
            state = "running" if queue_state in ("RUNNING", "COMPLETING") else gone
        else:
            state = "running?" if last_write is not None and now - last_write < STALE_AFTER_S else "stale"
    return {
        "run": str(run), "state": state, "written_state": written, "step": step, "max_steps": status.get("max_steps"),
        "loss": loss, "tokens_per_sec": tps, "checkpoint": newest_checkpoint(run), "slurm_job_id": job,
        "slurm_restart_count": restarts, "slurm_state": queue_state, "host": status.get("host"),
        "world_size": status.get("world_size"), "updated": status.get("updated"),
    }


# ---- the command ---------------------------------------------------------------------------------------


def _fmt_row(info: dict, root: Path) -> list[str]:
    try:
        name = str(Path(info["run"]).relative_to(root)) if Path(info["run"]) != root else Path(info["run"]).name
    except ValueError:
        name = info["run"]
    step = "-" if info["step"] is None else str(info["step"])
    if info["max_steps"] is not None:
        step += f"/{info['max_steps']}"
    loss = "-" if info["loss"] is None or info["loss"] != info["loss"] else f"{info['loss']:.4f}"
    tps = "-" if info["tokens_per_sec"] is None else f"{info['tokens_per_sec']:,.0f}"
    slurm = "-"
    if info["slurm_job_id"]:
        slurm = info["slurm_job_id"]
        if info["slurm_restart_count"]:
            slurm += f" r{info['slurm_restart_count']}"
        if info["slurm_state"]:
            slurm += f" {info['slurm_state']}"
    return [name, info["state"], step, loss, tps, info["checkpoint"] or "-", slurm, info["updated"] or "-"]


def run(args: argparse.Namespace) -> int:
    root = Path(os.path.expanduser(args.dir))
    if not root.exists():
        raise UserError(f"{root} does not exist; give the directory that holds your run dirs (run.dir's parent)")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the directory that holds your run dirs")
    runs = find_runs(root)
    if not runs:
        print(f"no runs under {root} (a run dir holds status.json, written when training starts)")
        return 0
    jobs = {job for r in runs if (job := current_job(r, *_read_status(r))[0])}
    queue = squeue_states(sorted(jobs))
    infos = [run_info(r, queue) for r in runs]
    if args.json:
        # strict JSON: a NaN loss (status files of older versions) is null
        finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in i.items()} for i in infos]
        print(json.dumps(finite, indent=1, allow_nan=False))
        return 0
    header = ["RUN", "STATE", "STEP", "LOSS", "TOK/S", "CHECKPOINT", "SLURM", "UPDATED"]
    rows = [header] + [_fmt_row(i, root) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("runs", help="list runs with state, step, loss, tokens/s, checkpoint, SLURM job (no daemon)")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="directory holding run dirs, or one run dir (default runs/)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p.set_defaults(func=run)
