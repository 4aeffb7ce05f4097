#!/usr/bin/env bash
# The original Singularity's scripts/pretrain.sh, with its arguments:
#   bash scripts/pretrain.sh EXP_NAME CORPUS NGPU local [key=value ...]
#   sbatch scripts/pretrain.sh EXP_NAME CORPUS NGPU slurm [key=value ...]
# It prints the singularity-ds command it runs (the README maps each); singularity_ds/launch.py says where
# the run goes and what of the original's script is left out.
#SBATCH --job-name=sl_pt
#SBATCH --nodes=1
#SBATCH --gres=gpu:3
#SBATCH --ntasks-per-node=3
#SBATCH --cpus-per-task=12
#SBATCH --time=144:00:00
set -euo pipefail
py=${PYTHON:-}
for c in "$(dirname "$0")/../.venv/bin/python" "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python"; do
  if [ -z "$py" ] && [ -x "$c" ]; then py=$c; fi
done
exec "${py:-python3}" -m singularity_ds.launch original pretrain "$@"
