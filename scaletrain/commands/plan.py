"""`scaletrain plan --config X [--set ...] [--gpus N] [--nodes K] [--hostfile F [--include|--exclude H]]`:
will it fit, and how long will a step take?"""

from __future__ import annotations

import argparse

from scaletrain.commands.common import add_config_args, positive_int


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _hostfile_slots(args: argparse.Namespace) -> list[int]:
    """Ranks on each node that `deepspeed --hostfile F` with the same --include/--exclude or --num_gpus/
    --num_nodes would start (their first N hosts, their first G slots on each), checked in one line each
    where DeepSpeed would raise a traceback or start ranks on slots the host does not have."""
    from scaletrain.cluster.hostfile import read_hostfile, resolve_filters
    from scaletrain.errors import UserError

    if (args.include or args.exclude) and (args.gpus or args.nodes):
        raise UserError("--gpus/--nodes and --include/--exclude both select from the hostfile (DeepSpeed refuses "
                        "the pair too); use one of them")
    active = resolve_filters(read_hostfile(args.hostfile), args.include, args.exclude)
    if args.nodes:
        if args.nodes > len(active):
            raise UserError(f"--nodes {args.nodes}: hostfile {args.hostfile} has {len(active)} host(s); pass at most that")
        active = dict(list(active.items())[: args.nodes])
    if args.gpus:
        short = [f"{h}={len(s)}" for h, s in active.items() if len(s) < args.gpus]
        if short:
            raise UserError(f"--gpus {args.gpus}: more ranks than slots on {', '.join(short)} in {args.hostfile}; "
                            "pass at most the smallest slot count")
        return [args.gpus] * len(active)
    return [len(s) for s in active.values()]


def run(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.errors import UserError
    from scaletrain.plan import GB, report

    if (args.include or args.exclude) and not args.hostfile:
        flag = "--include" if args.include else "--exclude"
        raise UserError(f"{flag} selects hosts of a hostfile; add --hostfile FILE")
    if args.hostfile:  # the allocation a DeepSpeed hostfile describes: one node per host, its slots as ranks
        slots = _hostfile_slots(args)
        per_node, nodes, ranks = max(slots), len(slots), sum(slots)
    else:
        per_node, nodes = args.gpus or 1, args.nodes or 1
        ranks = per_node * nodes
    cfg = load_config(args.config, args.overrides)
    print(report(cfg, per_node, nodes, ranks=ranks, device=args.device,
                 memory=args.memory_gb * GB if args.memory_gb else None,
                 peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs, memory per rank by ZeRO stage and step time of a config")
    add_config_args(p)
    p.add_argument("--gpus", type=positive_int, default=None, metavar="N",
                   help="ranks per node: GPUs, or CPU processes without GPUs (default 1; with --hostfile: its slots)")
    p.add_argument("--nodes", type=positive_int, default=None, metavar="K",
                   help="nodes (default 1; with --hostfile: its first K hosts, as deepspeed --num_nodes)")
    p.add_argument("--hostfile", default=None, metavar="FILE",
                   help="a DeepSpeed hostfile: nodes = its hosts, ranks on each = its slots (hosts may differ)")
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--include", default="", metavar="F",
                       help="with --hostfile: only these hosts/slots (DeepSpeed's syntax), e.g. 'worker-0@worker-1:0,2'")
    hosts.add_argument("--exclude", default="", metavar="F",
                       help="with --hostfile: leave these hosts/slots out, e.g. 'worker-1:0'")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="plan for this device kind (default: what this machine has)")
    p.add_argument("--memory-gb", type=_positive_float, default=None, help="memory per rank in GB (default: this machine's GPU memory, or RAM / ranks)")
    p.add_argument("--peak-tflops", type=_positive_float, default=None, help="peak TFLOP/s per GPU (or per CPU machine) (default: from train.peak_flops, else measured here)")
    p.set_defaults(func=run)
