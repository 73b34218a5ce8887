"""`scaletrain import-hf HF_DIR --out CKPT_DIR`: a local Hugging Face Llama becomes a scaletrain checkpoint dir."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from scaletrain.hf.import_hf import import_hf

    rec = import_hf(args.hf_dir, args.out, args.max_shard_size)
    m = rec["model"]
    print(f"imported {args.hf_dir} -> {args.out} (id {rec['id']}; {m['num_layers']} layers, d{m['hidden_size']}, "
          f"{m['num_heads']}/{m['num_kv_heads']} heads, vocab {m['vocab_size']})")
    print(f"fine-tune it: scaletrain train --config {args.out}/config.yaml --set init.from={args.out} data.source=... run.dir=...")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("import-hf", help="turn a local Hugging Face Llama dir into a scaletrain checkpoint dir")
    p.add_argument("hf_dir", metavar="HF_DIR", help="config.json + *.safetensors or pytorch_model*.bin + tokenizer files")
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="new (or empty) directory to write")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size (default 2GB)")
    p.set_defaults(func=run)
