"""`scaletrain` command line: the one place users' mistakes become one line on stderr + exit code 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Callable, Optional

from scaletrain.commands import MODULES
from scaletrain.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and still exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        missing = message.partition("arguments are required: ")[2].split(", ")
        if "--set" in sys.argv and any(m and not m.startswith("-") for m in missing):  # --set takes the words after it
            message += " (--set takes every word after it: put positional arguments before --set)"
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="scaletrain", description="Pre-train and grow Llama-style models with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in MODULES:
        importlib.import_module(f"scaletrain.commands.{name}").add_parser(sub)
    return parser


QUIET_RANK_WAIT_S = 30.0


def _wait_to_be_stopped() -> None:
    """A rank whose error another rank prints (UserError.heard_elsewhere) waits for the launcher to stop it once
    that rank has exited; when nothing stops it within QUIET_RANK_WAIT_S (a launcher that waits for every rank,
    or the other rank did not fail after all) it prints its line too: a line twice, never none."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the trainer's stop handlers would make the launcher's TERM
    signal.signal(signal.SIGINT, signal.default_int_handler)  # and a Ctrl-C mere flags)
    try:
        time.sleep(QUIET_RANK_WAIT_S)
    except KeyboardInterrupt:
        pass


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except UserError as e:
        if e.heard_elsewhere:  # another rank prints it; exiting first would let the launcher kill that rank
            _wait_to_be_stopped()  # before it could (its line is the one the user needs)
        sys.stderr.write("error: " + " ".join(s.strip() for s in str(e).splitlines() if s.strip()) + "\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f" ({e.filename})" if e.filename else ""
        free = "" if e.errno == errno.EROFS else "free space there or "
        sys.stderr.write(f"error: {e.strerror}{where}; {free}write elsewhere (--out, run.dir, data.cache_dir), then "
                         "run the command again\n")
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
