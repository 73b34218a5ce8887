#!/usr/bin/env python
"""Check `scaletrain plan`'s memory estimate against the measured peak memory of real training steps (CPU).

For each shape a fresh process (1 rank, DeepSpeed with the trainer's model, optimizer and ds_config) runs a
few optimizer steps on random tokens; its peak RSS (ru_maxrss) is compared with the plan's total per rank,
and the peak above the process's RSS just before the model was built with the plan's model-attributable
part (params + grads + optimizer + activations, i.e. without its runtime constant).

    PYTHONPATH=. python scripts/plan_vs_measured.py            # the three shapes of the README
    PYTHONPATH=. python scripts/plan_vs_measured.py --shape small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # activation-dominated (the default tiny model at its default batch), fp32
    "small": ["train.precision=fp32", "zero.stage=2"],
    # a ~30M model, longer sequences, fp32
    "medium": ["model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=4",
               "model.intermediate_size=1376", "train.seq_len=512", "train.micro_batch_size=4",
               "train.precision=fp32", "zero.stage=2"],
    # a ~150M model (state-dominated), bf16, 32k vocab
    "large": ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16", "model.num_kv_heads=8",
              "model.intermediate_size=2752", "model.vocab_size=32000", "train.seq_len=256",
              "train.micro_batch_size=2", "train.precision=bf16", "zero.stage=2"],
}


def child(overrides: list[str], steps: int) -> dict:
    import resource

    import psutil
    import torch

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    from scaletrain.config import load_config
    from scaletrain.ds_config import deepspeed_config
    from scaletrain.plan import memory_per_rank
    from scaletrain.train.distributed import setup
    from scaletrain.train.schedule import LrSchedule
    from scaletrain.train.build import build_model, build_optimizer
    from scaletrain.model.llama import LlamaShape
    import deepspeed

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), overrides)
    setup(cfg.train.threads)
    base = psutil.Process().memory_info().rss
    t = cfg.train
    torch.manual_seed(0)
    model = build_model(LlamaShape.from_config(cfg.model), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=deepspeed_config(cfg, 1),
                                      lr_scheduler=lambda o: LrSchedule.of(o, t))
    for _ in range(steps):
        for _ in range(t.grad_accum):
            x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len))
            loss = engine(x, x)
            engine.backward(loss)
            engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = memory_per_rank(cfg, 1, "cpu")
    model_part = plan.total - plan.runtime
    return {"params": LlamaShape.from_config(cfg.model).num_params(), "peak_rss": peak, "before_model_rss": base,
            "plan_total": plan.total, "plan_model_part": model_part, "measured_model_part": peak - base,
            "plan": {k: getattr(plan, k) for k in ("params", "grads", "optimizer", "activations", "runtime")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.steps)))
        return 0
    rows = []
    for name in args.shape or list(SHAPES):
        env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))  # a CPU measure
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", *SHAPES[name]],
                              capture_output=True, text=True, env=env, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[7:])
        err_total = r["plan_total"] / r["peak_rss"] - 1
        err_model = r["plan_model_part"] / r["measured_model_part"] - 1
        rows.append((name, r, err_total, err_model))
        print(f"{name:<7} {r['params'] / 1e6:7.1f}M params | peak RSS {r['peak_rss'] / 1e9:.3f} GB, plan {r['plan_total'] / 1e9:.3f} GB "
              f"({err_total:+.0%}) | above start {r['measured_model_part'] / 1e9:.3f} GB, plan w/o runtime "
              f"{r['plan_model_part'] / 1e9:.3f} GB ({err_model:+.0%}) | plan parts " +
              ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in r["plan"].items()), flush=True)
    worst = max(abs(e) for _, _, e, _ in rows)
    print(f"largest |plan / measured peak - 1| over {len(rows)} shapes: {worst:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
