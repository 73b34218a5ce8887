"""Fast unit tests of scaletrain.cluster: hostfile parsing/filters and sbatch rendering (no daemons)."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from scaletrain.cluster import slurm
from scaletrain.cluster.hostfile import format_hostfile, parse_hostfile, read_hostfile, resolve_filters
from scaletrain.commands import submit as submit_cli
from scaletrain.cluster.slurm import SubmitOptions, render_sbatch, time_limit_seconds
from scaletrain.errors import UserError

# ---- hostfile -------------------------------------------------------------------------------------------


def test_parse_comments_blank_lines_and_order():
    text = "# cluster\n\nworker-1 slots=8   # fast one\n  worker-0 slots=2\n10.0.0.5\tslots=1\n"
    hosts = parse_hostfile(text)
    assert list(hosts.items()) == [("worker-1", 8), ("worker-0", 2), ("10.0.0.5", 1)]


def test_example_hostfile_parses():
    assert read_hostfile(slurm.REPO_ROOT / "hostfile.example") == {"worker-0": 8, "worker-1": 8}


@pytest.mark.parametrize("text, needle", [
    ("a slots=1\nb\n", "hostfile:2: cannot parse 'b'"),
    ("a slots=two\n", "hostfile:1: cannot parse"),
    ("a slots=1 extra\n", "hostfile:1: cannot parse"),
    ("a slots = 1\n", "hostfile:1: cannot parse"),   # DeepSpeed's runner rejects spaces around '='
    ("a:0 slots=1\n", "hostfile:1: cannot parse"),
    ("a slots=0\n", "hostfile:1: host a has slots=0"),
    ("a slots=-2\n", "hostfile:1: host a has slots=-2"),
    ("a slots=1\n\nb slots=1\na slots=4\n", "hostfile:4: host a is listed again (first on line 1)"),
    ("# nothing\n\n", "no hosts found"),
])
def test_parse_errors_name_line_and_fix(text, needle):
    with pytest.raises(UserError) as e:
        parse_hostfile(text)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg
    assert ("slots" in msg) or ("one line per host" in msg)


def test_read_hostfile_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_hostfile(tmp_path / "nope")


def test_format_roundtrip():
    hosts = {"n1": 2, "n2": 2}
    assert parse_hostfile(format_hostfile(hosts)) == hosts
    assert format_hostfile(["a", "b"], slots=1) == "a slots=1\nb slots=1\n"


HOSTS = {"w0": 4, "w1": 4, "w2": 2}


def test_filters():
    assert resolve_filters(HOSTS) == {"w0": [0, 1, 2, 3], "w1": [0, 1, 2, 3], "w2": [0, 1]}
    assert resolve_filters(HOSTS, include="w2@w0:1,3") == {"w0": [1, 3], "w2": [0, 1]}  # hostfile order kept
    assert resolve_filters(HOSTS, exclude="w1@w0:0") == {"w0": [1, 2, 3], "w2": [0, 1]}
    assert resolve_filters(HOSTS, include="w0:1@w0") == {"w0": [1]}  # DeepSpeed merges the mentions' slots


@pytest.mark.parametrize("kw", [dict(include="w2@w0:1,3"), dict(exclude="w1@w0:0"), dict(include="w0:1@w0"),
                                dict(exclude="w0:1@w0"), dict(include="w1:0@w1:2,3@w2"), dict(exclude="w2:1@w1:0,3")])
def test_filters_select_the_slots_deepspeeds_runner_selects(kw):
    """The oracle: DeepSpeed's own parse_resource_filter on the same hosts (it decides what actually starts)."""
    from deepspeed.launcher.runner import parse_resource_filter

    theirs = parse_resource_filter({h: list(range(n)) for h, n in HOSTS.items()}, kw.get("include", ""),
                                   kw.get("exclude", ""))
    assert resolve_filters(HOSTS, **kw) == {h: sorted(s) for h, s in theirs.items() if s}


@pytest.mark.parametrize("kw, needle", [
    ({"include": "w9"}, "--include: unknown host 'w9'; the hostfile has w0, w1, w2"),
    ({"exclude": "w0@nope:1"}, "--exclude: unknown host 'nope'"),
    ({"include": "w2:2"}, "host w2 has slots 0..1, not 2"),
    ({"include": "w0:x"}, "slot 'x' on host w0 is not a number"),
    ({"include": "w0@@w1"}, "empty entry"),
    ({"include": "w0", "exclude": "w1"}, "cannot be used together"),
    ({"exclude": "w0@w1@w2"}, "leaves no host"),
])
def test_filter_errors(kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        resolve_filters(HOSTS, **kw)


# ---- sbatch rendering ------------------------------------------------------------------------------------


def opts(**kw) -> SubmitOptions:
    base = dict(config="/repo/configs/tiny.yaml", run_dir="/runs/t1", python="/venv/bin/python", workdir="/repo")
    base.update(kw)
    return SubmitOptions(**base)


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("value, seconds", [
    ("04:00:00", 14400), ("0:05:30", 330), ("1-12:00:00", 129600), ("90", 5400), ("100:00:00", 360000),
])
def test_time_limit_forms(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("value", ["1h", "12:00", "00:61:00", "1-25:00:00", "", "0", "00:00:00", "-5", "1.5"])
def test_time_limit_rejected(value):
    with pytest.raises(UserError, match="--time"):
        time_limit_seconds(value)


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_render_common_parts(mode):
    s = render_sbatch(opts(mode=mode, nodes=2, time="02:00:00", overrides=["train.max_steps=50", "run.dir=/runs/t1"]))
    d = directives(s)
    assert s.startswith("#!/bin/bash\n")
    assert "{{" not in s
    for want in ["--nodes=2", "--ntasks-per-node=1", "--time=02:00:00", "--requeue", "--signal=B:USR1@300",
                 "--output=/runs/t1/slurm-%j.out", "--open-mode=append", "--chdir=/repo", "--exclusive",
                 "--job-name=st-t1"]:
        assert want in d
    assert not any("gpu" in x or "gres" in x for x in d)   # CPU nodes: no GPU request at all
    assert "trap 'on_stop USR1' USR1" in s
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in s
    assert f"TRAIN=({slurm.TRAIN_PY} --config /repo/configs/tiny.yaml --set train.max_steps=50 run.dir=/runs/t1)" in s
    assert "RANKS_PER_NODE=1" in s


def test_render_deepspeed_mode():
    s = render_sbatch(opts(mode="deepspeed"))
    assert '-m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher pdsh' in s
    assert "pdsh -w" in s and "srun " not in s


def test_render_srun_mode():
    s = render_sbatch(opts(mode="srun", nodes=4))
    assert '--no_ssh --node_rank "$SLURM_NODEID"' in s
    assert '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"' in s
    assert "srun --ntasks-per-node=1" in s and "export -f node_task" in s


def test_render_gpus_and_scheduling_flags():
    s = render_sbatch(opts(gpus_per_node=8, partition="gpu", account="proj1", qos="high", time="1-00:00:00",
                           grace=600, exclusive=False))
    d = directives(s)
    for want in ["--gpus-per-node=8", "--partition=gpu", "--account=proj1", "--qos=high", "--signal=B:USR1@600"]:
        assert want in d
    assert "--exclusive" not in d
    assert "--cpus-per-task=8" in d   # shared nodes: one CPU per rank at least (SLURM's default is one per task)
    assert "RANKS_PER_NODE=8" in s
    assert "--cpus-per-task=16" in directives(render_sbatch(opts(ranks_per_node=2, exclusive=False, cpus_per_node=16)))


def test_ranks_per_node_on_cpu_and_default_grace():
    s = render_sbatch(opts(gpus_per_node=0, ranks_per_node=4, time="10"))
    assert "RANKS_PER_NODE=4" in s
    assert "--signal=B:USR1@300" in directives(s)
    assert "--signal=B:USR1@60" in directives(render_sbatch(opts(time="2")))   # half of a 2-minute limit


@pytest.mark.parametrize("kw, needle", [
    ({"nodes": 0}, "--nodes 0"),
    ({"time": "2 hours"}, "--time"),
    ({"grace": 3600, "time": "00:30:00"}, "--grace 3600s is not shorter"),
    ({"grace": 0}, "--grace 0"),
    ({"ranks_per_node": 0}, "--ranks-per-node 0"),
    ({"gpus_per_node": 2, "ranks_per_node": 4}, "exceeds --gpus-per-node"),
    ({"gpus_per_node": -1}, "--gpus-per-node -1"),
    ({"mode": "mpi"}, "--mode 'mpi'"),
    ({"partition": "a b"}, "--partition"),
    ({"run_dir": "/runs/my run"}, "run.dir"),
    ({"overrides": ["data.source=$(rm -rf /)"]}, "--set"),
    ({"overrides": ["novalue"]}, "--set"),
    ({"run_dir": "/runs/r%x"}, "contains '%'"),
    ({"cpus_per_node": 4}, "only with --no-exclusive"),
    ({"exclusive": False, "ranks_per_node": 4, "cpus_per_node": 2}, "at least one CPU per rank"),
])
def test_render_rejects(kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        render_sbatch(opts(**kw))


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_rendered_script_is_valid_bash(mode):
    script = render_sbatch(opts(mode=mode, nodes=2, gpus_per_node=4))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _snippet(script: str, first: str, last: str) -> str:
    """The lines of `script` from the one starting with `first` through the one starting with `last`."""
    lines = script.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(first))
    j = next(n for n, ln in enumerate(lines) if n >= i and ln.startswith(last))
    return "\n".join(lines[i:j + 1]) + "\n"


def _bash(snippet: str, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -uo pipefail\n" + snippet], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_deepspeed_env_file_carries_job_id_to_every_rank(tmp_path):
    """Ranks started over pdsh see SLURM_JOB_ID/SLURM_RESTART_COUNT only through DeepSpeed's env file: the
    script writes a job-specific one (the user's lines + those two) and points DS_ENV_FILE at it."""
    s = render_sbatch(opts(mode="deepspeed", nodes=2))
    assert "DS_ENV=$RUN_DIR/slurm-$SLURM_JOB_ID.deepspeed_env" in s and "export DS_ENV_FILE=$DS_ENV" in s
    assert 'echo "SLURM_JOB_ID=$SLURM_JOB_ID"' in s and 'echo "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"' in s
    assert s.index("export DS_ENV_FILE") < s.index("-m deepspeed.launcher.runner")
    block = _snippet(s, "DS_ENV=", "export DS_ENV_FILE") + 'echo "$DS_ENV_FILE"\n'
    home, work, run = tmp_path / "home", tmp_path / "work", tmp_path / "run"
    for d in (home, work, run):
        d.mkdir()
    (home / ".deepspeed_env").write_text("PATH=/shared/venv/bin:/usr/bin\n\n# a comment\nGLOO_SOCKET_IFNAME=eth0")
    (work / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n")
    p = _bash(block, work, HOME=str(home), RUN_DIR=str(run), SLURM_JOB_ID="77")
    env_file = run / "slurm-77.deepspeed_env"
    assert p.returncode == 0 and p.stdout.strip() == str(env_file), p.stderr
    lines = env_file.read_text().splitlines()
    assert lines == ["PATH=/shared/venv/bin:/usr/bin", "GLOO_SOCKET_IFNAME=eth0", "NCCL_SOCKET_IFNAME=ib0",
                     "SLURM_JOB_ID=77", "SLURM_RESTART_COUNT=0"]
    assert all("=" in ln for ln in lines)   # DeepSpeed's runner splits every line at '='
    # DS_ENV_FILE given (absolute): only that file, read once; a requeued start rewrites the file
    custom = tmp_path / "my_env"
    custom.write_text("DS_ACCELERATOR=cpu\n")
    p = _bash(block, work, HOME=str(home), RUN_DIR=str(run), SLURM_JOB_ID="77", SLURM_RESTART_COUNT="2",
              DS_ENV_FILE=str(custom))
    assert p.returncode == 0, p.stderr
    assert env_file.read_text() == "DS_ACCELERATOR=cpu\nSLURM_JOB_ID=77\nSLURM_RESTART_COUNT=2\n"
    assert "DS_ENV_FILE" not in render_sbatch(opts(mode="srun"))   # srun tasks inherit the job's environment


@pytest.mark.parametrize("mode", ["deepspeed", "srun"])
def test_batch_script_checks_its_hostfile(tmp_path, mode):
    """Before starting the launcher, the job checks the hostfile it built with scaletrain.cluster.hostfile."""
    s = render_sbatch(opts(mode=mode))
    assert f"REPO={slurm.REPO_ROOT}\n" in s
    block = 'log() { echo "LOG $*"; }\n' + _snippet(s, "if ! HOSTFILE_ERR=", "fi")
    hostfile = tmp_path / "h"
    hostfile.write_text("n1 slots=2\nn2:x slots=2\n")
    env = dict(REPO=str(slurm.REPO_ROOT), PYTHON=sys.executable, HOSTFILE=str(hostfile))
    p = _bash(block + "echo started\n", tmp_path, **env)
    assert p.returncode == 2 and "started" not in p.stdout, p.stdout + p.stderr
    assert p.stdout.startswith(f"LOG error: {hostfile}:2: cannot parse") and p.stdout.count("\n") == 1, p.stdout
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    p = _bash(block + "echo started\n", tmp_path, **env)
    assert p.returncode == 0 and p.stdout == "started\n", p.stdout + p.stderr


@pytest.mark.parametrize("state, latest, requeued, rc", [
    ("preempted", "global_step20", True, 0),    # checkpointed on USR1: walk on
    ("failed", "global_step20", True, 0),       # the last save failed, but an earlier one of this start landed
    ("preempted", "global_step10", False, 1),   # nothing new since the start (saves fail): requeueing would loop
    ("preempted", "global_step10 again", True, 0),  # fell back from a damaged step 10, trained, saved step 10 anew
    ("unknown", None, False, 1),                # never got to train, no checkpoint at all
    ("finished", "global_step20", False, 0),
])
def test_requeue_only_after_progress(tmp_path, state, latest, requeued, rc):
    """After USR1 the job requeues itself only when this start wrote a newer checkpoint than it resumed from."""
    s = render_sbatch(opts())
    assert "LATEST_AT_START=$(cat" in s
    stubs = (f'log() {{ echo "LOG $*"; }}\nrun_state() {{ echo {state}; }}\nscontrol() {{ echo "SCONTROL $*"; }}\n'
             f'LATEST={tmp_path}/latest\nLATEST_AT_START={"global_step10" if latest else ""}\nREQUEUE=1 TERMINATING=0\n'
             f'HOSTFILE={tmp_path}/hostfile\n')
    (tmp_path / "hostfile").write_text("n1 slots=2\n")  # written at this start
    if latest:
        (tmp_path / "latest").write_text(latest.split()[0])
        saved = 100 if latest.endswith("again") else -100  # seconds after (before) the start
        start = (tmp_path / "hostfile").stat().st_mtime
        os.utime(tmp_path / "latest", (start + saved, start + saved))
    p = _bash(stubs + _snippet(s, "finish() {", "}") + "finish 0\n", tmp_path, SLURM_JOB_ID="5")
    assert p.returncode == rc, p.stdout + p.stderr
    assert ("SCONTROL requeue 5" in p.stdout) == requeued, p.stdout
    if not requeued and state != "finished":
        assert "not requeueing: no new checkpoint since this start" in p.stdout


def test_signal_command_targets_launcher_children_only():
    """The pgrep pattern in the script must hit DeepSpeed's per-node launcher and nothing that merely
    mentions it (pdsh/ssh/bash command lines), and only for this job's port."""
    s = render_sbatch(opts())
    pattern = re.search(r"pgrep -f '([^']*)'", s)[1].replace("$MASTER_PORT", "31234").replace("\\$", "$")
    hit = "/venv/bin/python3 -u -m deepspeed.launcher.launch --world_info=e30= --master_addr=n1 --master_port=31234 x.py"
    misses = [
        hit.replace("31234", "312345"),
        hit.replace("31234", "31235"),
        "pdsh -S -f 1024 -w n1,n2 export X=1; cd /r; /venv/bin/python -u -m deepspeed.launcher.launch --master_port=31234 x",
        "bash -c /venv/bin/python -u -m deepspeed.launcher.launch --master_port=31234",
        "/venv/bin/python -u -m deepspeed.launcher.runner --master_port 31234",
    ]
    grep = shutil.which("grep")
    run = lambda line: subprocess.run([grep, "-qE", pattern], input=line, text=True).returncode == 0  # noqa: E731
    assert run(hit) and run(hit.replace("x.py", "").rstrip())
    assert not any(run(m) for m in misses)


def test_signal_command_stops_only_this_jobs_ranks(tmp_path):
    """Two jobs on one node can share a port (job ids 3000 apart): the launcher's environment decides. Stand-in
    launchers (the command line DeepSpeed's has), each with a child "rank" that records a USR1."""
    from launch_utils import wait_for

    (tmp_path / "rank.sh").write_text('trap \'echo stopped > "$OUT"; exit\' USR1\nwhile :; do sleep 0.05; done\n')
    (tmp_path / "launcher.sh").write_text(f"bash {tmp_path / 'rank.sh'} &\nwait\n")
    name = "/venv/bin/python -u -m deepspeed.launcher.launch --world_info=e30= --master_port=29577 x.py"
    launchers = [subprocess.Popen(["bash", "-c", f'exec -a "{name}" bash {tmp_path / "launcher.sh"}'],
                                  env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": job, "OUT": str(tmp_path / job)})
                 for job in ("77", "3077")]
    try:
        assert wait_for(lambda: all(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True).stdout
                                    for p in launchers), 10)
        export = _snippet(render_sbatch(opts()), "export SIGNAL_RANKS=", "export SIGNAL_RANKS=")
        p = _bash(export + 'bash -c "$SIGNAL_RANKS"', tmp_path, MASTER_PORT="29577", SLURM_JOB_ID="77")
        assert p.stdout.split() == ["signalled"], p.stdout + p.stderr
        assert wait_for(lambda: (tmp_path / "77").exists(), 10)
        time.sleep(0.3)
        assert not (tmp_path / "3077").exists()   # the other job's rank trains on
    finally:
        for p in launchers:
            subprocess.run(["pkill", "-KILL", "-P", str(p.pid)])
            p.kill()
            p.wait()


def test_submit_command_dry_run_and_missing_sbatch(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    submit_cli.add_submit_args(p)
    args = p.parse_args(["--config", str(cfg), "--set", "train.max_steps=5", "--time", "00:10:00", "--dry-run",
                         "--python", sys.executable])
    assert submit_cli.run(args) == 0
    assert "--time=00:10:00" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()   # --dry-run only prints

    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    args.dry_run = False
    with pytest.raises(UserError, match="sbatch not found: install SLURM client or use --dry-run"):
        submit_cli.run(args)
    with pytest.raises(UserError, match="sbatch not found"):
        slurm.submit("/x.sbatch")


@pytest.mark.parametrize("present", [{}, {"MASTER_ADDR": "w0"}, {"MASTER_PORT": "29500"}])
def test_mpirun_start_without_rendezvous_address_is_one_line(monkeypatch, present):
    """`--launcher openmpi`: mpirun sets neither variable, and DeepSpeed without both falls back to mpi4py
    discovery (an ImportError traceback on every rank)."""
    from scaletrain.errors import UserError
    from scaletrain.train import distributed

    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    for k, v in present.items():
        monkeypatch.setenv(k, v)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in present]
    with pytest.raises(UserError, match=f"started by mpirun without {' and '.join(missing)}"):
        distributed.setup()


def test_a_refused_submission_leaves_a_parallel_ones_directories(tmp_path, monkeypatch):
    """Two submissions into new sibling run dirs (a sweep): the refused one removes its own run dir and the
    parents only while they are empty (it used to remove the shared new parent, the other job's script in it)."""
    def sibling_submits_then_refused(path, *a, **k):
        (tmp_path / "new" / "exp" / "b").mkdir(parents=True, exist_ok=True)
        (tmp_path / "new" / "exp" / "b" / "submit.sbatch").write_text("the other job's script\n")
        raise UserError("sbatch: error: invalid partition")

    monkeypatch.setattr(slurm, "submit", sibling_submits_then_refused)
    o = opts(run_dir=str(tmp_path / "new" / "exp" / "a"))
    with pytest.raises(UserError, match="invalid partition"):
        slurm.submit_keeping_previous(o, render_sbatch(o))
    assert not (tmp_path / "new" / "exp" / "a").exists()
    assert (tmp_path / "new" / "exp" / "b" / "submit.sbatch").read_text() == "the other job's script\n"
    monkeypatch.setattr(slurm, "submit", lambda *a, **k: (_ for _ in ()).throw(UserError("refused")))
    o = opts(run_dir=str(tmp_path / "lone" / "x" / "a"))
    with pytest.raises(UserError):
        slurm.submit_keeping_previous(o, render_sbatch(o))
    assert not (tmp_path / "lone").exists()   # alone, every directory it made is gone again

    def someone_writes_into_it_then_refused(path, *a, **k):  # while a slow sbatch runs
        (path.parent / "notes.txt").write_text("mine\n")
        raise UserError("sbatch: error: invalid partition")

    monkeypatch.setattr(slurm, "submit", someone_writes_into_it_then_refused)
    o = opts(run_dir=str(tmp_path / "busy" / "a"))
    with pytest.raises(UserError):
        slurm.submit_keeping_previous(o, render_sbatch(o))
    assert (tmp_path / "busy" / "a" / "notes.txt").read_text() == "mine\n"  # rmtree deleted it with the run dir
    assert not (tmp_path / "busy" / "a" / "submit.sbatch").exists()


@pytest.mark.parametrize("per_node, want", [("128(x2),96", "96"), ("64", "64"), ("32,48(x3)", "32")])
def test_srun_mode_asks_each_node_for_the_smallest_nodes_cpus(tmp_path, per_node, want):
    """A step takes one --cpus-per-task for all its nodes: the smallest node's, not the batch node's (which
    made srun refuse the step on a partition of mixed node types)."""
    block = _snippet(render_sbatch(opts(mode="srun")), "cpus_per_node() {", "}")
    p = _bash(block + "cpus_per_node\n", tmp_path, SLURM_JOB_CPUS_PER_NODE=per_node, SLURM_CPUS_ON_NODE="128")
    assert p.returncode == 0 and p.stdout.strip() == want, p.stdout + p.stderr

