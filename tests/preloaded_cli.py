"""`run_cli`'s processes, forked from one that has already imported torch, deepspeed, transformers and the CLI.

A fresh interpreter for each `scaletrain` command cost 2-3.5 s of imports, about 190 times in the suite (bad
input cases, grow/export/import round trips). A forkserver (multiprocessing's) imports them once; each command
is a fork of it: a process of its own (pid, session, working dir, environment, stdout and stderr files, exit
code) that runs `scaletrain.cli` as `__main__`, as `python -m scaletrain.cli` does, and exits the way the
interpreter would (traceback on stderr and 1 for an exception, SystemExit's code, atexit handlers, flushes).

What a fork cannot show, the imports working in a fresh interpreter, every training run and the README
quick-start still show: they start real processes (launch_utils.run_training).
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from multiprocessing.connection import wait
from pathlib import Path

from scaletrain.commands import MODULES

# What the commands import at their start (each imports lazily, so a fresh process paid for it every time).
# Not scaletrain.cli itself: it runs as __main__, and `python -m` finds it not yet imported.
PRELOAD = ["torch", "torch._dynamo", "deepspeed", "transformers", "safetensors.torch",
           "tensorboard.backend.event_processing", *(f"scaletrain.commands.{name}" for name in MODULES),
           "scaletrain.config", "scaletrain.train.loop"]

_start_lock = threading.Lock()
# Reading a child's exit code consumes it from a pipe, and Process.start() reads every earlier child's that has
# ended: two threads reading one child's then race, and the loser records 255. So both happen under this lock.
_status_lock = threading.Lock()
_context = None


def forkserver(environ: dict) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started once with `environ` (what env() gives every command), so
    what the preloaded modules read from the environment at import is what a fresh process would read."""
    global _context
    with _start_lock:
        if _context is None:
            from multiprocessing import forkserver as server

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(environ)
            try:
                server.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            _context = ctx
    return _context


def run(args: tuple[str, ...], cwd: Path | str, environ: dict, timeout: float, main: str = "scaletrain.cli",
        merged: bool = False) -> tuple[int, str, str]:
    """`python -m MAIN ARGS`, or `python MAIN ARGS` for a MAIN ending in .py, in cwd with environ ->
    (returncode, stdout, stderr), or stdout and stderr as one stream in stdout if `merged`. Past `timeout` its
    process group is killed and AssertionError says so."""
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = forkserver(environ).Process(target=_command,
                                           args=(main, args, str(cwd), environ, str(out), None if merged else str(err)))
        with _status_lock:
            proc.start()
        finished = wait([proc.sentinel], timeout)
        if not finished:
            _kill_group(proc.pid)
            wait([proc.sentinel])
        with _status_lock:
            code = proc.exitcode
            proc.close()  # its pipes, now rather than at garbage collection
        if not finished:
            raise AssertionError(f"{main} {' '.join(args)} did not finish in {timeout} s\n"
                                 f"{_read(out)[-3000:]}\n{_read(err)[-3000:]}")
        return code, _read(out), _read(err)


def _read(path: Path) -> str:
    return path.read_text(errors="backslashreplace") if path.exists() else ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _command(main: str, args, cwd: str, environ: dict, out: str, err: str | None) -> None:
    """In the fork: become the process `python [-m] MAIN ARGS` would be, run it, exit as it would."""
    os.setsid()  # a process group of its own, as run_training's processes (a timeout kills all it started)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    for fd, path in ((1, out), (2, err)):
        if path is None:  # one stream, as stderr=subprocess.STDOUT gives
            os.dup2(1, 2)
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    # PYTHONUNBUFFERED=1, as env() sets: every write reaches the file at once (stderr escapes what it cannot encode)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                                   errors="backslashreplace")
    script = main.endswith(".py")
    sys.path.insert(0, os.path.dirname(os.path.abspath(main)) if script else os.getcwd())  # as python does
    sys.argv = [main if script else importlib.util.find_spec(main).origin, *args]
    code = _exit_code_of_main(main, script)
    if code < 0:  # an uncaught Ctrl-C: the interpreter ends itself with SIGINT, so the parent sees -SIGINT
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _exit_code_of_main(main: str, script: bool) -> int:
    """Run the module or script as __main__; the exit code the interpreter would give (-signal for an uncaught
    KeyboardInterrupt), after what it does at exit."""
    import atexit
    import runpy

    try:
        if script:
            runpy.run_path(main, run_name="__main__")
        else:
            runpy.run_module(main, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _system_exit_code(e.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 (what an uncaught exception does: its traceback, exit code 1)
        sys.excepthook(*sys.exc_info())
        code = 1
    for thread in threading.enumerate():  # the interpreter waits for non-daemon threads before it exits
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def _system_exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
