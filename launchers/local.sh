#!/usr/bin/env bash
# One machine, N processes (GPUs, or CPU processes with gloo):
#   launchers/local.sh N TASK [--config BASE] [OVERLAY ...] [key=value ...]
#   launchers/local.sh 2 pretrain tiny output_dir=runs/pt
set -euo pipefail
n=${1:?usage: launchers/local.sh N TASK [CONFIG ...] [key=value ...]}
shift
cd "$(dirname "$0")/.."
if [ -x .venv/bin/deepspeed ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
exec deepspeed --num_accelerators "$n" --master_port "${MASTER_PORT:-29500}" --module singularity_ds train "$@"
