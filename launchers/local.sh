#!/usr/bin/env bash
# One machine, N processes (GPUs, or CPU processes with gloo):
#   launchers/local.sh N TASK [--config BASE] [OVERLAY ...] [key=value ...]
#   launchers/local.sh 2 pretrain tiny output_dir=runs/pt
# Runs in the caller's directory: relative output_dir and config paths are the caller's (under
# $SL_EXP_DIR when that is set), whatever the clone is called or where it lies.
set -euo pipefail
n=${1:?usage: launchers/local.sh N TASK [CONFIG ...] [key=value ...]}
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
exec "$py" -m singularity_ds.launch local "$n" train "$@"   # the deepspeed launcher (singularity_ds/launch.py)
