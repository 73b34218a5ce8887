"""`scaletrain train`: train in this process (for N ranks use `deepspeed launch/train.py`)."""

from __future__ import annotations

import argparse

from scaletrain.commands.common import add_config_args
from scaletrain.errors import UserError, alike_on_this_host


def run(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.train.console import survive_lost_console

    survive_lost_console()  # a rank whose launcher's ssh connection closed still checkpoints when asked to stop
    try:
        cfg = load_config(args.config, args.overrides)  # before importing torch: config typos fail fast
    except UserError as e:  # every rank of this host read the same file and flags
        raise alike_on_this_host(e)
    from scaletrain.train.loop import train

    summary = train(cfg)
    return 0 if summary["state"] in ("finished", "preempted", "early_stopped") else 1


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train in this process (multi-rank: deepspeed launch/train.py)")
    add_config_args(p)
    p.set_defaults(func=run)
