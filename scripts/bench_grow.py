#!/usr/bin/env python
"""Streaming growth at ~1B parameters: peak RSS and time of `scaletrain grow`, vs copying the same bytes.

    python scripts/bench_grow.py [--workdir /tmp] [--keep] [--json out.json]

1. writes a random-weight parent (safetensors, fp32; default hidden 1024 / 12 layers / 16 heads, 4 KV heads,
   FFN 4096, vocab 32000, tied: 0.22B params);
2. runs `scaletrain grow` in a child process to hidden 2048 / 16 layers / 32 heads, 8 KV heads, FFN 8192
   (1.04B params, 4.2 GB fp32; identity blocks interleaved, noise 0.1) and reads that process's peak RSS;
3. baselines on the child's bytes, each in its own process: a plain file copy (shutil) and a safetensors
   load_file + save_file round trip (what a tool holding the whole model does), plus an idle interpreter
   with torch imported (the floor every Python process pays).
Disk: about 2x the child plus the parent under --workdir, removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARENT = dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=4, intermediate_size=4096,
              vocab_size=32000, max_seq_len=2048, tie_word_embeddings=True)
CHILD = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192)


def measured(cmd: list[str], label: str) -> dict:
    """Run `cmd` in its own process (via a fresh `python -c` wrapper so RUSAGE_CHILDREN covers only it)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); "
               f"rc = subprocess.run({cmd!r}).returncode; dt = time.time() - t; "
               "print('BENCH', rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", wrapper], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("BENCH")]
    if out.returncode or not line or line[0].split()[1] != "0":
        raise SystemExit(f"{label} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    _, rc, dt, kib = line[0].split()
    result = {"seconds": round(float(dt), 1), "peak_rss_mb": round(int(kib) / 1024)}
    print(f"{label:<38} {result['seconds']:>8.1f} s   peak RSS {result['peak_rss_mb']:>6,} MB", flush=True)
    return result


def torch_numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def write_parent(d: Path) -> int:
    """Random fp32 weights (std 0.02, norm gains 1), streamed tensor by tensor; returns the parameter count."""
    import torch
    import yaml

    from scaletrain.config import Config
    from scaletrain.weights.sources import expected_shapes
    from scaletrain.weights.writer import write_safetensors

    cfg = Config.model_validate({"model": PARENT})
    shapes = expected_shapes(cfg.model)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02

    d.mkdir(parents=True)
    write_safetensors(d, [(n, s, torch.float32) for n, s in shapes.items()], tensors(), 2 * 10**9, progress=False)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return sum(torch.Size(s).numel() for s in shapes.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the parent/child dirs")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_grow_", dir=args.workdir))
    py = sys.executable
    try:
        parent, child = root / "parent", root / "child"
        t0 = time.time()
        n_parent = write_parent(parent)
        print(f"parent: {n_parent / 1e9:.3f}B params, {sum(f.stat().st_size for f in parent.glob('*.safetensors')) / 1e9:.2f} GB "
              f"written in {time.time() - t0:.0f} s -> {parent}", flush=True)
        floor = measured([py, "-c", "import torch, safetensors, scaletrain.growth.offline"], "python + torch imported (floor)")
        sets = [f"model.{k}={v}" for k, v in CHILD.items()]
        grow = measured([py, "-m", "scaletrain.cli", "grow", str(parent), "--out", str(child), "--set", *sets,
                         "--insert", "interleave", "--noise", "0.1", "--check-windows", "2", "--check-seq-len", "128"],
                        "scaletrain grow (streaming)")
        files = sorted(child.glob("model*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        lineage = json.loads((child / "lineage.json").read_text())
        copy = measured([py, "-c", f"import shutil\nfor f in {[str(f) for f in files]!r}: shutil.copyfile(f, f + '.copy')"],
                        "plain copy of the child's bytes")
        for f in root.glob("child/*.copy"):
            f.unlink()
        roundtrip = measured([py, "-c", "from safetensors.torch import load_file, save_file\n"
                              f"for f in {[str(f) for f in files]!r}: save_file(load_file(f), f + '.copy')"],
                             "safetensors load+save of the child")
        result = {"parent": PARENT, "child": {**PARENT, **CHILD}, "parent_params": lineage["params"]["parent"],
                  "child_params": lineage["params"]["child"], "child_bytes": size, "child_files": len(files),
                  "floor": floor, "grow": grow, "copy": copy, "safetensors_roundtrip": roundtrip,
                  "check": lineage["grow"]["check"], "cpus": os.cpu_count()}
        from scaletrain.weights.files import file_specs

        largest = max(torch_numel(shape) * 4 for _, shape, _ in file_specs(files))
        result["largest_tensor_bytes"] = largest
        print(f"child: {result['child_params'] / 1e9:.3f}B params, {size / 1e9:.2f} GB in {len(files)} files "
              f"(largest tensor {largest / 2**20:.0f} MB); grow peak RSS = interpreter floor + "
              f"{grow['peak_rss_mb'] - floor['peak_rss_mb']:,} MB; {grow['seconds'] / max(copy['seconds'], 1e-9):.1f}x the copy time")
        c = result["check"]
        print(f"check ({c['sample']}): parent loss {c['parent_loss']:.4f} child loss {c['child_loss']:.4f} "
              f"max |dlogits| {c['max_abs_dlogits']:.1e}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
