"""`scaletrain export-hf CKPT_OR_RUN_DIR --out HF_DIR`: publish as a Hugging Face model (+ tokenizer, card, lineage)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from scaletrain.hf.export_hf import export_hf

    res = export_hf(args.source, args.out, args.dtype, args.max_shard_size)
    print(f"exported {args.source} -> {args.out}: {len(res['files'])} safetensors file(s), {res['total_size'] / 1e6:,.1f} MB, "
          f"id {res['id']}, peak RSS {res['peak_rss_mb']:,.0f} MB")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face model dir from a run, checkpoint tag or checkpoint dir")
    p.add_argument("source", metavar="CKPT_OR_RUN_DIR", help="run dir (newest verified checkpoint), checkpoint tag or checkpoint dir")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="new (or empty) directory to write")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="weights dtype (default: as stored; fp32 for training checkpoints)")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size (default 2GB)")
    p.set_defaults(func=run)
