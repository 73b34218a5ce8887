"""Multi-node plumbing: DeepSpeed hostfiles and SLURM batch scripts (no torch import here)."""
