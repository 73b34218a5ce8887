#!/usr/bin/env python
"""Train architecture variants at equal training FLOPs, same data order and seed; write a table and a plot.

    python scripts/ablate.py --config configs/ablations/architecture.yaml --out docs/ablation
    python scripts/ablate.py --config configs/ablations/architecture.yaml --ranks 2 --flops 5e13 --only llama,layernorm

configs/ablations/architecture.yaml:
    base: configs/tiny.yaml          # the config every variant starts from
    set: [model.num_layers=4, ...]   # overrides shared by all variants
    flops: 2.0e13                    # training FLOPs per variant (6N + 12LdT per token, as train/mfu uses)
    evals: 6                         # validation points per run (the curve in the plot)
    variants:                        # each: a name and its own --set overrides
      - {name: llama, set: []}
      - {name: layernorm, set: [model.norm=layernorm]}

Every variant sees the same global batches in the same order (train.seed, same tokens per step); a variant
with more FLOPs per token simply takes fewer steps (a prefix of the same stream). Validation uses the same
fixed windows for all. Writes <out>.json, <out>.md (the table) and <out>.png (val loss vs training FLOPs);
runs go to <runs>/<name>/ (default runs/ablation); a finished run of the same request (budget, overrides,
ranks) is reused, an interrupted one resumed, one of another request refused: delete it to re-run.
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


def plan(spec: dict, budget: float, only: set[str]) -> list[dict]:
    """Per variant: its overrides, params, FLOPs/token and the step count that spends `budget`."""
    from scaletrain.config import load_config
    from scaletrain.model.llama import LlamaShape
    from scaletrain.train.metrics import flops_per_token

    out = []
    for v in spec["variants"]:
        if only and v["name"] not in only:
            continue
        overrides = [*spec.get("set", []), *v.get("set", [])]
        cfg = load_config(REPO / spec["base"], overrides)  # validates every variant before anything runs
        s, t = LlamaShape.from_config(cfg.model), cfg.train
        fpt = flops_per_token(s, t.seq_len)
        out.append({"name": v["name"], "overrides": overrides, "own": list(v.get("set", [])), "params": s.num_params(), "flops_per_token": fpt,
                    "seq_len": t.seq_len, "micro_batch": t.micro_batch_size * t.grad_accum})
    return out


def run_variant(v: dict, budget: float, evals: int, ranks: int, runs: Path, base: str) -> dict:
    tokens_per_step = v["micro_batch"] * ranks * v["seq_len"]
    steps = max(evals, int(budget // (v["flops_per_token"] * tokens_per_step)))
    every = max(1, steps // evals)
    run_dir = runs / v["name"].replace(" ", "_")
    sets = [*v["overrides"], f"run.dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={every}",
            f"train.save_every={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.log_every={every}"]
    args = ["launch/train.py", "--config", base, "--set", *sets]
    cmd = [sys.executable, *args] if ranks == 1 else [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), *args]
    if not _reusable(run_dir, {"base": base, "set": sets, "ranks": ranks}):
        t0 = time.time()
        print(f"[{v['name']}] {steps} steps x {tokens_per_step} tokens, {v['params'] / 1e6:.2f}M params", flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # GPUs where there are some (the trainer picks the accelerator)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {v['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        print(f"[{v['name']}] done in {time.time() - t0:.0f} s", flush=True)
    return collect(v, run_dir, steps, tokens_per_step)


def _reusable(run_dir: Path, request: dict) -> bool:
    """True: `run_dir` finished this very request (reuse it). False: run it (fresh, or resume an interrupted
    run of the same request). A run dir made by a different request (other budget, overrides or ranks) is
    refused: re-running there would resume that run, and reusing it would pair its curve with our steps."""
    record = run_dir / "ablate_request.json"
    if record.is_file():
        if json.loads(record.read_text()) != request:
            raise SystemExit(f"error: {run_dir} holds a run of another request (budget, overrides or ranks "
                             f"changed): delete it or pass --runs to another directory")
    elif run_dir.exists():
        raise SystemExit(f"error: {run_dir} exists but was not made by scripts/ablate.py: delete it or pass "
                         f"--runs to another directory")
    else:
        run_dir.mkdir(parents=True)
        record.write_text(json.dumps(request, indent=1))
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def collect(v: dict, run_dir: Path, steps: int, tokens_per_step: int) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}  # noqa: E731
    val = scalars("val/loss")
    tps = [x for s, x in sorted(scalars("train/tokens_per_sec").items()) if s > 1]  # step 1 includes warm-up
    fpt = v["flops_per_token"]
    final = val[max(val)]
    return {"name": v["name"], "overrides": v["own"], "params": v["params"], "flops_per_token": fpt,
            "steps": steps, "tokens": steps * tokens_per_step, "train_flops": steps * tokens_per_step * fpt,
            "tokens_per_s": sum(tps) / len(tps) if tps else None, "val_loss": final, "val_ppl": math.exp(final),
            "curve": [[s * tokens_per_step * fpt, val[s]] for s in sorted(val)]}


def markdown(rows: list[dict], budget: float, ranks: int) -> str:
    lines = [f"Equal training budget {budget:.2e} FLOPs per variant, {ranks} rank(s), same data order and seed; "
             "overrides on top of the shared ones.", "",
             "| variant | overrides | params | FLOPs/token | steps | tokens | tokens/s | val loss | val ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    best = min(r["val_loss"] for r in rows)
    for r in rows:
        sets = " ".join(f"`{o}`" for o in r["overrides"]) or "(baseline)"
        loss = f"**{r['val_loss']:.4f}**" if r["val_loss"] == best else f"{r['val_loss']:.4f}"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        lines.append(f"| {r['name']} | {sets} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | {r['steps']} | "
                     f"{r['tokens']:,} | {tps} | {loss} | {r['val_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in rows:
        x, y = zip(*r["curve"])
        ax.plot(x, y, marker="o", markersize=3, label=f"{r['name']} ({r['val_loss']:.3f})")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Variants at equal compute ({budget:.1e} FLOPs each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ablations/architecture.yaml")
    p.add_argument("--out", default="docs/ablation", help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--flops", type=float, default=None, help="override the YAML's training FLOPs per variant")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--runs", default="runs/ablation", help="run dirs, one per variant")
    a = p.parse_args(argv)
    spec = yaml.safe_load((REPO / a.config).read_text())
    budget = float(a.flops or spec["flops"])
    out = Path(a.out)
    runs = Path(a.runs).resolve()  # training runs with the repo as its working directory
    variants = plan(spec, budget, set(filter(None, a.only.split(","))))
    rows = [run_variant(v, budget, int(spec.get("evals", 6)), a.ranks, runs, spec["base"]) for v in variants]
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"flops": budget, "ranks": a.ranks, "config": a.config, "variants": rows}, indent=1))
    table = markdown(rows, budget, a.ranks)
    Path(f"{out}.md").write_text(table)
    plot(rows, Path(f"{out}.png"), budget)
    print(table)
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
