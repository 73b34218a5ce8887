#!/usr/bin/env python
"""Entry point for `deepspeed [launcher args] launch/train.py --config X [--set k=v ...]`.

Thin on purpose: parse arguments (including the --local_rank the launcher injects) and hand over.
Also works without a launcher: `python launch/train.py` trains in one process.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scaletrain.cli import OneLineParser, run  # noqa: E402
from scaletrain.commands.common import add_config_args  # noqa: E402
from scaletrain.commands.train import run as cmd_train  # noqa: E402


def main() -> int:
    parser = OneLineParser(prog="launch/train.py", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return run(cmd_train, args)


if __name__ == "__main__":
    code = main()
    # Everything is written (checkpoint, status, TensorBoard, process group closed): skip interpreter teardown,
    # whose thread destructors (gloo, compile workers) can still abort a finished rank with SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
