# Sourced by the cluster/*.sh entry scripts: repo root, Python, environment hygiene, banner.
# Not a job script itself. Entry scripts find it through XLPIPE_ROOT or SLURM_SUBMIT_DIR
# (sbatch runs a spooled copy of the script, so its own path says nothing about the repo).

XL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$XL_ROOT"

# Python: $XLPIPE_PYTHON, else the repo's .venv (activated, so its mlflow etc. are on PATH),
# else python3 from PATH.
if [[ -n "${XLPIPE_PYTHON:-}" ]]; then
  XL_PYTHON="$XLPIPE_PYTHON"
elif [[ -x "$XL_ROOT/.venv/bin/python" ]]; then
  # shellcheck disable=SC1091
  set +u; source "$XL_ROOT/.venv/bin/activate"; set -u
  XL_PYTHON="$XL_ROOT/.venv/bin/python"
else
  XL_PYTHON="$(command -v python3)"
fi
export XL_PYTHON
export PYTHONPATH="$XL_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# srun gives every task its rank; values exported in the submitting shell (sbatch passes the
# whole environment) would override it. MASTER_ADDR/MASTER_PORT set on purpose are kept.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK TORCHELASTIC_RUN_ID

# Environment hygiene (torchtitan's set): readable NCCL errors instead of hangs, tracebacks on
# crashes, unbuffered logs, no fragmentation OOMs, one OpenMP pool per task's CPUs.
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export LOGLEVEL="${LOGLEVEL:-INFO}"

# xl_require_config STAGE "$@": the first argument must be an existing config file.
xl_require_config() {
  local stage="$1"; shift
  if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: sbatch cluster/$stage.sh CONFIG.yaml [key=value ...]" >&2
    echo "error: config file '${1:-}' not found (relative to $XL_ROOT)" >&2
    exit 2
  fi
}

# xl_preflight STAGE CONFIG [overrides...]: the config loads and validates, the shards/corpus and
# the run directory are there, the streams split over the tasks -- checked here, once, before any
# task starts (pipeline/runtime/preflight.py); exits 2 with the problems otherwise.
xl_preflight() {
  local stage="$1"; shift
  "$XL_PYTHON" -m pipeline.runtime.preflight "$stage" --ntasks "${SLURM_NTASKS:-1}" --config "$@" || exit 2
}

# xl_banner STAGE CONFIG [overrides...]: where and what this job runs, at the top of its log.
xl_banner() {
  local stage="$1" config="$2"; shift 2
  echo "=== xlpipe $stage  $(date -Is)"
  echo "job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ array task $SLURM_ARRAY_TASK_ID/${SLURM_ARRAY_TASK_COUNT:-?}}" \
       "restart ${SLURM_RESTART_COUNT:-0}  name ${SLURM_JOB_NAME:-}  partition ${SLURM_JOB_PARTITION:-}"
  echo "nodes ${SLURM_JOB_NUM_NODES:-1} [${SLURM_JOB_NODELIST:-$(hostname)}]  tasks ${SLURM_NTASKS:-1}" \
       "(${SLURM_NTASKS_PER_NODE:-?}/node)  cpus/task ${SLURM_CPUS_PER_TASK:-?}  gpus/node ${SLURM_GPUS_ON_NODE:-0}"
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    local head; head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    echo "head node $head ($(getent hosts "$head" | awk '{print $1; exit}'))  batch host $(hostname)"
  fi
  if [[ -n "${MASTER_ADDR:-}${MASTER_PORT:-}" ]]; then
    echo "rendezvous from the environment: MASTER_ADDR=${MASTER_ADDR:-(first node)} MASTER_PORT=${MASTER_PORT:-(from job id)}"
  fi
  echo "repo $XL_ROOT  commit $(git -C "$XL_ROOT" rev-parse --short HEAD 2>/dev/null || echo n/a)"
  echo "python $XL_PYTHON ($("$XL_PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
  echo "config $config  overrides: ${*:-none}"
  sed 's/^/  | /' "$config"
  echo "==="
}

# One training task per GPU: warn when the header overrides disagree.
xl_check_tasks_per_gpu() {
  local gpus="${SLURM_GPUS_ON_NODE:-0}" tasks="${SLURM_NTASKS_PER_NODE:-}"
  if [[ "$gpus" != 0 && -n "$tasks" && "$tasks" != "$gpus" ]]; then
    echo "WARNING: $tasks tasks per node but $gpus GPUs per node; pass --ntasks-per-node=$gpus" \
         "together with --gpus-per-node=$gpus" >&2
  fi
}

# xl_srun_stage STAGE CONFIG [overrides...]: one task per GPU running `python -m pipeline.STAGE`.
xl_srun_stage() {
  local stage="$1"; shift
  xl_require_config "$stage" "$@"
  xl_banner "$stage" "$@"
  xl_check_tasks_per_gpu
  xl_preflight "$stage" "$@"
  # srun (22.05+) no longer inherits --cpus-per-task from the allocation: pass it on.
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$XL_PYTHON" -m "pipeline.$stage" --config "$@"
}
