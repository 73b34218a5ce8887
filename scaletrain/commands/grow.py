"""`scaletrain grow PARENT --out CHILD --set model.KEY=VALUE ...`: a larger model that starts from the parent's function."""

from __future__ import annotations

import argparse
import sys

from scaletrain.commands.common import non_negative_int, positive_int


def _insert(text: str):
    from scaletrain.errors import UserError

    if text in ("end", "interleave"):
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--insert '{text}': use end, interleave or comma-separated child layer indices (e.g. 1,3)") from None


def _val_tokens(parent):
    """The parent's validation tokens when its data cache is on this machine, else None."""
    from scaletrain.data.cache import find_cache, open_cache
    from scaletrain.errors import UserError

    if parent.src.config is None:
        return None
    try:
        cache = open_cache(find_cache(parent.src.config))
    except (UserError, OSError):
        return None
    return cache.tokens("val") if cache is not None else None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaletrain.config import parse_overrides
    from scaletrain.errors import UserError
    from scaletrain.growth.check import sample_windows
    from scaletrain.growth.offline import child_model_config, grow_checkpoint
    from scaletrain.growth.parent import open_parent
    from scaletrain.growth.plan import GrowthSpec
    from scaletrain.weights.checkpoint_dir import check_out
    from scaletrain.weights.writer import parse_size

    tree = parse_overrides(args.overrides)
    if set(tree) - {"model"} or not tree or not isinstance(tree["model"], dict):
        raise UserError("grow needs --set model.KEY=VALUE ... (the child's shape; e.g. --set model.num_layers=8); "
                        "other sections are not part of a checkpoint")
    out = Path(args.out).expanduser()
    check_out(out)
    max_shard = parse_size(args.max_shard_size)
    spec = GrowthSpec(depth_method=args.depth_method, insert=_insert(args.insert), width_method=args.width_method,
                      noise_std=args.noise, seed=args.seed)
    parent = open_parent(args.parent)
    child = child_model_config(parent.model, tree["model"])
    if child == parent.model:
        raise UserError("the child has the parent's shape; --set a larger model.hidden_size, num_layers, ...")
    sample = None
    if args.check_windows > 0:
        seq = min(args.check_seq_len, parent.model.max_seq_len)
        sample = sample_windows(_val_tokens(parent), args.check_windows, seq, parent.model.vocab_size, args.seed)
    lineage = grow_checkpoint(parent, out, child, spec, args.optimizer, sample, max_shard)
    changed = {k: (getattr(parent.model, k), getattr(child, k)) for k in type(child).model_fields
               if getattr(parent.model, k) != getattr(child, k)}
    diff = ", ".join(f"{k} {a}->{b}" for k, (a, b) in changed.items())
    g = lineage["grow"]
    exact = "exact" if g["exact"] else "not exact"
    print(f"grew {parent.src.path} ({lineage['params']['parent'] / 1e6:.2f}M params) -> {out} "
          f"({lineage['params']['child'] / 1e6:.2f}M) in {g['seconds']:.1f} s: {diff} | depth {spec.depth_method} "
          f"({exact}), noise {spec.noise_std}, optimizer {args.optimizer}")
    if g["check"]:
        c = g["check"]
        print(f"check on {c['sample']}: parent loss {c['parent_loss']:.4f} | child loss {c['child_loss']:.4f} | "
              f"max |dlogits| {c['max_abs_dlogits']:.2e}")
    print(f"train it: scaletrain train --config CONFIG --set init.from={out} "
          + " ".join(f"model.{k}={b}" for k, (a, b) in changed.items()) + f" run.dir=runs/{out.name}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("grow", help="grow a trained model into a larger one that starts from its function",
                       description="PARENT: a run dir (newest verified checkpoint), a DeepSpeed checkpoint tag dir, "
                                   "a scaletrain checkpoint dir or a Hugging Face Llama dir.")
    p.add_argument("parent", metavar="PARENT")
    p.add_argument("--out", required=True, metavar="CHILD", help="new checkpoint dir (must not exist, or be empty)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="model.KEY=VALUE",
                   help="the child's shape, e.g. --set model.hidden_size=512 model.num_heads=8 model.num_layers=8")
    p.add_argument("--depth-method", choices=("identity", "stack", "interleave"), default="identity",
                   help="new blocks: identity (zeroed output projections, exact), stack (repeat the block "
                        "sequence, G_stack), interleave (each block followed by its copy)")
    p.add_argument("--insert", default="end", help="identity blocks: end, interleave, or child indices i,j,..")
    p.add_argument("--width-method", choices=("zero", "copy", "strict"), default="zero",
                   help="non-integer head/FFN growth: new zero-writer units, extra copies, or refuse")
    p.add_argument("--noise", type=float, default=0.0, metavar="STD",
                   help="function-preserving symmetry-breaking noise, relative to the weights' RMS (e.g. 0.1)")
    p.add_argument("--optimizer", choices=("reset", "grow"), default="reset",
                   help="grow: also write the Adam moments transformed like their weights (DeepSpeed parents)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--check-windows", type=non_negative_int, default=4, help="val windows for the parent-vs-child check (0: skip)")
    p.add_argument("--check-seq-len", type=positive_int, default=256, help="tokens per check window")
    p.set_defaults(func=run)
