#!/usr/bin/env bash
# SLURM: one process per GPU, started by srun; ranks and the master come from SLURM's variables.
#   sbatch launchers/multinode.sh EXP_NAME TASK [--config BASE] [OVERLAY ...] [key=value ...]
#   sbatch --nodes=4 --time=48:00:00 launchers/multinode.sh pt_webvid pretrain train_corpus=webvid_cc3m
# Every #SBATCH line below can be overridden on the sbatch command line. The run folder is
# runs/EXP_NAME under the directory you submit from (any checkout name works).
#SBATCH --job-name=singularity-ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
exp=${1:?usage: sbatch launchers/multinode.sh EXP_NAME TASK [CONFIG ...] [key=value ...]}
task=${2:?usage: sbatch launchers/multinode.sh EXP_NAME TASK [CONFIG ...] [key=value ...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-$PWD}"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
# srun, one process per task; the master: the job's first node, a port from the job id (launch.py)
exec "$py" -m singularity_ds.launch slurm train "$task" "$@" "output_dir=runs/$exp"
