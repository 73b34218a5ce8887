"""`scaletrain` command line: subcommands, and the one place users' mistakes become one line + exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from scaletrain.errors import UserError

DEFAULT_CONFIG = "configs/tiny.yaml"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and still exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set model.num_layers=8 train.lr=3e-4")


def cmd_train(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    return 0 if summary["state"] in ("finished", "preempted") else 1


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.data.prepare import prepare_data

    cfg = load_config(args.config, args.overrides)
    cache = prepare_data(cfg, progress=True)
    m = cache.meta
    print(f"data cache {cache.dir}: {m['docs']['train']} train / {m['docs']['val']} val docs, "
          f"{m['tokens']['train']:,} / {m['tokens']['val']:,} tokens, vocab {m['tokenizer_vocab']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="scaletrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("train", help="train in this process (multi-rank: deepspeed launch/train.py)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare-data", help="train the tokenizer and tokenise data.source into the cache")
    add_config_args(p)
    p.set_defaults(func=cmd_prepare_data)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
