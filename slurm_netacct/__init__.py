"""slurm-netacct: per-job network accounting for SLURM."""
