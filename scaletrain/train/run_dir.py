"""The run directory: what a run owns on disk and the checks made before anything in it is touched.

    <run.dir>/config.yaml      resolved config of the latest start; with growth.schedule, the model of the
                               newest checkpoints and the stages still to come (growth/schedule.py: advance)
    <run.dir>/growth/stageK/   the grown weights each growth boundary started from (with lineage.json)
    <run.dir>/ds_config.json   generated DeepSpeed config
    <run.dir>/status.json      state (running|finished|preempted|failed), step, last loss, rank 0's host/pid,
                               SLURM job id + restart count (launch_info); written at a start (loss cleared),
                               at each checkpoint and at the end
    <run.dir>/pids/            rank<N>.pid of every rank (pids in that rank's host's namespace)
    <run.dir>/checkpoints/     see checkpoint.py
    <run.dir>/tb/              TensorBoard event files
    <run.dir>/.trainer.lock    empty; held (flock) by the running trainer's rank 0
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from scaletrain.config import Config, build_config, config_yaml
from scaletrain.errors import UserError
from scaletrain.growth.schedule import stage_models
from scaletrain.durable import missing_levels, remove_levels, remove_matching, write_text_atomic


def launch_info() -> dict:
    """Where this start runs, for `scaletrain runs`: rank 0's host and pid, and the SLURM job (None outside
    SLURM, so a later non-SLURM start does not inherit an old job id from status.json)."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "slurm_restart_count": (int(restarts) if restarts and restarts.isdigit() else 0) if job else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(os.path.expanduser(str(path)))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def preflight(self, cfg: Config) -> None:
        """Fail before touching anything when the dir is unusable or belongs to a different model."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"run.dir {p} exists and is not a directory; choose another run.dir")
        probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"run.dir {p} is not writable ({probe} denies writes); choose a writable run.dir")
        if p.is_dir() and not (p / "checkpoints").is_dir() and (
                (p / "config.json").is_file() or any(p.glob("*.safetensors")) or any(p.glob("*model_states.pt"))):
            raise UserError(f"run.dir {p} holds a model's weights (a checkpoint or Hugging Face dir), not a run; training "
                            f"there would overwrite its files: use a new run.dir (init.from={p} starts from its weights)")
        for f in (self.config_path, p / "ds_config.json", p / "status.json", p / "lineage.json"):
            if f.exists() and not f.is_file():  # written at start: a directory there failed after the data was built
                raise UserError(f"{f} is not a file; move it away or use a new run.dir")
        previous = self.saved_config()
        # a growing run records its current (grown) model: any stage of the schedule is the same run. A start
        # that failed before its first step (a key mismatch in init.from, say) trained nothing to protect.
        if previous is not None and previous.model not in stage_models(cfg) and self._trained():
            diffs = [
                f"model.{k}: {getattr(previous.model, k)} -> {getattr(cfg.model, k)}"
                for k in type(cfg.model).model_fields
                if getattr(previous.model, k) != getattr(cfg.model, k)
            ]
            raise UserError(
                f"run.dir {p} holds a run of a different model ({'; '.join(diffs)}); "
                "use a new run.dir or the original model settings"
            )

    def _trained(self) -> bool:
        step = self.status().get("step")
        return any(self.checkpoints.glob("global_step*")) or (isinstance(step, int) and step > 0)

    def saved_config(self) -> Config | None:
        if not self.config_path.is_file():
            return None
        try:
            return build_config(yaml.safe_load(self.config_path.read_text()) or {})
        except UnicodeDecodeError:
            raise UserError(f"{self.config_path} is damaged (not UTF-8 text); restore it or use a new run.dir") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{self.config_path} is damaged (invalid YAML{where}); restore it or use a new run.dir") from None
        except UserError as e:
            raise UserError(f"{self.config_path} is damaged ({e}); restore it or use a new run.dir") from None

    # the files the trainer alone writes (write_text_atomic's temp names): a rank 0 killed mid-write leaves one
    STALE_TEMP_FILES = (".status.json.tmp-*", ".config.yaml.tmp-*", ".ds_config.json.tmp-*", "pids/..shared-check.tmp-*")

    def remove_stale_temp_files(self) -> None:
        """Rank 0, holding the run lock: no other writer of these files can be alive."""
        remove_matching(self.path, self.STALE_TEMP_FILES)

    def write_start(self, cfg: Config, ds_config: dict) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.config_path, config_yaml(cfg))
            write_text_atomic(self.path / "ds_config.json", json.dumps(ds_config, indent=2))
        except OSError as e:
            raise UserError(f"run.dir {self.path} cannot be written ({e.strerror or e}); free space there or choose "
                            "another run.dir") from None

    def check_shared(self, dist) -> None:
        """Collective. Every rank must see the run dir rank 0 writes: a node-local run.dir would get the other
        nodes' ZeRO shards written beside it, and checkpoints whose manifest lists only rank 0's node (found
        out only at resume). Rank 0 writes a fresh token; a rank that reads another stops every rank."""
        import secrets

        import torch.distributed as tdist

        from scaletrain.train.distributed import stop_all_if

        token, problem = [None], None
        probe = self.path / "pids" / ".shared-check"
        if dist.is_main:
            try:
                write_text_atomic(probe, secrets.token_hex(8))
                token[0] = probe.read_text()
            except OSError as e:  # said after the broadcast: the other ranks are already on their way into it
                problem = f"run.dir {self.path} cannot be written ({e.strerror or e}); choose another run.dir"
        if dist.world > 1:
            tdist.broadcast_object_list(token, src=0)
        if not dist.is_main and token[0] is None:
            problem = f"run.dir {self.path} cannot be written by rank 0 (its error says why); choose another run.dir"
        elif not dist.is_main:
            try:
                seen = probe.read_text()
            except OSError:
                seen = None
            if seen != token[0]:
                problem = (f"run.dir {self.path} is not the directory rank 0 writes (rank {dist.rank} on "
                           f"{socket.gethostname()} does not see its files): put run.dir on a filesystem every node shares")
        stop_all_if(problem, f"run.dir {self.path} is not shared with every node (another rank's error says which): put "
                    "run.dir on a filesystem every node shares")

    def write_status(self, **fields: Any) -> None:
        status = self.status()
        # no NaN in the file (a run stopped before its first step has no loss): strict JSON readers refuse it
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            write_text_atomic(self.path / "status.json", json.dumps(status, indent=1))
        except OSError as e:  # a full disk: the run goes on (or its real error is raised), status.json stays as it was
            print(f"warning: {self.path / 'status.json'} could not be updated ({e.strerror or e}); it keeps its "
                  "last state", flush=True)

    def status(self) -> dict:
        try:
            status = json.loads((self.path / "status.json").read_text())
        except (OSError, ValueError):  # missing, garbled or not UTF-8: the next write replaces it
            return {}
        return status if isinstance(status, dict) else {}


class RunLock:
    """One trainer per run dir. Two trainers on one run.dir (a second terminal, a job submitted twice) would
    race each other's checkpoints and TensorBoard files; the second one stops at `acquire` instead. flock,
    not a pid file: the kernel drops it when the holder dies, so a crash or a requeue never leaves it stale.
    Only rank 0 takes it. On filesystems without locks (some network mounts) it is skipped."""

    NAME = ".trainer.lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(os.path.expanduser(str(run_dir))) / self.NAME
        self.handle = None
        self.created: list[Path] = []  # what acquire made (the lock file, new run dir levels): a failed start removes them

    def acquire(self) -> None:
        new = missing_levels(self.path)
        try:  # the first write of a run: where the preflight's permission probe was not enough (root, /proc, ...)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"run.dir {self.path.parent} cannot be written ({e.strerror}); choose another run.dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            status = RunDir(self.path.parent).status()  # the holder's, once it has started training
            holder = f"pid {status['pid']} on {status['host']}" if status.get("state") == "running" else "starting"
            raise UserError(f"run.dir {self.path.parent} is in use by a running trainer ({holder}); wait for it to "
                            "end, stop it (kill -USR1 <pid>) or choose another run.dir") from None
        except OSError:  # no lock support here: go on unguarded rather than refuse to train
            handle.close()
            return
        self.handle = handle  # the file stays empty: a failed start leaves the run dir byte for byte as it was
        self.created = new

    def release(self, failed_start: bool = False) -> None:
        """`failed_start`: the start ended before training; what acquire created goes again where nothing else was
        written into it (a new run.dir that a typo in the data path would otherwise leave behind)."""
        if failed_start:  # while the lock is held: no trainer can take it meanwhile
            remove_levels(self.created)
        self.created = []
        if self.handle is not None:
            self.handle.close()  # closing the file drops the flock
            self.handle = None
