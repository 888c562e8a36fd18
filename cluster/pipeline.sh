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
# shellcheck disable=SC1091
source cluster/common.sh
# Everything checkable now is checked before the first submission (config, corpus, directories).
preflight_flags=(); [[ "${SKIP_PREPARE:-0}" == 1 ]] && preflight_flags=(--skip-prepare)
"$XL_PYTHON" -m pipeline.runtime.preflight pipeline "${preflight_flags[@]}" --config "$@" || exit 2
mkdir -p logs  # sbatch does not create the --output directory; a job without it fails silently

# A submission refused half-way (an impossible resource request, say) leaves no partial chain.
submitted=()
cancel_partial() {
  if [[ ${#submitted[@]} -gt 0 ]]; then
    echo "error: a submission failed; cancelling the jobs already submitted: ${submitted[*]}" >&2
    scancel "${submitted[@]}" || true
  fi
}
trap 'cancel_partial' ERR

read -r -a extra <<< "${SBATCH_EXTRA:-}"
submit() {  # submit STAGE_OPTIONS_VAR DEPENDENCY_JOB script args...: prints the job id
  local opts_var="$1" after="$2"; shift 2
  local -a opts; read -r -a opts <<< "${!opts_var:-}"
  local -a dep=()
  [[ -n "$after" ]] && dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
  local out; out=$(sbatch --parsable "${extra[@]}" "${dep[@]}" "${opts[@]}" "$@")
  echo "${out%%;*}"
}

# Every job's resource request, tried with --test-only before anything is submitted: SLURM accepts
# an impossible request for a job with a dependency and leaves it pending for ever.
check_request() {  # check_request STAGE_OPTIONS_VAR script...
  local opts_var="$1"; shift
  local -a opts; read -r -a opts <<< "${!opts_var:-}"
  local msg
  if ! msg=$(sbatch --test-only "${extra[@]}" "${opts[@]}" "$@" 2>&1); then
    echo "error: SLURM refuses the request of '$*' with ${opts_var}='${!opts_var:-}' SBATCH_EXTRA='${SBATCH_EXTRA:-}':" >&2
    echo "  $msg" >&2
    echo "  fix ${opts_var} (or the script's #SBATCH header) to fit the partition" >&2
    exit 2
  fi
}
if [[ "${SKIP_PREPARE:-0}" != 1 ]]; then
  check_request PREPARE_SBATCH --array=0 cluster/prepare.sh "$@"
fi
check_request TRAIN_SBATCH cluster/train.sh "$@"
check_request EVALUATE_SBATCH cluster/evaluate.sh "$@"
check_request EXPORT_SBATCH cluster/export.sh "$@"

last=""
if [[ "${SKIP_PREPARE:-0}" != 1 ]]; then
  tasks="${PREPARE_TASKS:-8}"
  prep=$(submit PREPARE_SBATCH "" --array="0-$((tasks - 1))${PREPARE_THROTTLE:+%$PREPARE_THROTTLE}" cluster/prepare.sh "$@")
  submitted+=("$prep")
  merge=$(submit PREPARE_SBATCH "$prep" --array=0 --job-name=xlpipe-merge cluster/prepare.sh --merge "$@")
  submitted+=("$merge")
  echo "prepare  $prep (array of $tasks)"
  echo "merge    $merge"
  last="$merge"
fi
train=$(submit TRAIN_SBATCH "$last" cluster/train.sh "$@")
submitted+=("$train")
evaluate=$(submit EVALUATE_SBATCH "$train" cluster/evaluate.sh "$@")
submitted+=("$evaluate")
export_=$(submit EXPORT_SBATCH "$evaluate" cluster/export.sh "$@")
echo "train    $train"
echo "evaluate $evaluate"
echo "export   $export_"
echo "watch: squeue -u ${USER:-$(id -un)}   logs: logs/   cancel all: scancel ${prep:-} ${merge:-} $train $evaluate $export_"
