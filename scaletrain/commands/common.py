"""Argument groups shared by several subcommands."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/tiny.yaml"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set model.num_layers=8 train.lr=3e-4")
