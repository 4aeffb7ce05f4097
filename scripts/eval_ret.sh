#!/usr/bin/env bash
# The original Singularity's scripts/eval_ret.sh, with its arguments:
#   bash scripts/eval_ret.sh DATASET CKPT SAVE_DIRNAME local NGPU [key=value ...]
#   sbatch scripts/eval_ret.sh DATASET CKPT SAVE_DIRNAME slurm NGPU [key=value ...]
# It prints the singularity-ds command it runs (the README maps each); singularity_ds/launch.py says where
# the run goes and what of the original's script is left out.
#SBATCH --job-name=sl_eval_ret
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
set -euo pipefail
py=${PYTHON:-}
for c in "$(dirname "$0")/../.venv/bin/python" "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python"; do
  if [ -z "$py" ] && [ -x "$c" ]; then py=$c; fi
done
exec "${py:-python3}" -m singularity_ds.launch original eval_ret "$@"
