#!/usr/bin/env bash
# Side-by-side benchmark of the remote store: pushing and pulling the quick start's stage outputs
# (tokens, the trained MiniLM, the evaluation: ~90 MB) with `pipe push` / `pipe pull`, against
# `aws s3 cp --recursive` of the same files to and from the same S3 server, in the same session,
# and against boto3's managed transfers timed inside Python (benches/ref_s3.py: no interpreter
# start-up counted, the strictest reference; $PYTHON must import boto3).
#
#   benches/remote.sh [REPEATS]     (default 5; results under bench-results/remote-<time>/)
#
# Uses the S3 server of the environment (AWS_ENDPOINT_URL, AWS credentials, TEST_S3_BUCKET) or
# starts one on the loopback address (scripts/s3-server.sh) and stops it afterwards. Needs the AWS
# CLI (`pip install awscli`) and the quick start's run in runs/ (run scripts/quickstart.sh first;
# this script runs pipelines/quickstart.toml, which is cached once done). Every repeat uses fresh
# prefixes and a fresh local store, so nothing is skipped as present; pipe's pull includes
# re-hashing every file and committing the stages (with fsync), the AWS CLI's does neither.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-5}
python=${PYTHON:-python3}
"$python" -c 'import boto3' || { echo "error: $python cannot import boto3 (pip install boto3; or set PYTHON)" >&2; exit 2; }
out=bench-results/remote-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
command -v aws >/dev/null || { echo "error: the AWS CLI is needed (pip install awscli)" >&2; exit 2; }
if [ -z "${AWS_ENDPOINT_URL:-}" ] || [ -z "${TEST_S3_BUCKET:-}" ]; then
  server=$(mktemp -d)
  trap 'scripts/s3-server.sh stop "$server"; rm -rf "$server"' EXIT
  eval "$(scripts/s3-server.sh start "$server")"
fi
cargo build --release --locked --quiet
pipe=target/release/pipe
run=$($pipe run pipelines/quickstart.toml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"])')
# The run's three stage directories, side by side, for the AWS CLI (it follows symbolic links).
files=$out/files
mkdir -p "$files"
for kind in tokenize train evaluate; do
  key=$(python3 - "$run" "$kind" <<'PY'
import sys, tomllib
record = tomllib.load(open(f"runs/{sys.argv[1]}.toml", "rb"))
print(next(s["key"] for s in record["stages"] if s["name"] == sys.argv[2]))
PY
)
  ln -s "$PWD/runs/stages/$kind/$key" "$files/$kind"
done
bytes=$(du -sLb "$files" | cut -f1)
echo "run $run: $((bytes / 1000000)) MB in $(find -L "$files" -type f | wc -l) files; $repeats repeats" | tee "$out/summary.txt"
seconds() { local start end; start=$(date +%s.%N); "$@" >/dev/null 2>>"$out/stderr.log"; end=$(date +%s.%N); echo "$end - $start" | bc; }
bucket=s3://$TEST_S3_BUCKET/bench-$(date +%s)
for r in $(seq 1 "$repeats"); do
  push_pipe=$(seconds $pipe push "$run" --remote "$bucket/$r/pipe")
  push_aws=$(seconds aws s3 cp --recursive --quiet "$files" "$bucket/$r/aws")
  rm -rf "$out/store" "$out/aws"
  pull_pipe=$(seconds $pipe pull "$run" --store "$out/store" --remote "$bucket/$r/pipe")
  pull_aws=$(seconds aws s3 cp --recursive --quiet "$bucket/$r/aws" "$out/aws")
  rm -rf "$out/boto3"
  push_boto3=$("$python" benches/ref_s3.py push "$files" "$bucket/$r/boto3")
  pull_boto3=$("$python" benches/ref_s3.py pull "$bucket/$r/boto3" "$out/boto3")
  echo "$r $push_pipe $push_aws $pull_pipe $pull_aws $push_boto3 $pull_boto3" | tee -a "$out/times.txt"
done
python3 - "$out/times.txt" <<'PY' | tee -a "$out/summary.txt"
import statistics, sys
rows = [list(map(float, line.split()[1:])) for line in open(sys.argv[1])]
med = [statistics.median(col) for col in zip(*rows)]
print(f"push: pipe {med[0]:.3f} s, aws s3 cp {med[1]:.3f} s (pipe/aws {med[0] / med[1]:.2f}), "
      f"boto3 in-process {med[4]:.3f} s (pipe/boto3 {med[0] / med[4]:.2f})")
print(f"pull: pipe {med[2]:.3f} s, aws s3 cp {med[3]:.3f} s (pipe/aws {med[2] / med[3]:.2f}), "
      f"boto3 in-process {med[5]:.3f} s (pipe/boto3 {med[2] / med[5]:.2f})")
PY
