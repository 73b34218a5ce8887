"""Argument groups shared by several subcommands."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/tiny.yaml"


def add_inference_args(p) -> None:
    """--device / --precision of the commands that run a model without training it (eval, generate)."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: a CUDA GPU when there is one, else the CPU)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights and activations (auto: bf16 on a GPU, fp16 on one without bf16, fp32 on CPU)")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set model.num_layers=8 train.lr=3e-4")


def _whole(text: str, at_least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < at_least:
        raise argparse.ArgumentTypeError(f"must be at least {at_least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: 1, 2, ... (argparse turns the error into `argument --x: must be at least 1, got 0`)."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: 0, 1, ... (flags where 0 means off)."""
    return _whole(text, 0)
