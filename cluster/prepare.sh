#!/bin/bash
# Prepare shards as a job array; each task tokenises its own slice of the input units
# (pipeline.prepare reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT), then one merge job
# checks every shard and writes manifest.json:
#   jid=$(sbatch --parsable --array=0-15 cluster/prepare.sh configs/wt103_base.yaml)
#   sbatch --array=0 --dependency=afterok:$jid --kill-on-invalid-dep=yes cluster/prepare.sh --merge configs/wt103_base.yaml
# (cluster/pipeline.sh does both.) Arguments before the config file are passed to
# pipeline.prepare as they are (e.g. --merge, --force); data.workers follows --cpus-per-task.
#SBATCH --job-name=xlpipe-prepare
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
root="${XLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
[[ -f "$root/cluster/common.sh" ]] || { echo "no cluster/common.sh under '$root': submit from the xlpipe repo root or export XLPIPE_ROOT" >&2; exit 2; }
source "$root/cluster/common.sh"

flags=()
while [[ $# -gt 0 && ! -f "$1" ]]; do flags+=("$1"); shift; done
xl_require_config prepare "$@"
config="$1"; shift
if [[ " ${flags[*]-} " == *" --merge "* ]]; then
  # The merge is one job over all shards, even when submitted with the header's --array.
  if [[ "${SLURM_ARRAY_TASK_ID:-0}" != "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
    echo "merge runs in array task ${SLURM_ARRAY_TASK_MIN:-0} only; task $SLURM_ARRAY_TASK_ID has nothing to do"
    exit 0
  fi
  unset SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_MAX SLURM_ARRAY_JOB_ID
fi
xl_banner prepare "$config" "${flags[@]}" "$@"
xl_preflight prepare "$config" "$@"
"$XL_PYTHON" -m pipeline.prepare --config "$config" "${flags[@]}" "data.workers=${SLURM_CPUS_PER_TASK:-1}" "$@"
