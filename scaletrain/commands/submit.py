"""`scaletrain submit`: render <run.dir>/submit.sbatch from launch/slurm/ and sbatch it (scaletrain.cluster.slurm)."""

from __future__ import annotations

import argparse

from scaletrain.commands.common import add_config_args


def run(args: argparse.Namespace) -> int:
    from scaletrain.cluster.slurm import submit_command

    return submit_command(args)


def add_parser(sub) -> None:
    from scaletrain.cluster.slurm import add_submit_args

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
