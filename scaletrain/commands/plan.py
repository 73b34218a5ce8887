"""`scaletrain plan --config X [--set ...] --gpus N [--nodes K | --hostfile F [--include|--exclude H]]`:
will it fit, and how long will a step take?"""

from __future__ import annotations

import argparse

from scaletrain.commands.common import add_config_args


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from scaletrain.config import load_config
    from scaletrain.errors import UserError
    from scaletrain.plan import GB, report

    gpus, nodes = args.gpus, args.nodes
    if (args.include or args.exclude) and not args.hostfile:
        flag = "--include" if args.include else "--exclude"
        raise UserError(f"{flag} selects hosts of a hostfile; add --hostfile FILE")
    if args.hostfile:  # the allocation a DeepSpeed hostfile describes: one node per host, its slots as ranks
        from scaletrain.cluster.hostfile import read_hostfile, resolve_filters

        # what `deepspeed --hostfile H --include/--exclude F` would raise a traceback for (and zero slots): one line
        active = resolve_filters(read_hostfile(args.hostfile), args.include, args.exclude)
        slots = {h: len(s) for h, s in active.items()}
        if len(set(slots.values())) > 1:
            raise UserError(f"hostfile {args.hostfile}: hosts have different slots ({', '.join(f'{h}={n}' for h, n in slots.items())}); "
                            "plan assumes the same number of ranks on every node: pass --gpus/--nodes instead")
        gpus, nodes = next(iter(slots.values())), len(slots)
    cfg = load_config(args.config, args.overrides)
    print(report(cfg, gpus, nodes, device=args.device,
                 memory=args.memory_gb * GB if args.memory_gb else None,
                 peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs, memory per rank by ZeRO stage and step time of a config")
    add_config_args(p)
    p.add_argument("--gpus", type=_positive, default=1, metavar="N", help="ranks per node: GPUs, or CPU processes without GPUs (default 1)")
    p.add_argument("--nodes", type=_positive, default=1, metavar="K", help="nodes (default 1)")
    p.add_argument("--hostfile", default=None, metavar="FILE", help="a DeepSpeed hostfile: nodes = its hosts, ranks per node = their slots")
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--include", default="", metavar="F",
                       help="with --hostfile: only these hosts/slots (DeepSpeed's syntax), e.g. 'worker-0@worker-1:0,2'")
    hosts.add_argument("--exclude", default="", metavar="F",
                       help="with --hostfile: leave these hosts/slots out, e.g. 'worker-1:0'")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="plan for this device kind (default: what this machine has)")
    p.add_argument("--memory-gb", type=_positive_float, default=None, help="memory per rank in GB (default: this machine's GPU memory, or RAM / ranks)")
    p.add_argument("--peak-tflops", type=_positive_float, default=None, help="peak TFLOP/s per GPU (or per CPU machine) (default: measured here)")
    p.set_defaults(func=run)
