#!/bin/bash
# A lean MLflow tracking server (SQLite store, proxied artifacts) for the cluster or a workstation:
#   cluster/mlflow_server.sh [--host ADDR] [--port PORT] [--store DIR] [--auth FILE]   # foreground
#   sbatch cluster/mlflow_server.sh --store /shared/xlpipe-mlflow                     # a long-lived job
# By default it listens on 127.0.0.1 only: trainers on the same node log to
# MLFLOW_TRACKING_URI=http://127.0.0.1:PORT, and you reach the UI through an ssh tunnel from your
# laptop (the banner prints the line for this node and port):
#   ssh -N -L 5000:127.0.0.1:PORT NODE                  # NODE: where this runs (-J LOGIN-NODE to hop)
#   ssh -N -L 5000:NODE:PORT LOGIN-NODE                 # when it listens beyond loopback (--host)
# then open http://localhost:5000/#/experiments?workflowType=machine_learning (MLflow 3.17 opens
# experiments as GenAI apps otherwise; "Model training" in the sidebar switches and is remembered).
# Any other address (e.g. --host 0.0.0.0 for the nodes of a job) needs --auth FILE: MLflow's
# basic-auth app, whose admin is the "username:password" on FILE's first line (a file only you
# can read: chmod 600). Clients then pass MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD.
# Lean: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false and one worker (2 processes, ~0.5 GB, up in ~5 s,
# instead of 15 processes and ~3 GB). Artifacts are proxied, so nodes need no shared disk. Host
# headers allowed: localhost, plus the node's names and addresses when it listens beyond loopback
# (add more with MLFLOW_ALLOWED_HOSTS). The store (default mlflow-store/ in the repo) is created if
# its parent exists; a store that cannot be written or a port in use stops it before MLflow starts.
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

host=127.0.0.1 port=5000 store="$XL_ROOT/mlflow-store" auth=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --store) store="$2"; shift 2 ;;
    --auth) auth="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "$XL_ROOT/cluster/mlflow_server.sh"; exit 0 ;;
    *) echo "unknown argument '$1' (use --host, --port, --store, --auth)" >&2; exit 2 ;;
  esac
done
case "$host" in
  127.*|localhost|::1) loopback=1 ;;
  *) loopback=0 ;;
esac
if [[ "$loopback" == 0 && -z "$auth" ]]; then
  echo "refusing to listen on $host without authentication: anyone who reaches this node could read, edit" \
       "and delete every run. Pass --auth FILE (first line username:password, chmod 600), or keep the" \
       "default 127.0.0.1 and use an ssh tunnel: ssh -N -L $port:127.0.0.1:$port $(hostname)" >&2
  exit 2
fi
app=()
if [[ -n "$auth" ]]; then
  [[ -f "$auth" ]] || { echo "--auth $auth: no such file" >&2; exit 2; }
  if [[ "$(stat -c %u "$auth")" != "$(id -u)" || $(( 8#$(stat -c %a "$auth") & 8#077 )) != 0 ]]; then
    echo "--auth $auth: the credentials file must be yours and readable by you only (chmod 600 $auth)" >&2
    exit 2
  fi
  IFS= read -r line < "$auth" || true
  user="${line%%:*}" pass="${line#*:}"
  if [[ "$line" != *:* || -z "$user" || -z "$pass" ]]; then
    echo "--auth $auth: the first line must be username:password" >&2
    exit 2
  fi
  if (( ${#pass} < 12 )); then        # MLflow's own rule for the admin password
    echo "--auth $auth: the password must have at least 12 characters" >&2
    exit 2
  fi
fi
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || { echo "--port $port: not a port number (1-65535)" >&2; exit 2; }
# Checked here: a port in use would only show as a uvicorn traceback after MLflow's slow start.
if ! err="$("$XL_PYTHON" - "$host" "$port" 2>&1 <<'PY'
import socket, sys
try:
    family, kind, proto, _, addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        s.bind(addr)
except OSError as exc:
    sys.exit(exc.strerror or str(exc))
PY
)"; then
  hint="pick another --host"
  [[ "$err" == *"in use"* ]] && hint="another MLflow server? 'ss -ltnp sport = :$port' shows which process; stop it or pick another --port"
  echo "cannot listen on $host:$port: $err ($hint)" >&2
  exit 2
fi
# The store: created if only its last part is missing (a typo'd parent is an error, not a new
# tree); it must take the database, its journal and the artifacts.
if [[ ! -e "$store" ]]; then
  parent="$(dirname "$store")"
  [[ -d "$parent" ]] || { echo "--store $store: its parent directory $parent does not exist (create it, or pick another --store)" >&2; exit 2; }
  mkdir "$store" 2>/dev/null || { echo "--store $store: cannot create it in $parent (no write permission there?); pick another --store" >&2; exit 2; }
fi
[[ -d "$store" ]] || { echo "--store $store: exists but is not a directory" >&2; exit 2; }
probe="$store/.xlpipe-write-test.$$"
if ! ( : > "$probe" ) 2>/dev/null || ! mkdir -p "$store/artifacts" 2>/dev/null \
   || [[ -e "$store/mlflow.db" && ! -w "$store/mlflow.db" ]]; then
  rm -f "$probe"
  echo "--store $store: not writable by $(id -un) (the server writes mlflow.db and artifacts/ there); fix its permissions or pick another --store" >&2
  exit 2
fi
rm -f "$probe"
store="$(cd "$store" && pwd)"
if [[ -n "$auth" ]]; then
  # MLflow's basic-auth app reads its admin from this file (configparser: '%' doubled); the users
  # live in basic_auth.db beside the runs. Written 0600: it holds the password.
  ini="$store/basic_auth.ini"
  ( umask 077; {
      echo "[mlflow]"
      echo "default_permission = READ"
      echo "database_uri = sqlite:///$store/basic_auth.db"
      echo "admin_username = ${user//%/%%}"
      echo "admin_password = ${pass//%/%%}"
      echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
    } > "$ini" )
  export MLFLOW_AUTH_CONFIG_PATH="$ini"
  # The app's CSRF key: yours if exported, else one made once for this store (kept 0600 beside it,
  # so a restarted server accepts the sessions and forms of the last one).
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    key="$store/flask_secret_key"
    [[ -s "$key" ]] || ( umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$key" )
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  app=(--app-name basic-auth)
fi

name="$(hostname)"; fqdn="$(hostname -f 2>/dev/null || echo "$name")"
allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
if [[ "$loopback" == 0 ]]; then      # the node's own names and addresses, nothing wider
  allowed+=",$name,$name:*,$fqdn,$fqdn:*"
  for ip in $(hostname -I 2>/dev/null || true); do allowed+=",$ip,$ip:*"; done
fi
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && allowed+=",$MLFLOW_ALLOWED_HOSTS"

if [[ "$host" == 0.0.0.0 ]]; then url_host="$fqdn"; else url_host="$host"; fi
if [[ "$loopback" == 1 ]]; then tunnel="ssh -N -L 5000:127.0.0.1:$port $fqdn"
else tunnel="ssh -N -L 5000:$url_host:$port <login-node>"; fi
echo "=== xlpipe MLflow server  $(date -Is)  pid $$"
echo "store    sqlite:///$store/mlflow.db   artifacts $store/artifacts"
echo "listen   $host:$port"
echo "UI       from your laptop: $tunnel   then http://localhost:5000/#/experiments?workflowType=machine_learning"
echo "export MLFLOW_TRACKING_URI=http://$url_host:$port"
if [[ -n "$auth" ]]; then
  echo "export MLFLOW_TRACKING_USERNAME=$user MLFLOW_TRACKING_PASSWORD=\"\$(cut -d: -f2- $auth | head -1)\""
fi
echo "==="
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# exec: this PID becomes the server's, so kill -TERM / scancel stop it and its worker cleanly.
exec "$XL_PYTHON" -m mlflow server \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers 1 \
  --allowed-hosts "$allowed" "${app[@]}"
