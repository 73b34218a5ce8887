"""The suite's CLI runner (tests/preloaded_cli.py: forks of a process that has imported torch and the CLI)
against the thing it stands for, a fresh `python -m` interpreter: the same exit code, stdout and last stderr
line, for each way a program can end. The bad-input tests rely on it to see tracebacks and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import preloaded_cli
from launch_utils import env, run_cli

PROBE = '''
import atexit, os, sys, threading, time

how = sys.argv[1]
print("out", os.getcwd() == sys.path[0], os.environ.get("PROBE_VALUE"), sys.argv[0].endswith("probe.py"))
print("err line", file=sys.stderr)
if how == "raise":
    raise ValueError("boom")
if how == "exit-text":
    sys.exit("bye")
if how == "exit-3":
    sys.exit(3)
if how == "ctrl-c":
    raise KeyboardInterrupt
if how == "thread":  # the interpreter waits for it before exiting
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
if how == "atexit":
    atexit.register(print, "at exit", file=sys.stderr)
if how == "leak":  # its resource tracker reports it when the process ends
    from multiprocessing import shared_memory
    shared_memory.SharedMemory(create=True, size=4096)
if how == "background":  # the command has ended, a process it started has not
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5); print('late')"])
if how == "unicode":
    print("\\u00e9\\u4e2d", "\\udcff", file=sys.stderr)  # (a lone surrogate: stderr escapes it)
'''


@pytest.mark.parametrize("how", ["ok", "raise", "exit-text", "exit-3", "ctrl-c", "thread", "atexit", "unicode",
                                 "leak", "background"])
def test_a_fork_ends_like_a_fresh_interpreter(tmp_path, how):
    (tmp_path / "probe.py").write_text(PROBE)
    environ = {**env(), "PROBE_VALUE": "seen"}
    fresh = subprocess.run([sys.executable, "-m", "probe", how], cwd=tmp_path, env=environ, capture_output=True,
                           text=True, errors="backslashreplace", timeout=60)
    started = time.monotonic()
    rc, out, err = preloaded_cli.run((how,), tmp_path, environ, timeout=60, main="probe")
    assert (rc, out) == (fresh.returncode, fresh.stdout), (rc, out, err, fresh)
    assert out.startswith("out True seen True"), out
    assert err.splitlines()[-1] == fresh.stderr.splitlines()[-1], (err, fresh.stderr)
    assert ("Traceback" in err) == ("Traceback" in fresh.stderr), (err, fresh.stderr)
    if how == "leak":
        assert "leaked shared_memory" in err, err
    if how == "background":  # waited for, as communicate() waits for what holds the pipes
        assert out.endswith("late\n") and time.monotonic() - started > 1.4, out


def test_an_environment_the_server_did_not_import_with_gets_a_fresh_interpreter(tmp_path):
    (tmp_path / "parent.py").write_text("import os\nprint(os.getppid())\n")
    preloaded_cli.forkserver(env())
    # what the suite's runs get: were it not the server's, every run would quietly be a fresh interpreter (a
    # test that ran scaletrain code in this process and left a variable in os.environ did that once)
    assert preloaded_cli.differing_at_import(env()) == []
    for extra, fresh in (({}, False), ({"PROBE_VALUE": "x"}, False), ({"HF_SCALETRAIN_PROBE": "1"}, True),
                         ({"PYTHONSCALETRAINPROBE": "0"}, True), ({"TORCH_EXTENSIONS_DIR": str(tmp_path)}, False)):
        rc, out, _ = preloaded_cli.run((), tmp_path, {**env(), **extra}, timeout=60, main="parent")
        assert rc == 0 and (int(out) == os.getpid()) == fresh, extra  # a fresh one is this process's child
        if fresh:
            (key,) = extra
            assert preloaded_cli.fallbacks.pop(key) == 1  # (counted; the suite's summary lists the others)


def test_the_cli_through_the_fork_and_a_fresh_interpreter(tmp_path, monkeypatch):
    for args in (["--help"], ["plan", "--config", "nowhere.yaml"], ["lineage", str(tmp_path / "none")]):
        forked = run_cli(*args, cwd=tmp_path)
        monkeypatch.setenv("SCALETRAIN_TEST_NO_FORK", "1")
        fresh = run_cli(*args, cwd=tmp_path)
        monkeypatch.delenv("SCALETRAIN_TEST_NO_FORK")
        assert forked == fresh, args
