"""The suite's `scaletrain` commands and 1-rank training runs, forked from a process that has imported torch,
deepspeed, transformers and the commands already.

A fresh interpreter for each cost 2-3.5 s of imports, about 220 times in the suite (bad-input cases,
grow/export/import round trips, short training runs). A forkserver (multiprocessing's) imports them once; each
run is a fork of it: a process of its own (pid, session, working dir, environment, stdout and stderr files,
exit code) that runs its module or script as `__main__`, as `python -m MODULE` / `python SCRIPT` do, and ends
the way the interpreter would (traceback on stderr and 1 for an exception, SystemExit's code, -SIGINT for
Ctrl-C, non-daemon threads joined, atexit handlers, flushes); `run` returns when every process in its group
has ended, as `communicate()` waits for whatever holds the pipes. tests/test_preloaded_cli.py checks this
against fresh interpreters.

What a fork cannot show: the imports working in a fresh interpreter, a module used without being imported
(the fork has the preloaded ones), string hashes and set orders that differ from run to run (every fork has
the server's hash seed). Multi-rank runs, every process a test signals or reads while it runs, and the README
quick-start start fresh interpreters; SCALETRAIN_TEST_NO_FORK=1 makes every run one. A run whose environment
differs from the server's in a variable read at import (READ_AT_IMPORT) gets a fresh interpreter too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

from scaletrain.commands import MODULES

# What the commands import at their start (each imports lazily, so a fresh process paid for it every time).
# Not scaletrain.cli itself: it runs as __main__, and `python -m` finds it not yet imported.
PRELOAD = ["torch", "torch._dynamo", "deepspeed", "transformers", "safetensors.torch",
           "tensorboard.backend.event_processing", *(f"scaletrain.commands.{name}" for name in MODULES),
           "scaletrain.config", "scaletrain.train.loop"]

# Prefixes of variables that the interpreter or a preloaded module reads once, at start-up or import.
READ_AT_IMPORT = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TMPDIR", "OMP_", "MKL_", "KMP_",
                  "LANG", "LC_", "DS_", "DEEPSPEED", "CUDA", "NCCL", "TORCH", "PYTORCH", "TRITON")
# Read later, or set by scaletrain itself before they are read (a fresh process sets them at the same point; a
# test that ran that code in pytest's own process leaves them in os.environ, and so in env()).
READ_LATER = {"TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM"}
fallbacks: dict[str, int] = {}  # variable -> runs given a fresh interpreter because of it (conftest reports them)

_start_lock = threading.Lock()
# Reading a child's exit code consumes it from a pipe, and Process.start() reads every earlier child's that has
# ended: two threads reading one child's then race, and the loser records 255. So both happen under this lock.
_status_lock = threading.Lock()
_context = None
_server_environs: tuple[dict, dict] = ({}, {})  # what the server started with, and had after its imports


def forkserver(environ: dict) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started once with `environ` (what env() gives every run), so that
    what the preloaded modules read from the environment at import is what a fresh process would read.
    Start it before threads that read os.environ (bad_input_harness does): this swaps os.environ meanwhile."""
    global _context, _server_environs
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
            _context, _server_environs = ctx, (dict(environ), _environ_after_imports(ctx))
    return _context


def _environ_after_imports(ctx) -> dict:
    """The server's environment once its imports ran (deepspeed's sets PYTORCH_NVML_BASED_CUDA_CHECK): an
    os.environ holding those too, as this process's does once a test imported the same, is no different."""
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp, _status_lock:
        proc = ctx.Process(target=_write_environ, args=(f"{tmp}/environ.json",))
        proc.start()
        proc.join()
        proc.close()
        return json.loads(Path(f"{tmp}/environ.json").read_text())


def _write_environ(path: str) -> None:
    Path(path).write_text(json.dumps(dict(os.environ)))


def run(args: tuple[str, ...], cwd: Path | str, environ: dict, timeout: float, main: str = "scaletrain.cli",
        merged: bool = False, fresh: bool = False) -> tuple[int, str, str]:
    """`python -m MAIN ARGS`, or `python MAIN ARGS` for a MAIN ending in .py, in cwd with environ ->
    (returncode, stdout, stderr), or stdout and stderr as one stream in stdout if `merged`. A fork of the
    preloaded process unless `fresh`. Past `timeout` its process group is killed and AssertionError says so."""
    if fresh:
        return _fresh(args, cwd, environ, timeout, main, merged)
    ctx = forkserver(environ)
    differing = differing_at_import(environ)
    for key in differing:
        fallbacks[key] = fallbacks.get(key, 0) + 1
    if differing:
        return _fresh(args, cwd, environ, timeout, main, merged)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = ctx.Process(target=_command, args=(main, args, str(cwd), environ, str(out), None if merged else str(err)))
        with _status_lock:
            proc.start()
        finished = wait([proc.sentinel], timeout) and _group_ends(proc.pid, deadline)
        if not finished:
            kill_group(proc)
            wait([proc.sentinel])
        with _status_lock:
            code = proc.exitcode
            proc.close()  # its pipes, now rather than at garbage collection
        if not finished:
            raise AssertionError(f"{main} {' '.join(args)} did not finish (its processes included) in {timeout} s\n"
                                 f"{_read(out)[-3000:]}\n{_read(err)[-3000:]}")
        return code, _read(out), _read(err)


def differing_at_import(environ: dict) -> list[str]:
    """The variables read at import whose value in `environ` is not the server's (before or after its imports)."""
    started, imported = _server_environs
    keys = {k for env in (environ, started, imported) for k in env if k.startswith(READ_AT_IMPORT)} - READ_LATER
    return sorted(k for k in keys if environ.get(k) not in (started.get(k), imported.get(k)))


def _fresh(args, cwd, environ: dict, timeout: float, main: str, merged: bool) -> tuple[int, str, str]:
    cmd = [sys.executable, main, *args] if main.endswith(".py") else [sys.executable, "-m", main, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE)
    out, err = communicate_or_kill(proc, timeout, f"{' '.join(cmd)} did not finish in {timeout} s")
    return proc.returncode, out, err or ""


def communicate_or_kill(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str | None]:
    """proc's (stdout, stderr); past `timeout` its whole process group is killed and the test fails with `what`."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{what}\n{out[-3000:]}\n{(err or '')[-3000:]}") from None


def kill_group(proc) -> None:
    """SIGKILL to proc's process group (a Popen or a multiprocessing Process that leads its own group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_ends(pgid: int, deadline: float) -> bool:
    """Whether every process left in the group (what the command started) ends before the deadline."""
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie (an orphan's zombie waits on whoever reaps orphans)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue  # gone meanwhile
            if int(group) == pgid and state != "Z":
                return True
    return False


def _read(path: Path) -> str:
    return path.read_text(errors="backslashreplace") if path.exists() else ""


def _command(main: str, args, cwd: str, environ: dict, out: str, err: str | None) -> None:
    """In the fork: become the process `python [-m] MAIN ARGS` would be, run it, exit as it would."""
    os.setsid()  # a process group of its own, as run_training's processes (a timeout kills all it started)
    _forget_the_servers_helpers()
    if "numpy" in sys.modules:  # (Python's own `random` reseeds itself in a fork)
        sys.modules["numpy"].random.seed()
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


def _forget_the_servers_helpers() -> None:
    """A fresh process has no multiprocessing resource tracker until it needs one, and then starts its own, which
    reports leaked semaphores and shared memory on this process's stderr when it ends; the fork holds the suite's
    tracker (its reports went to pytest's stderr) and the forkserver's liveness pipe. Let both go."""
    from multiprocessing import forkserver, resource_tracker

    tracker = resource_tracker._resource_tracker
    for owner, fd_name, other in ((tracker, "_fd", "_pid"), (forkserver._forkserver, "_forkserver_alive_fd", None)):
        fd = getattr(owner, fd_name, None)
        if fd is not None:
            os.close(fd)
            setattr(owner, fd_name, None)
            if other:
                setattr(owner, other, None)


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
