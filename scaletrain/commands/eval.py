"""`scaletrain eval CKPT_OR_RUN_DIR [--data PATH] [--json]`: loss / perplexity on a file or the run's val split
(a classifier: accuracy, macro-F1 and loss on text/label rows)."""

from __future__ import annotations

import argparse
import json
import sys

from scaletrain.commands.common import add_inference_args, positive_int


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaletrain.evaluate import evaluate, file_batches, training_cache, val_batches, val_parts
    from scaletrain.generate import load_model

    model, tok, src = load_model(args.source, need_tokenizer=args.data is not None, device=args.device,
                                 precision=args.precision)
    seq_len = args.seq_len or (src.config.train.seq_len if src.config is not None else min(src.model.max_seq_len, 2048))
    seq_len = min(seq_len, src.model.max_seq_len)
    if src.model.num_labels:  # a sequence classifier: accuracy / macro-F1 on text/label rows
        return _classifier(args, model, tok, src, seq_len)
    doc_eos = None
    if src.config is not None and src.config.data.doc_mask:  # evaluated as it was trained: within documents
        doc_eos = tok.eos_id if args.data else int(training_cache(src).meta["eos_id"])
    parts = None if args.data else val_parts(src, seq_len, args.batch_size)
    if parts:
        from scaletrain.data.mix_rules import part_names

        left_out = sorted(set(part_names(src.config.data.mix)) - {name for name, _, _ in parts})
        if left_out:
            print(f"note: left out (no val window of {seq_len} tokens): {', '.join(left_out)}", file=sys.stderr)
        return _mixture(args, model, parts, doc_eos, seq_len)
    if args.data:
        batches = file_batches(Path(args.data), tok, seq_len, args.batch_size, args.text_field)
    else:
        batches = val_batches(src, seq_len, args.batch_size)
    res = evaluate(model, _limited(batches, args.max_batches), doc_eos)
    if args.max_batches:
        res["max_batches"] = args.max_batches  # a partial score says so
    if args.json:
        print(json.dumps(res))
    else:
        where = args.data or "the run's val split"
        first = f", the first {args.max_batches} batches" if args.max_batches else ""
        print(f"{where}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | {res['tokens']:,} tokens (windows of {seq_len}{first})")
    return 0


def _mixture(args, model, parts, doc_eos, seq_len: int) -> int:
    """Each source's val split apart, and their mean weighted as the mixture weighs them (training's val/loss)."""
    import math

    from scaletrain.evaluate import evaluate

    sources = {name: {**evaluate(model, _limited(batches, args.max_batches), doc_eos), "weight": weight}
               for name, weight, batches in parts}
    weights = sum(r["weight"] for r in sources.values())
    loss = sum(r["weight"] * r["loss"] for r in sources.values()) / weights
    res = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": sum(r["tokens"] for r in sources.values()),
           "sources": sources, **({"max_batches": args.max_batches} if args.max_batches else {})}
    if args.json:
        print(json.dumps(res))
        return 0
    first = f", the first {args.max_batches} batches of each" if args.max_batches else ""
    print(f"the run's val split (data.mix, weighted): loss {loss:.4f} | ppl {res['ppl']:.2f} | {res['tokens']:,} tokens "
          f"(windows of {seq_len}{first})")
    for name, r in sources.items():
        print(f"  {name} (weight {r['weight']:g}): loss {r['loss']:.4f} | ppl {r['ppl']:.2f} | {r['tokens']:,} tokens")
    return 0


def _limited(batches, max_batches):
    """At most `max_batches` batches, with a progress bar on a terminal (a large val split on CPU takes a while)."""
    import itertools

    from tqdm import tqdm

    if max_batches:
        batches = itertools.islice(batches, max_batches)
    return tqdm(batches, desc="eval", unit="batch", total=max_batches, disable=None, leave=False)


def _classifier(args, model, tok, src, seq_len: int) -> int:
    from pathlib import Path

    from scaletrain.data.classification import file_stream
    from scaletrain.evaluate import _stream_windows, evaluate_classifier, val_batches

    if args.data:
        stream = file_stream(Path(args.data), tok, seq_len, args.text_field, src.model.num_labels)
        batches = _stream_windows(stream, args.batch_size)
    else:
        batches = val_batches(src, seq_len, args.batch_size)
    res = evaluate_classifier(model, _limited(batches, args.max_batches), src.model.num_labels)
    if args.max_batches:
        res["max_batches"] = args.max_batches
    if args.json:
        print(json.dumps(res))
    else:
        first = f" (the first {args.max_batches} batches)" if args.max_batches else ""
        print(f"{args.data or 'the run' + chr(39) + 's val split'}: accuracy {res['accuracy']:.4f} | macro-F1 {res['f1']:.4f} | "
              f"loss {res['loss']:.4f} | {res['examples']:,} examples{first}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a model on a text/jsonl file or its run's val split")
    p.add_argument("source", metavar="CKPT_OR_RUN_DIR", help="run dir, checkpoint dir, checkpoint tag or HF dir")
    add_inference_args(p)
    p.add_argument("--data", default=None, metavar="PATH", help=".txt/.jsonl/.parquet file, dir or glob (prompt/completion jsonl: completion tokens only)")
    p.add_argument("--json", action="store_true", help='print {"loss": ..., "ppl": ..., "tokens": ...}')
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="score only the first N batches (default: all; a large val split on CPU takes long)")
    p.set_defaults(func=run)
