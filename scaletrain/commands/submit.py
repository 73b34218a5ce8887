"""`scaletrain submit`: render <run.dir>/submit.sbatch from launch/slurm/ and sbatch it (scaletrain.cluster.slurm
does the rendering, checks and submission; this module is its command line)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scaletrain.cluster import slurm
from scaletrain.commands.common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a training run to SLURM (requeue-safe batch script saved in run.dir)",
        description="Render <run.dir>/submit.sbatch (always saved: the job is reproducible) and submit it with "
                    "sbatch. Prints the job id, run dir and TensorBoard command. The job checkpoints on USR1 "
                    "(--signal=B:USR1@grace before the time limit, or scancel --signal=USR1 --batch JOB), "
                    "requeues itself and resumes from the newest checkpoint until train.max_steps.",
    )
    add_config_args(p)
    add_submit_args(p)
    p.set_defaults(func=run)


def add_submit_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `scaletrain submit` besides --config/--set (add_config_args)."""
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node; 0 (default) = CPU nodes, no GPU request at all")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="training ranks per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--time", default="01:00:00", help="time limit: HH:MM:SS, D-HH:MM:SS or minutes (default 01:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--mode", choices=slurm.MODES, default="deepspeed",
                   help="deepspeed: one step, pdsh/ssh to the nodes (default); srun: one srun task per node")
    p.add_argument("--grace", type=int, default=None,
                   help="seconds before the limit at which the job checkpoints and requeues (default min(300, time/2))")
    p.add_argument("--python", default=sys.executable,
                   help="python interpreter or venv dir with torch+deepspeed, same path on all nodes (default: this one)")
    p.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="share nodes with other jobs (default: whole nodes)")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help="with --no-exclusive: CPUs to request per node (default: one per rank)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script that would be saved as <run.dir>/submit.sbatch; write nothing, do not submit")


def options_from_args(args: argparse.Namespace) -> slurm.SubmitOptions:
    """Resolve CLI args against the config: absolute paths, run.dir from the (overridden) config."""
    from scaletrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    return slurm.SubmitOptions(
        config=os.path.abspath(args.config), run_dir=run_dir, overrides=list(args.overrides),
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ranks_per_node=args.ranks_per_node,
        time=args.time, partition=args.partition, account=args.account, qos=args.qos, mode=args.mode,
        grace=args.grace, python=slurm.resolve_python(args.python), workdir=os.getcwd(), exclusive=args.exclusive,
        cpus_per_node=args.cpus_per_node,
    )


def run(args: argparse.Namespace) -> int:
    """`scaletrain submit --config X [--set K=V ...] --nodes N --gpus-per-node G [--ranks-per-node R]
    --time T [--partition P] [--account A] [--qos Q] [--mode deepspeed|srun] [--grace S] [--python P]
    [--no-exclusive [--cpus-per-node C]] [--dry-run]`: write <run.dir>/submit.sbatch, then sbatch it (--dry-run: only print it)."""
    o = options_from_args(args)
    text = slurm.render_sbatch(o)   # validate everything before touching the run dir
    if args.dry_run:          # only print: nothing is written, nothing submitted
        print(text, end="")
        print(f"# dry run: not written to {Path(o.run_dir) / 'submit.sbatch'}; not submitted", file=sys.stderr)
        return 0
    slurm.check_tools(o.mode)       # fail before writing when SLURM is not installed or not answering,
    slurm.check_reachable()
    slurm.check_run_dir_free(o.run_dir)   # or when a live job already owns the run dir
    job, path = slurm.submit_keeping_previous(o, text)
    slurm.record_submission(o.run_dir, job, path)  # a second submit sees this job while it is still only queued
    ranks, _ = slurm.validate(o)
    print(f"submitted job {job}: {o.nodes} node(s) x {ranks} rank(s), {o.mode} mode, time limit {o.time}\n"
          f"  run dir:     {o.run_dir}\n"
          f"  script:      {path}\n"
          f"  log:         {o.run_dir}/slurm-{job}.out\n"
          f"  TensorBoard: tensorboard --logdir {Path(o.run_dir).parent}\n"
          f"  watch:       squeue -j {job};  scaletrain runs {Path(o.run_dir).parent}\n"
          f"  stop early:  scancel --signal=USR1 --batch {job}   (checkpoint + requeue; plain scancel: checkpoint + end)")
    return 0
