#!/bin/sh
# SLURM Prolog entry point (slurm.conf: Prolog=/path/to/slurm-netacct/prolog).
# SLURM runs it as root with no PATH. Fast path: client/netacct-hook hands the work to
# netacct-daemon; without the daemon it runs slurm_netacct's prolog with the project's venv
# (or $NETACCT_PYTHON) itself. Exit codes: see README.md, "Exit codes".
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
here=${0%/*}
[ -L "$0" ] && here=$(dirname "$(readlink -f "$0")")
py=${NETACCT_PYTHON:-$here/.venv/bin/python}
[ -x "$here/client/netacct-hook" ] && exec "$here/client/netacct-hook" prolog "$py"
exec "$py" -m slurm_netacct.cli.hooks prolog
