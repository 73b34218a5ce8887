"""A rank's console may go away under it (a multi-node launcher's ssh connection closed by scancel): its writes
are then dropped instead of raising in the middle of a step or a checkpoint. (End to end, on two hosts over
ssh: tests/cluster/test_multinode.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from launch_utils import TINY, kill_group, small_corpus, start_training
from scaletrain.train.console import _Survivor


def test_writes_after_the_reader_has_gone_are_dropped():
    read_end, write_end = os.pipe()
    stream = _Survivor(os.fdopen(write_end, "w", buffering=1))
    assert stream.fileno() == write_end  # the stream's own attributes pass through
    print("first line", file=stream, flush=True)
    assert os.read(read_end, 100) == b"first line\n"
    os.close(read_end)
    for _ in range(3):  # the raw stream raises BrokenPipeError here
        print("nobody reads this", file=stream, flush=True)
    assert stream.lost
    stream.flush()


def test_a_full_disk_under_the_log_drops_lines_while_it_lasts_and_other_errors_are_not_hidden():
    """SLURM writes the job's output into run.dir: when that disk filled, the next step line killed the run."""
    class Disk:
        full, lines = True, []

        def write(self, text):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.lines.append(text)
            return len(text)

        def flush(self):
            pass

    disk = Disk()
    out = _Survivor(disk)
    assert out.write("lost\n") == 5 and not out.lost
    disk.full = False
    out.write("back\n")
    assert disk.lines == ["back\n"]

    class Broken:
        def write(self, text):
            raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file"):
        _Survivor(Broken()).write("x")


def test_a_process_whose_stdout_reader_exits_keeps_running(tmp_path):
    """The same in a whole process: it prints a line after its reader has gone and still finishes its work."""
    code = ("import sys, time; from scaletrain.train.console import survive_lost_console; survive_lost_console(); "
            "print('ready', flush=True); sys.stdin.readline(); print('after', flush=True); "
            "open(sys.argv[1], 'w').write('done')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "marker")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.stdout.close()  # the reader goes away
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "marker").read_text() == "done"


def test_ctrl_c_after_the_console_has_gone_still_checkpoints(tmp_path, data_cache_dir):
    """`deepspeed ... | tee log` and Ctrl-C: tee dies of the same SIGINT, and the rank's "stopping after this step"
    line raised BrokenPipeError inside its signal handler: state failed, no checkpoint."""
    run = tmp_path / "run"
    proc = start_training(1, [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={data_cache_dir}",
                              f"run.dir={run}", "train.max_steps=5000"])
    try:
        while not proc.stdout.readline().startswith("step      2/"):
            assert proc.poll() is None, "training ended before step 2"
        proc.stdout.close()  # the console goes away, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        kill_group(proc)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted", status
    assert (run / "checkpoints" / "latest").read_text() == f"global_step{status['step']}"
