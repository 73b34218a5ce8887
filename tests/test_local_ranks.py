"""scripts/local_ranks.py (the tests' rank launcher) keeps the `deepspeed` launcher's contract."""

from __future__ import annotations

import subprocess
import sys
import time

from launch_utils import REPO

LAUNCHER = str(REPO / "scripts" / "local_ranks.py")

# Rank 1 fails at once; rank 0 would sleep for a minute unless the launcher stops it.
SCRIPT = """
import os, sys, time
# one write per line: ranks run with `python -u` and share the pipe (print's pieces would interleave)
sys.stdout.write(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} local {os.environ['LOCAL_RANK']} {sys.argv[1:]}\\n")
if os.environ["RANK"] == "1":
    sys.exit(7)
time.sleep(60)
"""


def test_ranks_get_the_launcher_environment_and_one_failure_stops_all(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    t0 = time.time()
    proc = subprocess.run([sys.executable, LAUNCHER, "2", str(script), "--x", "1"], capture_output=True, text=True,
                          timeout=50)
    assert proc.returncode == 7, proc.stderr
    assert time.time() - t0 < 30, "the sleeping rank was not stopped"
    lines = sorted(proc.stdout.splitlines())
    assert lines == ["rank 0 of 2 local 0 ['--local_rank=0', '--x', '1']",
                     "rank 1 of 2 local 1 ['--local_rank=1', '--x', '1']"]


def test_all_ranks_succeeding_is_success(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("import os\nassert os.environ['MASTER_ADDR'] and int(os.environ['MASTER_PORT']) > 0\n")
    assert subprocess.run([sys.executable, LAUNCHER, "3", str(script)], timeout=50).returncode == 0


def test_sigint_to_the_launcher_reaches_the_ranks_as_sigterm(tmp_path):
    """Ctrl-C in a terminal reaches the ranks and the launcher alike: the launcher passes on SIGTERM (as DeepSpeed's
    does), which the trainer takes as the same stop request, not a second Ctrl-C that aborts its checkpoint."""
    import signal

    script = tmp_path / "rank.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda s, f: (sys.stdout.write('TERM\\n'), sys.exit(0)))\n"
                      "signal.signal(signal.SIGINT, lambda s, f: (sys.stdout.write('INT\\n'), sys.exit(0)))\n"
                      "sys.stdout.write('ready\\n')\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, LAUNCHER, "2", str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n" and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 1 and out.split() == ["TERM", "TERM"], out


def test_nothing_a_killed_rank_started_outlives_the_launcher(tmp_path):
    """A rank killed while its compiler ran (the first kernel build) left ninja and cc1plus compiling after the
    launcher had exited (and held its output pipe). Here rank 0 starts a long child and is killed; rank 1 then
    fails the run."""
    import psutil

    script = tmp_path / "rank.py"
    script.write_text("import os, signal, subprocess, sys, time\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    child = subprocess.Popen(['sleep', '300'])\n"
                      f"    open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(2)\n"
                      "sys.exit(3)\n")
    proc = subprocess.run([sys.executable, LAUNCHER, "2", str(script)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 137, proc.stderr  # the first failure's code: killed by SIGKILL
    pid = int((tmp_path / "child.pid").read_text())
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert not alive, f"rank 0's child {pid} still runs"
