#!/bin/bash
# Export the last checkpoint: ZeRO shards → model.safetensors + config + tokenizer (CPU only):
#   sbatch cluster/export.sh configs/wt103_base.yaml [key=value ...]
#SBATCH --job-name=xlpipe-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=64G
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root="${XLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
[[ -f "$root/cluster/common.sh" ]] || { echo "no cluster/common.sh under '$root': submit from the xlpipe repo root or export XLPIPE_ROOT" >&2; exit 2; }
source "$root/cluster/common.sh"

xl_require_config export "$@"
xl_banner export "$@"
xl_preflight export "$@"
"$XL_PYTHON" -m pipeline.export --config "$@"
