#!/usr/bin/env bash
# A real MLflow tracking server on the loopback address, for the tracking tests: `mlflow server`
# from PyPI in a venv that also holds `tensorboard` and `pyarrow` (the tests read pipe's event
# files and write Parquet with them), a fresh SQLite backend and artifact directory, a free port.
# Usage:
#   eval "$(scripts/mlflow-server.sh start DIR)"   # starts it; prints the variables to export
#   scripts/mlflow-server.sh stop DIR              # stops it by its PID
# The server requires HTTP basic authentication (`--app-name basic-auth`, an admin with a fresh
# random password), as shared servers do. The exported variables: TEST_MLFLOW_URI (not
# MLFLOW_TRACKING_URI, which would make every test's pipe log to it), MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD (read by pipe and by MLflow's client alike), TEST_MLFLOW_PID and
# TEST_PYTHON (the venv's interpreter).
set -euo pipefail
action=${1:?usage: mlflow-server.sh start|stop DIR}
dir=${2:?usage: mlflow-server.sh start|stop DIR}
# shellcheck source=scripts/service.sh
source "$(dirname "$0")/service.sh"
case "$action" in
  stop)
    # The server's workers are in the process group it leads (it starts with setsid).
    stop_pid_file "$dir/pid"
    exit 0
    ;;
  start) ;;
  *) echo "usage: mlflow-server.sh start|stop DIR" >&2; exit 2 ;;
esac
mkdir -p "$dir"
python=$(command -v python3 || command -v python)
if [ ! -x "$dir/venv/bin/mlflow" ] || ! "$dir/venv/bin/python" -c "import tensorboard, pyarrow, flask_wtf" 2>/dev/null; then
  "$python" -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet 'mlflow[auth]' tensorboard pyarrow >&2
fi
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$dir/data" && mkdir -p "$dir/data/artifacts"
password=$("$python" -c 'import secrets; print(secrets.token_hex(12))')
cat >"$dir/data/auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$dir/data/auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Checking a password costs a PBKDF2 hash per request: cache a checked one.
auth_cache_ttl_seconds = 600
INI
# Its own session (setsid), so that stop reaches the workers it forks through the group. No job
# runner (its background consumers): pipe only logs.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_AUTH_CONFIG_PATH="$dir/data/auth.ini" \
  MLFLOW_AUTH_ADMIN_PASSWORD="$password" MLFLOW_FLASK_SERVER_SECRET_KEY="$password" \
  setsid "$dir/venv/bin/mlflow" server --app-name basic-auth --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$dir/data/mlflow.db" \
  --artifacts-destination "$dir/data/artifacts" >"$dir/server.log" 2>&1 &
echo $! >"$dir/pid"
uri="http://127.0.0.1:$port"
for _ in $(seq 600); do
  # Up when the REST API answers.
  code=$(curl -s -o /dev/null -w '%{http_code}' -u "admin:$password" \
    "$uri/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default" || true)
  [ "$code" = 200 ] && break
  kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/server.log" >&2; echo "error: the MLflow server exited" >&2; exit 1; }
  sleep 0.1
done
[ "$code" = 200 ] || { tail -20 "$dir/server.log" >&2; echo "error: the MLflow server did not answer at $uri" >&2; exit 1; }
cat <<VARS
export TEST_MLFLOW_URI=$uri
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD=$password
export TEST_MLFLOW_PID=$(cat "$dir/pid")
export TEST_PYTHON=$dir/venv/bin/python
VARS
