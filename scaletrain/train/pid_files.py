"""`<run.dir>/pids/rank<N>.pid`: each rank's pid (in its host's namespace), written at start. `scaletrain runs`
reads them to tell a live run from a crashed one; a start removes those an earlier, larger world left."""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^rank(\d+)\.pid$")


def rank_pid_files(run_dir: Path) -> tuple[dict[int, Path], list[Path]]:
    """({rank: its pid file}, pid files whose name is no rank) under run_dir/pids."""
    ranks, strays = {}, []
    for f in sorted((Path(run_dir) / "pids").glob("rank*.pid")):
        m = _NAME.match(f.name)
        if m:
            ranks[int(m.group(1))] = f
        else:
            strays.append(f)
    return ranks, strays
