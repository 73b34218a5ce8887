"""The bad-input contract, shared by the test_bad_input_* modules: a case builds its inputs under a work dir and
returns (argv, words the message must contain); the CLI runs there as a subprocess; then exit code 2, exactly one
`error:` line on stderr naming the problem, no traceback, and every path under the case's root as it was."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import preloaded_cli
from launch_utils import env, run_cli


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: type, mode, size, mtime and content hash of files. A directory's own mtime is
    left out: a temp dir made and removed inside the cache during a failed build leaves nothing behind."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_mode, 0 if p.is_dir() else st.st_size, 0 if p.is_dir() else st.st_mtime_ns, digest)
    return out


def run_case(case: Callable[..., tuple], root: Path, *case_args, timeout: float = 600) -> dict:
    work = root / "work"  # cwd of the CLI, so stray relative writes (runs/, caches) land here and are seen
    work.mkdir()
    (work / "cache").mkdir()  # an existing data.cache_dir: a failure must leave it as it was
    argv, must_mention = case(work, *case_args)
    before = snapshot(root)
    rc, out, err = run_cli(*argv, cwd=work, timeout=timeout)  # generous: CI machines can be heavily shared
    return dict(argv=argv, must_mention=must_mention, rc=rc, out=out, err=err, before=before, after=snapshot(root))


def run_cases(cases: dict[str, Callable], roots: dict[str, Path], *case_args, first: Callable[[str], bool] = lambda n: False
              ) -> dict[str, Future]:
    """The cases, four subprocesses at a time; `first`: slow ones."""
    preloaded_cli.forkserver(env())  # started before the threads: starting it swaps os.environ, which env() reads
    with ThreadPoolExecutor(max_workers=4) as pool:
        return {name: pool.submit(run_case, cases[name], roots[name], *case_args)
                for name in sorted(roots, key=lambda n: not first(n))}


def check_refusal(r: dict) -> None:
    out, err = r["out"], r["err"]
    shown = f"\nargv: {r['argv']}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
    assert "Traceback" not in out + err, shown
    assert r["rc"] == 2, f"exit code {r['rc']}" + shown
    lines = err.splitlines()  # also splits on '\r': progress-bar redraws count as lines
    assert len(lines) == 1, f"stderr has {len(lines)} lines, want exactly one" + shown
    assert lines[0].startswith("error:") and lines[0][len("error:"):].strip(), shown
    for word in (r["must_mention"],) if isinstance(r["must_mention"], str) else r["must_mention"]:
        assert word in lines[0], f"message should mention {word!r}" + shown
    changed = sorted(set(r["after"].items()) ^ set(r["before"].items()))
    assert r["after"] == r["before"], f"files created/changed/removed: {changed}"
