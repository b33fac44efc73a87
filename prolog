#!/bin/sh
# SLURM Prolog entry point (slurm.conf: Prolog=/path/to/slurm-netacct/prolog).
# SLURM runs it as root with no PATH; it runs slurm_netacct's prolog with the project's venv
# (or $NETACCT_PYTHON). Exit codes: see README.md, "Exit codes".
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
here=$(dirname "$(readlink -f "$0")")
exec "${NETACCT_PYTHON:-$here/.venv/bin/python}" -m slurm_netacct.hooks prolog
