#!/bin/bash
# Evaluate a trained run (perplexity / bpc with the papers' settings):
#   sbatch cluster/evaluate.sh configs/wt103_base.yaml [key=value ...]
# One task per GPU as in train.sh; one GPU is plenty for the paper-sized models.
#SBATCH --job-name=xlpipe-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root="${XLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
[[ -f "$root/cluster/common.sh" ]] || { echo "no cluster/common.sh under '$root': submit from the xlpipe repo root or export XLPIPE_ROOT" >&2; exit 2; }
source "$root/cluster/common.sh"

xl_srun_stage evaluate "$@"
