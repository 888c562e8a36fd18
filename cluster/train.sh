#!/bin/bash
# Train under SLURM, one task per GPU:
#   mkdir -p logs && sbatch cluster/train.sh configs/wt103_base.yaml [key=value ...]
# Resources: override the headers on the command line as usual, keeping tasks = GPUs per node:
#   sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 --time=48:00:00 cluster/train.sh CONFIG
# Preemption: 120 s before the time limit SLURM sends USR1 to every task (--signal without B:
# reaches the srun steps, not this shell). The ranks agree at the next step, all save, rank 0
# requeues, and the job restarts from the checkpoint (SLURM_RESTART_COUNT+1, same MLflow run);
# the log is appended across restarts.
#SBATCH --job-name=xlpipe-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root="${XLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
[[ -f "$root/cluster/common.sh" ]] || { echo "no cluster/common.sh under '$root': submit from the xlpipe repo root or export XLPIPE_ROOT" >&2; exit 2; }
source "$root/cluster/common.sh"

xl_srun_stage train "$@"
