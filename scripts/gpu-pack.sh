#!/usr/bin/env bash
# Prepares .gpu/ for scripts/gpu-check.sh, here (a machine with cargo and network, no GPU needed):
# the `cuda` build of pipe, of the CUDA tests and of the throughput bench, stripped; the Python
# reference; MiniLM's config, tokenizer and weights, the weights cut in two parts (A, B) because
# one device call carries at most 64 MiB: send A with the binaries, B in the next call.
#
# Usage: scripts/gpu-pack.sh [REFERENCE_DIR]   (default ../shared/reference)
set -euo pipefail
reference=${1:-../shared/reference}
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
scripts/fetch-model.sh
cargo build --release --locked --features cuda
# The executable cargo built for target NAME, from its JSON messages on stdin.
executable() {
  python3 -c 'import json, sys
print([m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("executable") and m["target"]["name"] == sys.argv[1]][-1])' "$1"
}
bench=$(cargo bench --locked --features cuda --bench train_step --no-run --message-format=json | executable train_step)
tests=$(cargo test --release --locked --features cuda --test cuda --no-run --message-format=json | executable cuda)
# Two loads, each within one call's 64 MiB beside the tracked files: .gpu/a (tests, bench, the
# reference, part A of the weights) for `gpu-check.sh checks`, .gpu/b (pipe, part B) for `recipe`.
# The binaries are xz-compressed (candle's CUDA kernels make them ~50 MB each, ~8 MB packed).
rm -rf .gpu
mkdir -p .gpu/a/model .gpu/b
pack() { strip -o ".gpu/$2/$(basename "$1").tmp" "$1" && xz -T0 -9 -c ".gpu/$2/$(basename "$1").tmp" >".gpu/$2/$3.xz" && rm ".gpu/$2/$(basename "$1").tmp"; }
pack "$tests" a cuda-tests
pack "$bench" a train_step
pack target/release/pipe b pipe
cp "$reference/hf_finetune.py" .gpu/a/
model=models/all-MiniLM-L6-v2
cp "$model/config.json" "$model/tokenizer.json" "$model/vocab.txt" .gpu/a/model/
(cd "$model" && sha256sum model.safetensors) >.gpu/a/model/SHA256
pwd >.gpu/a/BUILT_IN
# Part A fills load A up to 63 MiB with the tracked files; part B is the rest.
limit=$((63 * 1024 * 1024))
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
size=$(stat -c %s "$model/model.safetensors")
first=$((limit - tracked - $(du -cb .gpu/a | tail -1 | cut -f1)))
head -c "$first" "$model/model.safetensors" >.gpu/a/model/part-a
tail -c +"$((first + 1))" "$model/model.safetensors" >.gpu/b/part-b
for load in a b; do
  total=$((tracked + $(du -cb .gpu/$load | tail -1 | cut -f1)))
  echo "load $load: $((total / 1024 / 1024)) MiB with the tracked files"
  [ "$total" -le $((64 * 1024 * 1024)) ] || { echo "error: load $load is over 64 MiB" >&2; exit 1; }
done
