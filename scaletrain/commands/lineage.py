"""`scaletrain lineage PATH`: the family tree of a checkpoint, run or export."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from scaletrain.lineage import tree_lines

    print("\n".join(tree_lines(args.path)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("lineage", help="print where a checkpoint or export came from (parents across dirs)")
    p.add_argument("path", metavar="PATH", help="checkpoint dir, run dir, checkpoint tag or HF export")
    p.set_defaults(func=run)
