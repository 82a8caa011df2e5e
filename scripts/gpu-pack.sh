#!/usr/bin/env bash
# Prepares .gpu/ for scripts/gpu-check.sh, here (a machine with cargo and network, no GPU needed):
# the `cuda` build of pipe, of the CUDA tests and of the throughput bench, stripped; the Python
# reference; MiniLM's config, tokenizer and weights, the weights cut in parts because one device
# call carries at most 64 MiB: send .gpu/a with the checks, then .gpu/b, .gpu/c, ... in the next
# calls (the load list is printed at the end).
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
# Loads of at most 64 MiB each beside the tracked files, as one device call carries:
# .gpu/a (tests, bench, the reference, MiniLM's config and tokenizer, the first part of its
# weights) for `gpu-check.sh checks`; .gpu/b, .gpu/c, ... (pipe, the rest of the weights) for
# `recipe`, sent one call after another while the machine stays warm.
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
# The weights, cut into parts `weights-N` that fill each load up to 63 MiB with the tracked files.
limit=$((63 * 1024 * 1024))
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
size=$(stat -c %s "$model/model.safetensors")
load_size() { du -cb ".gpu/$1" | tail -1 | cut -f1; }
offset=0 part=1
for load in a b c d e; do
  [ "$offset" -lt "$size" ] || break
  mkdir -p ".gpu/$load"
  room=$((limit - tracked - $(load_size "$load")))
  [ "$room" -gt 0 ] || continue
  dd if="$model/model.safetensors" of=".gpu/$load/weights-$part" iflag=skip_bytes,count_bytes \
    skip="$offset" count="$room" status=none
  offset=$((offset + room)) part=$((part + 1))
done
[ "$offset" -ge "$size" ] || { echo "error: the weights do not fit in five loads" >&2; exit 1; }
for load in .gpu/*/; do
  load=$(basename "$load")
  total=$((tracked + $(load_size "$load")))
  echo "load $load: $((total / 1024 / 1024)) MiB with the tracked files"
  [ "$total" -le $((64 * 1024 * 1024)) ] || { echo "error: load $load is over 64 MiB" >&2; exit 1; }
done
