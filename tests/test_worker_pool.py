"""Tokenisation workers must not inherit the trainer's signal handlers (else Pool exit hangs forever)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from scaletrain.data.worker_pool import worker_pool

    flags = []
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # what the trainer installs before data prep
        signal.signal(sig, lambda s, f: flags.append(s))

    def init(x):
        global offset
        offset = x

    def work(i):
        return i + offset

    with worker_pool(2, init, (10,)) as pool:   # __exit__ terminates the workers with SIGTERM
        out = list(pool.imap(work, range(50), chunksize=4))
    assert out == [i + 10 for i in range(50)], out
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the parent keeps its handler
    print("ok", len(flags))
    """
)


def test_pool_exit_does_not_hang_under_trapped_signals():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "0"]
