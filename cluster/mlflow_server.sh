#!/bin/bash
# A lean MLflow tracking server (SQLite store, proxied artifacts) for the cluster or a workstation:
#   cluster/mlflow_server.sh [--host ADDR] [--port PORT] [--store DIR]      # in the foreground
#   sbatch cluster/mlflow_server.sh --store /shared/xlpipe-mlflow          # as a long-lived job
# then, on any node:  export MLFLOW_TRACKING_URI=http://HOST:PORT  (the line is printed below).
# Lean: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false and one worker (2 processes, ~0.5 GB, up in ~5 s,
# instead of 15 processes and ~3 GB). Artifacts are proxied, so nodes need no shared disk.
# Under SLURM it binds 0.0.0.0 and allows the node's names as Host headers (MLflow otherwise
# answers 403 to anything but localhost and private IPs); add more with MLFLOW_ALLOWED_HOSTS.
# Stop with Ctrl-C, scancel, or kill -TERM on the printed PID.
#SBATCH --job-name=xlpipe-mlflow
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=7-00:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
root="${XLPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}"
[[ -f "$root/cluster/common.sh" ]] || { echo "no cluster/common.sh under '$root': run from the xlpipe repo root or export XLPIPE_ROOT" >&2; exit 2; }
source "$root/cluster/common.sh"

host="" port=5000 store="$XL_ROOT/mlflow-store"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --store) store="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$XL_ROOT/cluster/mlflow_server.sh"; exit 0 ;;
    *) echo "unknown argument '$1' (use --host, --port, --store)" >&2; exit 2 ;;
  esac
done
if [[ -z "$host" ]]; then
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then host=0.0.0.0; else host=127.0.0.1; fi
fi
mkdir -p "$store/artifacts"
store="$(cd "$store" && pwd)"

name="$(hostname)"; fqdn="$(hostname -f 2>/dev/null || echo "$name")"
allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*,$name,$name:*,$fqdn,$fqdn:*,10.*,192.168.*"
for i in $(seq 16 31); do allowed+=",172.$i.*"; done
for ip in $(hostname -I 2>/dev/null || true); do allowed+=",$ip,$ip:*"; done
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && allowed+=",$MLFLOW_ALLOWED_HOSTS"

if [[ "$host" == 0.0.0.0 ]]; then url_host="$fqdn"; else url_host="$host"; fi
echo "=== xlpipe MLflow server  $(date -Is)  pid $$"
echo "store    sqlite:///$store/mlflow.db   artifacts $store/artifacts"
echo "listen   $host:$port"
echo "export MLFLOW_TRACKING_URI=http://$url_host:$port"
echo "==="
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# exec: this PID becomes the server's, so kill -TERM / scancel stop it and its worker cleanly.
exec "$XL_PYTHON" -m mlflow server \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers 1 \
  --allowed-hosts "$allowed"
