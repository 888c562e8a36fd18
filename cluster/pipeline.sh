#!/bin/bash
# Submit the whole pipeline as a chain of dependent jobs (run it on the login node):
#   cluster/pipeline.sh configs/wt103_base.yaml [key=value ...]
# prepare (job array) → merge → train → evaluate → export, each starting only when the one
# before ended successfully (afterok; an array counts when every task succeeded), and cancelled
# when that can no longer happen (--kill-on-invalid-dep=yes). A requeued train job keeps its id,
# so evaluation waits for its last run. Overrides go to every stage.
# Environment knobs:
#   PREPARE_TASKS=8        array size for prepare; PREPARE_THROTTLE=16 runs at most 16 at once
#   SKIP_PREPARE=1         shards exist already: start with train
#   PREPARE_SBATCH, TRAIN_SBATCH, EVALUATE_SBATCH, EXPORT_SBATCH: extra sbatch options per stage,
#                          e.g. TRAIN_SBATCH="--nodes=4 --time=48:00:00"
#   SBATCH_EXTRA           extra sbatch options for every job (e.g. "--partition=gpu --account=X")
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! -f "$1" ]]; then
  echo "usage: cluster/pipeline.sh CONFIG.yaml [key=value ...]" >&2
  echo "error: config file '${1:-}' not found (relative to $(pwd))" >&2
  exit 2
fi
mkdir -p logs  # sbatch does not create the --output directory; a job without it fails silently

read -r -a extra <<< "${SBATCH_EXTRA:-}"
submit() {  # submit STAGE_OPTIONS_VAR DEPENDENCY_JOB script args...: prints the job id
  local opts_var="$1" after="$2"; shift 2
  local -a opts; read -r -a opts <<< "${!opts_var:-}"
  local -a dep=()
  [[ -n "$after" ]] && dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
  sbatch --parsable "${extra[@]}" "${dep[@]}" "${opts[@]}" "$@" | cut -d';' -f1
}

last=""
if [[ "${SKIP_PREPARE:-0}" != 1 ]]; then
  tasks="${PREPARE_TASKS:-8}"
  prep=$(submit PREPARE_SBATCH "" --array="0-$((tasks - 1))${PREPARE_THROTTLE:+%$PREPARE_THROTTLE}" cluster/prepare.sh "$@")
  merge=$(submit PREPARE_SBATCH "$prep" --array=0 --job-name=xlpipe-merge cluster/prepare.sh --merge "$@")
  echo "prepare  $prep (array of $tasks)"
  echo "merge    $merge"
  last="$merge"
fi
train=$(submit TRAIN_SBATCH "$last" cluster/train.sh "$@")
evaluate=$(submit EVALUATE_SBATCH "$train" cluster/evaluate.sh "$@")
export_=$(submit EXPORT_SBATCH "$evaluate" cluster/export.sh "$@")
echo "train    $train"
echo "evaluate $evaluate"
echo "export   $export_"
echo "watch: squeue -u ${USER:-$(id -un)}   logs: logs/   cancel all: scancel ${prep:-} ${merge:-} $train $evaluate $export_"
