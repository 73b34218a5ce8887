"""SLURM batch scripts for training runs: render from launch/slurm/*.sbatch, write, submit.

Two modes, both requeue-safe (`#SBATCH --requeue`, `--signal=B:USR1@<grace>`):
  deepspeed  one batch step; `deepspeed --hostfile <allocation>` starts every node's ranks over pdsh/ssh
  srun       `srun` starts one task per node; each runs DeepSpeed's runner with --no_ssh --node_rank
             $SLURM_NODEID (no ssh between nodes)

The contract with the trainer (scaletrain/train/loop.py):
  * SIGUSR1 (or SIGTERM) to any rank -> checkpoint at the next step boundary, exit 0, status "preempted";
  * <run.dir>/status.json "state" is "finished" once max_steps is reached;
  * re-running the same command on the same run.dir resumes from the newest checkpoint.
The batch script forwards SLURM's USR1 to the ranks and, once they have exited, runs
`scontrol requeue $SLURM_JOB_ID` unless the state is "finished".

CLI entry (wired as `scaletrain submit` by cli.py): `add_submit_args(parser)` + `submit_command(args)`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from scaletrain.durable import missing_levels, remove_levels
from scaletrain.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "launch" / "slurm"
TRAIN_PY = REPO_ROOT / "launch" / "train.py"
MODES = ("deepspeed", "srun")
DEFAULT_GRACE_S = 300   # USR1 this long before the limit; slurmctld checks only every ~30 s, and saving takes time
MAX_GRACE_S = 65535     # SLURM's limit for --signal=...@N

_TIME_FORMS = "HH:MM:SS, D-HH:MM:SS or whole minutes, e.g. 04:00:00, 1-12:00:00 or 90"
_SHELL_UNSAFE = re.compile(r"[\s\"'`$\\;&|<>(){}*?!#~]")


@dataclass
class SubmitOptions:
    """Everything an sbatch script depends on. Paths should be absolute (see `options_from_args`)."""

    config: str                      # YAML config given to launch/train.py --config
    run_dir: str                     # the config's run.dir: submit.sbatch, slurm-<job>.out, status.json live here
    overrides: list[str] = field(default_factory=list)   # --set KEY=VALUE ...
    nodes: int = 1
    gpus_per_node: int = 0           # 0: CPU nodes, no GPU/GRES request at all
    ranks_per_node: Optional[int] = None   # default: gpus_per_node, or 1 on CPU nodes
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    mode: Literal["deepspeed", "srun"] = "deepspeed"
    grace: Optional[int] = None      # seconds; default min(300, half the time limit)
    python: str = sys.executable     # interpreter (or venv dir) with torch + deepspeed, same path on every node
    workdir: str = field(default_factory=os.getcwd)   # job's cwd: relative paths in the config resolve here
    exclusive: bool = True           # whole nodes: training wants every core/GPU and no neighbours
    cpus_per_node: Optional[int] = None   # shared nodes only: CPUs to ask for (default: one per rank)
    job_name: Optional[str] = None


def time_limit_seconds(value: str) -> int:
    """SLURM --time in seconds; accepts HH:MM:SS, D-HH:MM:SS or whole minutes."""
    v = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", v)
    if m:
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        if minutes > 59 or seconds > 59 or (m[1] is not None and hours > 23):
            raise UserError(f"--time {v!r} is out of range; write {_TIME_FORMS}")
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif v.isdigit():
        total = int(v) * 60
    else:
        raise UserError(f"--time {v!r} is not a time limit; write {_TIME_FORMS}")
    if total <= 0:
        raise UserError(f"--time {v!r} is zero; give a positive limit ({_TIME_FORMS})")
    return total


def resolve_python(path: str) -> str:
    """A python executable from `path` (an interpreter, or a venv directory holding bin/python)."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        p = p / "bin" / "python"
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise UserError(f"--python {path}: no python interpreter there; give the venv directory or its bin/python")
    return os.path.abspath(p)   # abspath, not resolve(): a venv's python is a symlink that must stay one


def _check_word(flag: str, value: Optional[str]) -> None:
    if value is not None and (not value or _SHELL_UNSAFE.search(value)):
        raise UserError(f"{flag} {value!r} must be a plain name (no spaces or shell characters)")


def validate(o: SubmitOptions) -> tuple[int, int]:
    """Check options a user typed; returns (ranks_per_node, grace_seconds) with defaults filled in."""
    if o.mode not in MODES:
        raise UserError(f"--mode {o.mode!r} is unknown; use one of {', '.join(MODES)}")
    if o.nodes < 1:
        raise UserError(f"--nodes {o.nodes}: need at least 1 node")
    if o.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {o.gpus_per_node}: use 0 for CPU nodes or the GPU count per node")
    ranks = o.ranks_per_node if o.ranks_per_node is not None else (o.gpus_per_node or 1)
    if ranks < 1:
        raise UserError(f"--ranks-per-node {ranks}: need at least 1 rank per node")
    if o.gpus_per_node and ranks > o.gpus_per_node:
        raise UserError(f"--ranks-per-node {ranks} exceeds --gpus-per-node {o.gpus_per_node}; "
                        "use one rank per GPU (or --gpus-per-node 0 for CPU ranks)")
    if o.cpus_per_node is not None and (o.exclusive or o.cpus_per_node < ranks):
        raise UserError(f"--cpus-per-node {o.cpus_per_node}: " + ("only with --no-exclusive (whole nodes get every CPU)"
                        if o.exclusive else f"need at least one CPU per rank ({ranks})"))
    limit = time_limit_seconds(o.time)
    grace = o.grace if o.grace is not None else min(DEFAULT_GRACE_S, limit // 2)
    if not 0 < grace <= MAX_GRACE_S:
        raise UserError(f"--grace {grace}: give seconds between 1 and {MAX_GRACE_S}")
    if grace >= limit:
        raise UserError(f"--grace {grace}s is not shorter than --time {o.time} ({limit}s); lower --grace or raise --time")
    for flag, value in (("--partition", o.partition), ("--account", o.account), ("--qos", o.qos),
                        ("--job-name", o.job_name)):
        _check_word(flag, value)
    # Paths and overrides end up in #SBATCH lines and, in deepspeed mode, in a pdsh command line that the
    # remote shell re-splits: keep them free of spaces and shell characters rather than half-quote them.
    for what, value in (("run.dir", o.run_dir), ("config path", o.config), ("working directory", o.workdir),
                        ("python path", o.python), ("scaletrain checkout", str(REPO_ROOT))):
        if _SHELL_UNSAFE.search(value):
            raise UserError(f"{what} {value!r} contains spaces or shell characters; use a plain path")
    for what, value in (("run.dir", o.run_dir), ("working directory", o.workdir)):
        if "%" in value:  # --output/--chdir: SLURM would expand %j, %x, ... and write elsewhere
            raise UserError(f"{what} {value!r} contains '%', which SLURM expands in #SBATCH paths; use a plain path")
    for kv in o.overrides:
        if "=" not in kv or _SHELL_UNSAFE.search(kv.replace("=", "", 1)):
            raise UserError(f"--set {kv!r} cannot travel through the job's shells; use KEY=VALUE without spaces "
                            "or quotes, or put the value in the YAML config")
    return ranks, grace


def sbatch_directives(o: SubmitOptions, ranks: int, grace: int) -> list[str]:
    name = o.job_name or f"st-{Path(o.run_dir).name}"
    lines = [
        f"--job-name={name}",
        f"--nodes={o.nodes}",
        "--ntasks-per-node=1",   # one launcher (deepspeed) / one srun task per node; it starts the ranks
        f"--time={o.time}",
        f"--output={o.run_dir}/slurm-%j.out",
        "--open-mode=append",    # keep the log of earlier runs of a requeued job
        f"--chdir={o.workdir}",
        "--requeue",
        f"--signal=B:USR1@{grace}",   # B: to the batch shell only; it forwards to the ranks
    ]
    if o.exclusive:
        lines.append("--exclusive")
    else:  # shared nodes: without a CPU request SLURM gives the one task (which starts every rank) a single CPU
        lines.append(f"--cpus-per-task={o.cpus_per_node or ranks}")
    if o.gpus_per_node > 0:   # no GPU line at all otherwise: a CPU cluster without GRES rejects any
        lines.append(f"--gpus-per-node={o.gpus_per_node}")
    for flag, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(o: SubmitOptions) -> str:
    """The batch script for `o` (validated first; raises UserError on bad options)."""
    ranks, grace = validate(o)
    train = [str(TRAIN_PY), "--config", o.config] + (["--set", *o.overrides] if o.overrides else [])
    values = {
        "SBATCH": "\n".join(sbatch_directives(o, ranks, grace)),
        "RUN_DIR": shlex.quote(o.run_dir),
        "REPO": shlex.quote(str(REPO_ROOT)),   # the batch script checks its hostfile with scaletrain.cluster.hostfile
        "PYTHON": shlex.quote(o.python),
        "RANKS_PER_NODE": str(ranks),
        "GPUS_PER_NODE": str(o.gpus_per_node),
        "TRAIN": " ".join(shlex.quote(a) for a in train),
        "COMMON": (TEMPLATES / "_common.sbatch").read_text().rstrip("\n"),
    }
    text = (TEMPLATES / f"{o.mode}.sbatch").read_text()

    def fill(m: re.Match) -> str:
        if m[1] not in values:
            raise KeyError(f"template {o.mode}.sbatch uses unknown placeholder {{{{{m[1]}}}}}")
        return values[m[1]]

    return re.sub(r"\{\{(\w+)\}\}", fill, text)


def write_script(o: SubmitOptions, text: str) -> Path:
    path = Path(o.run_dir) / "submit.sbatch"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a run.dir you can write to") from None
    return path


def submit_keeping_previous(o: SubmitOptions, text: str) -> tuple[str, Path]:
    """Write <run.dir>/submit.sbatch and sbatch it. When sbatch refuses (a partition, account or GPU request
    the cluster does not have), the run dir is left as it was: the previous script back in place, or no
    script and no run dir where there was none."""
    run_dir = Path(o.run_dir)
    made = missing_levels(run_dir)  # the directories this submission creates, deepest first
    script = run_dir / "submit.sbatch"
    previous = script.with_name(".submit.sbatch.previous")
    if script.exists():
        script.replace(previous)
    try:
        path = write_script(o, text)
        job = submit(path)
    except MaybeQueued:  # the job may run this script: keep it, and everything around it
        previous.unlink(missing_ok=True)
        raise
    except BaseException:
        script.unlink(missing_ok=True)
        if previous.exists():
            previous.replace(script)
        else:  # parents included: a refused `run.dir=/shared/new/exp/a` leaves no /shared/new -- but each only
            remove_levels(made)  # while empty: a parallel submission (or a job already started) may be using it
        raise
    previous.unlink(missing_ok=True)
    return job, path


class MaybeQueued(UserError):
    """sbatch did not answer (or was interrupted): SLURM may have queued the job all the same."""


def _sbatch() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise UserError("sbatch not found: install SLURM client or use --dry-run")
    return exe


def check_tools(mode: str) -> str:
    """The sbatch executable; also srun for --mode srun (its batch script calls srun on the first node)."""
    exe = _sbatch()
    if mode == "srun" and shutil.which("srun") is None:
        raise UserError("srun not found (needed by --mode srun): install the SLURM client or use --mode deepspeed")
    return exe


_UNREACHABLE = ("unable to contact slurm controller", "could not establish a configuration source",
                "is down", "connection refused", "zero bytes were transmitted")


def check_reachable(timeout: float = 20) -> None:
    """`scontrol ping`: fail in a second with one line instead of sbatch's ~10 s of retries and a long error."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return   # sbatch will say it
    try:
        proc = subprocess.run([scontrol, "ping"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"SLURM not reachable: `scontrol ping` did not answer in {timeout:.0f} s") from None
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip().strip("*")]
    if proc.returncode != 0 or not any(" is UP" in ln for ln in lines):
        said = "; ".join(ln for ln in lines if "RESTORE" not in ln)[:200] or f"exit code {proc.returncode}"
        raise UserError(f"SLURM not reachable: `scontrol ping` says: {said}; "
                        "start slurmctld or check slurm.conf / SLURM_CONF")


_SLURM_HOSTFILE = re.compile(r"^slurm-(\d+)\.hostfile$")


SUBMITTED = "submitted.json"  # written by `scaletrain submit`: the job may sit in the queue long before it starts


def hostfile_job(run_dir: str | Path) -> Optional[str]:
    """The job of the newest slurm-<job>.hostfile a batch script wrote (multi-node deepspeed ranks started over
    ssh see no SLURM_* variables, so older jobs left status.json without an id); None if there is none."""
    marks = [(f.stat().st_mtime, m[1]) for f in Path(run_dir).glob("slurm-*.hostfile") if (m := _SLURM_HOSTFILE.match(f.name))]
    return max(marks)[1] if marks else None


def submitted_job(run_dir: str | Path) -> Optional[str]:
    """The job `scaletrain submit` last sent for this run dir (submitted.json), or None."""
    try:
        job = json.loads((Path(run_dir) / SUBMITTED).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None
    return str(job) if job else None


def recorded_jobs(run_dir: str | Path) -> list[str]:
    """SLURM job ids the run dir knows of: the last submission's, the running job's (status.json) and the
    newest hostfile's."""
    try:
        running = json.loads((Path(run_dir) / "status.json").read_text()).get("slurm_job_id")
    except (OSError, ValueError, AttributeError):
        running = None
    jobs = [submitted_job(run_dir), str(running) if running else None, hostfile_job(run_dir)]
    return list(dict.fromkeys(j for j in jobs if j))


def check_run_dir_free(run_dir: str | Path, timeout: float = 20) -> None:
    """One run dir per job: refuse when a job recorded in the run dir is still known to SLURM (queued,
    running, requeued). Skipped when squeue is missing or does not answer."""
    jobs, squeue = recorded_jobs(run_dir), shutil.which("squeue")
    if not jobs or squeue is None:
        return
    for job in jobs:
        try:
            proc = subprocess.run([squeue, "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            return
        listed = [ln.split() for ln in proc.stdout.splitlines() if ln.split()]
        if proc.returncode == 0 and listed:
            state = listed[0][1] if len(listed[0]) > 1 else "queued"
            raise UserError(f"run.dir {run_dir} belongs to SLURM job {job} ({state}); one job per run dir: wait for "
                            f"it, stop it (scancel {job}) or pick another run.dir (--set run.dir=...)")


def record_submission(run_dir: str | Path, job: str, script: Path) -> None:
    from scaletrain.durable import write_text_atomic

    write_text_atomic(Path(run_dir) / SUBMITTED, json.dumps(
        {"job": job, "script": str(script), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def submit(script_path: str | Path, timeout: float | None = None) -> str:
    """`sbatch --parsable script`; returns the job id. Waits SCALETRAIN_SBATCH_TIMEOUT seconds (default 120)."""
    exe = _sbatch()
    if timeout is None:
        try:
            timeout = float(os.environ.get("SCALETRAIN_SBATCH_TIMEOUT", "120"))
        except ValueError:
            raise UserError("SCALETRAIN_SBATCH_TIMEOUT must be a number of seconds, e.g. 300") from None
    check = "check `squeue --me` before submitting again (a second job would share the run dir)"
    try:
        proc = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MaybeQueued(f"SLURM not reachable: sbatch did not answer in {timeout:.0f} s; the job may still have "
                          f"been queued: {check}") from None
    except KeyboardInterrupt:
        raise MaybeQueued(f"interrupted while sbatch ran; the job may have been queued: {check}") from None
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
        if any(k in msg.lower() for k in _UNREACHABLE):
            raise UserError(f"SLURM not reachable: {msg}")
        hint = " (CPU cluster without GPUs? use --gpus-per-node 0)" if "gres" in msg.lower() else ""
        raise UserError(f"sbatch rejected {script_path}: {msg}{hint}")
    return proc.stdout.strip().split(";")[0]   # "<id>" or "<id>;<cluster>"
