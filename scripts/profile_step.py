#!/usr/bin/env python
"""torch.profiler over our training step (or the peer's) at the bench's reference shape, N ranks.

    python scripts/profile_step.py                      # ours, bf16, 2 CPU ranks, ZeRO-2, compiled
    python scripts/profile_step.py --kind peer --precision fp32
    python scripts/profile_step.py --no-compile --trace /tmp/trace.json   # + chrome trace of rank 0
    python scripts/profile_step.py --shapes             # one row per op and input shapes
    python scripts/profile_step.py --kernels            # one row per inductor C++ kernel

Prints rank 0's op table (self CPU time, sorted) for `--steps` steps after `--warmup` steps. The
ranks are started exactly as `scaletrain bench` starts them (same setup, same builders).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def profile_job(dist, spec: dict, kind: str, precision: str, steps: int, warmup: int, rows: int, trace: str | None,
                shapes: bool = False) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch._inductor.config.cpp.enable_kernel_profile = os.environ.get("SCALETRAIN_PROFILE_KERNELS") == "1"

    from scaletrain.bench.models import build_ours, build_peer, step_fn
    from scaletrain.bench.training import _batch, bench_config

    cfg = bench_config(spec, precision)
    engine = build_ours(cfg, dist.device, dist.world) if kind == "ours" else build_peer(cfg, dist.world)
    x, y = _batch(cfg, dist)
    step = step_fn(kind, engine, x, y)
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    if trace and dist.is_main:
        prof.export_chrome_trace(trace)
    return {"table": table}


def main() -> int:
    from scaletrain.bench.spawn import run_ranks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("ours", "peer"), default="ours")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=35)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--loss-chunk", type=int, default=2048, help="train.loss_chunk (default: the bench's)")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--trace", default=None, help="write rank 0's chrome trace here")
    p.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    p.add_argument("--kernels", action="store_true", help="one row per inductor C++ kernel (its own profiling)")
    a = p.parse_args()
    spec = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 688,
            "vocab_size": 8192, "seq_len": 512, "micro_batch": 4, "zero_stage": a.zero, "attention": a.attention,
            "compile": a.compile, "loss_chunk": a.loss_chunk, "threads": 0}
    env = {"SCALETRAIN_PROFILE_KERNELS": "1"} if a.kernels else None
    out = run_ranks(profile_job, (spec, a.kind, a.precision, a.steps, a.warmup, a.rows, a.trace, a.shapes), a.ranks, "cpu", env=env)
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
