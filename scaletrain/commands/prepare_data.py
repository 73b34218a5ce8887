"""`scaletrain prepare-data`: train the tokenizer and tokenise `data.source` into the cache."""

from __future__ import annotations

import argparse

from scaletrain.commands.common import add_config_args


def run(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.data.cache import prepare_data

    from scaletrain.train.init_from import resolve

    cache = prepare_data(resolve(load_config(args.config, args.overrides)), progress=True)  # init.from's tokenizer
    m = cache.meta
    print(f"data cache {cache.dir}: {m['docs']['train']} train / {m['docs']['val']} val docs, "
          f"{m['tokens']['train']:,} / {m['tokens']['val']:,} tokens, vocab {m['tokenizer_vocab']}")
    for info, part in zip(m.get("mixture", []), getattr(cache, "parts", [])):  # a data.mix: each source's cache
        p = part.meta
        print(f"  {info['name']} (weight {info['weight']:g}): {part.dir}: {p['docs']['train']} / {p['docs']['val']} docs, "
              f"{p['tokens']['train']:,} / {p['tokens']['val']:,} tokens")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help="train the tokenizer and tokenise data.source into the cache")
    add_config_args(p)
    p.set_defaults(func=run)
