"""`scaletrain bench`: our training step vs HF-Llama + the same DeepSpeed config, in one invocation; JSON out.

Defaults are the reference shape (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 8192,
seq 512, micro-batch 4, 2 CPU ranks, ZeRO-2) in bf16 and fp32. `--attention-only` and
`--loss-memory` run the microbenchmarks instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from scaletrain.commands.common import non_negative_int, positive_int

PRECISIONS = ("bf16", "fp32", "fp16")


def spec_from_args(a: argparse.Namespace) -> dict:
    return {
        "hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads, "num_kv_heads": a.kv_heads or a.heads,
        "intermediate_size": a.intermediate, "vocab_size": a.vocab, "seq_len": a.seq, "micro_batch": a.micro_batch,
        "zero_stage": a.zero, "precisions": a.precision, "attention": a.attention, "compile": a.compile,
        "loss_chunk": a.loss_chunk, "fused_ops": a.fused_ops, "steps": a.steps, "warmup": a.warmup, "per_round": a.per_round,
        "threads": a.threads, "ranks": a.ranks, "device": a.device,
        "contestants": ["ours", "peer"] if a.only is None else [a.only],
    }


def run(a: argparse.Namespace) -> int:
    from scaletrain.bench.machine import machine_info
    from scaletrain.errors import UserError, in_flag_words

    if a.device == "cuda":  # else it would time the CPU and call it cuda, or die picking a GPU that is not there
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu")
        if not (a.attention_only or a.loss_memory) and a.ranks > have:
            raise UserError(f"--ranks {a.ranks} with --device cuda needs {a.ranks} GPUs, {have} visible: use --ranks {have}")
    if a.device == "cpu" and a.fused_ops != "none":
        raise UserError(f"--fused-ops {a.fused_ops} needs --device cuda (its kernels are Triton)")
    if a.out:  # checked before minutes of benchmarking, not after
        import os
        from pathlib import Path

        out = Path(a.out)
        if out.is_file() or out.is_symlink():
            raise UserError(f"--out {a.out} already exists; remove it or choose a new file (earlier results are not overwritten)")
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise UserError(f"--out {a.out}: not a file that can be written (a directory, or its folder is missing or "
                            "read-only); give a path like results/bench.json in an existing, writable folder")
    report: dict = {"machine": machine_info()}
    if a.device == "cpu" and "bf16" in a.precision:
        from scaletrain.train.precision import cpu_bf16_matmuls

        if not cpu_bf16_matmuls():  # stderr: stdout is the JSON
            print("note: this CPU has no bf16 matmul kernels (no AVX-512): the bf16 runs multiply in software, "
                  "~10x slower than fp32; --precision fp32 to skip them", file=sys.stderr)
    if a.attention_only:
        from scaletrain.bench.attention import attention_bench

        report["attention"] = attention_bench(a.device, a.precision, a.steps, a.threads, a.attention_seqs)
    elif a.loss_memory:
        from scaletrain.bench.loss_memory import loss_memory_bench

        dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[a.precision[0]]  # default bf16
        report["loss_memory"] = loss_memory_bench(a.device, a.loss_chunk or 1024, dtype)
    else:
        from scaletrain.bench.run import training_bench

        spec = spec_from_args(a)
        from scaletrain.bench.training import bench_config

        import torch

        from scaletrain.model.attention import check_backend
        from scaletrain.train.precision import check_fp16_zero, cpu_fp16_training

        for p in spec["precisions"]:
            if a.device == "cpu" and p == "fp16" and not cpu_fp16_training():
                raise UserError("--precision fp16 on this CPU: DeepSpeed trains fp16 on CPU only where oneDNN has fp16 "
                                "kernels (AVX512-FP16 / AMX-FP16); use bf16 or fp32, or --device cuda")
            try:  # the config's own checks, up front; their messages name config keys, the bench has flags
                check_fp16_zero(p, a.zero, "--precision fp16")
                cfg = bench_config(spec, p)
                check_backend(cfg.model.attention, torch.device(a.device), training=True, shape=cfg.model, precision=p)
            except UserError as e:
                raise in_flag_words(e, _FLAGS) from None
        report.update(training_bench(spec, memory=not a.no_memory))
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")  # first: the numbers are not lost if the file cannot be written after all
    sys.stdout.flush()
    if a.out:
        from pathlib import Path

        from scaletrain.durable import write_text_new

        try:
            write_text_new(Path(a.out), text + "\n")
        except FileExistsError:
            raise UserError(f"--out {a.out} appeared while the bench ran; it was left as it is, and these results are "
                            "on stdout above") from None
    return 0


# config keys in the shared checks' messages -> the bench's flags for them
_FLAGS = {"model.hidden_size": "--hidden", "model.num_layers": "--layers", "model.num_kv_heads": "--kv-heads",
          "model.num_heads": "--heads", "model.intermediate_size": "--intermediate", "model.vocab_size": "--vocab",
          "train.seq_len": "--seq", "train.micro_batch_size": "--micro-batch", "model.attention=": "--attention ",
          "model.attention": "--attention", "zero.stage=": "--zero ", "zero.stage": "--zero", "train.precision": "--precision",
          "train.loss_chunk": "--loss-chunk", "model.fused_ops": "--fused-ops"}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark our training step against HF-Llama + DeepSpeed (JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("shape (defaults: the reference shape)")
    g.add_argument("--hidden", type=positive_int, default=256)
    g.add_argument("--layers", type=positive_int, default=4)
    g.add_argument("--heads", type=positive_int, default=4)
    g.add_argument("--kv-heads", type=positive_int, default=None, help="default: --heads")
    g.add_argument("--intermediate", type=positive_int, default=688)
    g.add_argument("--vocab", type=positive_int, default=8192)
    g.add_argument("--seq", type=positive_int, default=512)
    g.add_argument("--micro-batch", type=positive_int, default=4)
    r = p.add_argument_group("run")
    r.add_argument("--ranks", type=positive_int, default=2)
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage")
    r.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["bf16", "fp32"])
    r.add_argument("--steps", type=positive_int, default=20, help="timed steps per model and precision")
    r.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (compilation happens here)")
    r.add_argument("--per-round", type=positive_int, default=2, help="steps per turn when alternating ours/peer")
    r.add_argument("--threads", type=non_negative_int, default=0, help="threads per rank (0 = cores / ranks, as in training)")
    r.add_argument("--only", choices=("ours", "peer"), default=None,
                   help="time one contestant alone (MFU at shapes where both do not fit in memory at once)")
    r.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    r.add_argument("--out", default=None, help="also write the JSON here")
    o = p.add_argument_group("our hot-path options (the peer is always HF sdpa + torch AdamW)")
    o.add_argument("--attention", choices=("sdpa", "flash", "flex", "eager"), default="sdpa")
    o.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="train.compile (default on)")
    o.add_argument("--fused-ops", choices=("none", "liger"), default="none", help="model.fused_ops (liger: CUDA only)")
    o.add_argument("--loss-chunk", type=non_negative_int, default=2048,
                   help="train.loss_chunk (default 2048: the reference shape's tokens per rank in one chunk; 0 = off)")
    m = p.add_argument_group("microbenchmarks (instead of the training comparison)")
    m.add_argument("--attention-only", action="store_true",
                   help="fwd+bwd of each attention backend vs eager at B4 H8 D64, T 1024 and 4096")
    m.add_argument("--attention-seqs", type=positive_int, nargs="+", default=[1024, 4096], metavar="T",
                   help="sequence lengths for --attention-only")
    m.add_argument("--loss-memory", action="store_true",
                   help="peak memory of head+loss with/without --loss-chunk at vocab 32k and 128k")
    p.set_defaults(func=run)
