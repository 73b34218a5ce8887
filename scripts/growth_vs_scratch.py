#!/usr/bin/env python
"""Growth vs scratch on the embedded corpus: FLOPs to reach the from-scratch model's final validation loss.

    python scripts/growth_vs_scratch.py [--out runs/growth_vs_scratch] [--png docs/growth_vs_scratch.png]

Runs (one process each, `launch/train.py`, 1 rank, same data order, same lr schedule shape):
  scratch  the child shape (hidden 128, 4 layers, 2 heads, FFN 344, vocab 2048) for --steps steps;
  depth    a 2-layer parent, grown in the run (growth.schedule) to 4 layers at --grow-at (identity blocks);
  width    a hidden-64 / 1-head / FFN-172 parent, grown to the child's width at --grow-at;
  both     (--variants depth,width,both) a parent halved in width and depth.
A grown run then trains the child until its parent + child FLOPs equal the scratch run's, so all three spend
the same compute. FLOPs per token = 6 N + 12 L d T (N without the input embedding, see train/metrics.py),
counted with the shape that trained each step. Writes growth_vs_scratch.json next to the runs: per run the
FLOPs (and tokens) at which validation loss first reaches scratch's final value (linear interpolation between
evaluations), and ratio = scratch's FLOPs / the run's FLOPs; plus a PNG of val loss vs FLOPs and vs tokens.
Each run is an ordinary run dir under --out: re-running the command resumes unfinished runs and only
re-reads finished ones (so the runs may also be started by hand, e.g. in parallel, with the same settings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = dict(hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=344)
PARENTS = {
    "depth": dict(CHILD, num_layers=2),
    "width": dict(CHILD, hidden_size=64, num_heads=1, num_kv_heads=1, intermediate_size=172),
    "both": dict(CHILD, num_layers=2, hidden_size=64, num_heads=1, num_kv_heads=1, intermediate_size=172),
}
VOCAB = 2048


def common(args) -> list[str]:
    return [
        f"model.vocab_size={VOCAB}", "model.max_seq_len=256", f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}", "train.grad_accum=1", f"train.lr={args.lr}", "train.min_lr=3e-4",
        f"train.warmup_steps={args.warmup}", "train.precision=bf16", "zero.stage=0", "train.save_every=0",
        f"train.eval_every={args.eval_every}", f"train.eval_batches={args.eval_batches}", "train.log_every=10",
        f"train.seed={args.seed}", "growth.noise=0.1", f"growth.rewarmup_steps={args.rewarmup}",
        f"growth.depth_method={args.depth_method}", f"growth.insert={args.insert}", f"growth.optimizer={args.optimizer}",
    ]


def shape_of(dims: dict, vocab: int = VOCAB):
    from scaletrain.model.llama import LlamaShape

    return LlamaShape(vocab_size=vocab, max_seq_len=256, **dims)


def step_flops(dims: dict, args) -> float:
    from scaletrain.train.metrics import flops_per_token

    s = shape_of(dims)
    return flops_per_token(s, args.seq_len) * args.batch * args.seq_len


def train(name: str, run_dir: Path, overrides: list[str], log: Path) -> float:
    """One run in its own process (resumes if interrupted); returns wall seconds. A run dir left by other
    settings (--steps, --lr, --grow-at, ...) is refused: resuming it would report the old run as the new one."""
    record = run_dir / "growth_vs_scratch_request.json"
    if record.is_file() and json.loads(record.read_text()) != overrides:
        raise SystemExit(f"error: {run_dir} holds a run made with other settings; delete it (or use another --out) "
                         "to run these")
    if not record.is_file() and run_dir.exists() and any(run_dir.iterdir()):  # someone else's run: never resumed here
        raise SystemExit(f"error: {run_dir} exists and was not made by this script; use another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(overrides, indent=1))
    timing = run_dir / "growth_vs_scratch_wall_s.json"  # the training time of the start(s) that trained it
    status = run_dir / "status.json"
    if status.is_file() and json.loads(status.read_text()).get("state") == "finished":  # only re-read: its log and
        return json.loads(timing.read_text()) if timing.is_file() else math.nan  # time stay (nan: not recorded)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "a" if status.is_file() else "w") as fh:  # a resumed run's log goes on after the first part's
        rc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", "--set", *overrides,
                             f"run.dir={run_dir}"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"run {name} failed (rc {rc}); see {log}")
    seconds = time.time() - t0 + (json.loads(timing.read_text()) if timing.is_file() else 0.0)
    timing.write_text(json.dumps(seconds))
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def val_curve(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("val/loss")}


def first_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """x at which the piecewise-linear curve of (x, loss) first gets to <= target (None: never)."""
    for (x0, y0), (x1, y1) in zip([(0.0, math.inf)] + points[:-1], points):
        if y1 <= target:
            if math.isinf(y0) or y0 == y1:
                return x1
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/growth_vs_scratch")
    ap.add_argument("--png", default="docs/growth_vs_scratch.png")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps of the scratch run")
    ap.add_argument("--grow-at", type=int, default=600, help="step at which the grown runs' parents grow")
    ap.add_argument("--variants", default="depth,width,both")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rewarmup", type=int, default=10)
    ap.add_argument("--depth-method", default="identity")
    ap.add_argument("--insert", default="interleave", help="where identity blocks go (growth.insert)")
    ap.add_argument("--optimizer", default="grow")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run (e.g. data.source=...)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = common(args) + args.set
    child_flops = step_flops(CHILD, args)
    budget = args.steps * child_flops
    runs = {"scratch": {"schedule": None, "steps": args.steps, "flops": [child_flops] * args.steps}}
    for v in args.variants.split(","):
        parent = PARENTS[v]
        steps = args.grow_at + math.ceil((budget - args.grow_at * step_flops(parent, args)) / child_flops)
        runs[v] = {"parent": parent, "steps": steps,
                   "flops": [step_flops(parent, args)] * args.grow_at + [child_flops] * (steps - args.grow_at)}
    wall = {}
    for name, r in runs.items():
        dims = r.get("parent", CHILD)
        sets = [f"model.{k}={v}" for k, v in dims.items()] + [f"train.max_steps={r['steps']}"]
        if "parent" in r:
            grow = ", ".join(f"model.{k}: {v}" for k, v in CHILD.items() if dims[k] != v)
            sets.append(f"growth.schedule=[{{at_step: {args.grow_at}, set: {{{grow}}}}}]")
        wall[name] = train(name, out / name, base + sets, out / f"{name}.log")

    for name, r in runs.items():
        cum = [0.0]
        for f in r["flops"]:
            cum.append(cum[-1] + f)
        curve = val_curve(out / name)
        tokens_per_step = args.batch * args.seq_len
        r["curve"] = [{"step": s, "flops": cum[s], "tokens": s * tokens_per_step, "val_loss": v} for s, v in sorted(curve.items())]
    target = runs["scratch"]["curve"][-1]["val_loss"]
    reach = {}
    for name, r in runs.items():
        pts = [(p["flops"], p["val_loss"]) for p in r["curve"]]
        tok = [(p["tokens"], p["val_loss"]) for p in r["curve"]]
        reach[name] = {"flops": first_reach(pts, target), "tokens": first_reach(tok, target),
                       "final_val_loss": r["curve"][-1]["val_loss"], "total_flops": sum(r["flops"]), "wall_s": None if math.isnan(wall[name]) else round(wall[name])}
    for name in runs:
        f = reach[name]["flops"]
        reach[name]["ratio_flops"] = reach["scratch"]["flops"] / f if f else None
        t = reach[name]["tokens"]
        reach[name]["ratio_tokens"] = reach["scratch"]["tokens"] / t if t else None
    summary = {"target_val_loss": target, "child": CHILD, "parents": {v: runs[v]["parent"] for v in runs if v != "scratch"},
               "settings": vars(args), "results": reach, "curves": {n: r["curve"] for n, r in runs.items()},
               "command": "python scripts/growth_vs_scratch.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "growth_vs_scratch.json").write_text(json.dumps(summary, indent=1))
    plot(runs, args, target, Path(args.png))
    print(f"target: scratch final val loss {target:.4f} after {reach['scratch']['total_flops']:.3g} FLOPs")
    for name, r in reach.items():
        ratio = f"{r['ratio_flops']:.2f}x fewer FLOPs" if r["ratio_flops"] else "does not reach it"
        print(f"{name:>8}: final val {r['final_val_loss']:.4f} | reaches target at "
              f"{r['flops'] or float('nan'):.3g} FLOPs -> {ratio} ({args.steps * args.batch * args.seq_len} scratch tokens)")
    print(f"wrote {out / 'growth_vs_scratch.json'} and {args.png}")
    return 0


def plot(runs: dict, args, target: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        for ax, key in zip(axes, ("flops", "tokens")):
            ax.plot([p[key] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], label=name, marker=".", ms=3)
            if "parent" in r:  # where the parent grew
                x = sum(r["flops"][: args.grow_at]) if key == "flops" else args.grow_at * args.batch * args.seq_len
                ax.axvline(x, color=ax.lines[-1].get_color(), ls=":", lw=1)
    for ax, label in zip(axes, ("training FLOPs (parent + child)", "training tokens")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("val loss")
        ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.0))
        ax.grid(alpha=0.3)
    axes[0].legend(title="dotted: growth step")
    fig.suptitle(f"growth vs scratch: child {CHILD['hidden_size']}d x {CHILD['num_layers']}L, grown at step {args.grow_at}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
