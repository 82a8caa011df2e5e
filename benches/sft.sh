#!/usr/bin/env bash
# Side-by-side benchmark of a causal LM's supervised fine-tuning: pipe's train stage against
# PyTorch (benches/ref_sft.py) on SmolLM2-135M-Instruct (f32, 2 threads), the SST-2
# prompt/completion pipeline (pipelines/smollm2-sst2.toml), the same token ids and lengths.
#
#   benches/sft.sh [REPEATS]        (default 3; STEPS optimizer steps each, default 20 of 16 rows;
#                                    results under bench-results/sft-<time>/; ~5 minutes a repeat)
#
# Needs models/smollm2 (scripts/fetch-smollm2.sh) and a Python with torch, transformers, gguf and
# accelerate: $PYTHON, default .venv/bin/python. Each repeat runs pipe (a fresh store, the first
# STEPS steps of the pipeline, no evaluation) and then the reference twice: dynamic padding, and
# dynamic padding with batches grouped by length (its strongest CPU setting). The figure is
# training tokens per second (real tokens, padding excluded) over every step from the first (model
# loading excluded on both sides: pipe's is the train stage's `tokens_per_second`, which leaves
# out loading and evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
repeats=${1:-3}
steps=${STEPS:-20}
gguf=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || scripts/fetch-smollm2.sh
out=bench-results/sft-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
cargo build --release --locked --quiet
# The evaluate stage is not measured: a 16-row validation file keeps it short.
"$python" -c 'import csv,sys; rows=list(csv.reader(open(sys.argv[1], newline=""))); csv.writer(open(sys.argv[2], "w", newline="")).writerows(rows[:17])' \
  data/sst2-sft/validation.csv "$out/validation-16.csv"
for r in $(seq 1 "$repeats"); do
  store=$out/store
  rm -rf "$store"
  RAYON_NUM_THREADS=2 target/release/pipe run pipelines/smollm2-sst2.toml --store "$store" \
    --set train.max_steps="$steps" --set train.eval_every_epoch=false --set dataset.validation="$out/validation-16.csv" \
    --set evaluate.baseline=false --json > "$out/pipe-$r.json"
  train=$(ls -d "$store"/stages/train/*/)
  "$python" -c 'import json,sys; f=json.load(open(sys.argv[1]))["facts"]; print(json.dumps({"tokens_per_second": f["tokens_per_second"], "rows_per_second": f["samples_per_second"], "final_loss": f.get("final_loss")}))' \
    "$train/MANIFEST.json" > "$out/pipe-$r.tps"
  tokens=$(ls "$store"/stages/tokenize/*/tokens.safetensors)
  "$python" benches/ref_sft.py --gguf "$gguf" --tokens "$tokens" --steps "$steps" --threads 2 > "$out/ref-$r.json" 2>/dev/null
  "$python" benches/ref_sft.py --gguf "$gguf" --tokens "$tokens" --steps "$steps" --threads 2 --group-by-length > "$out/ref-gbl-$r.json" 2>/dev/null
  echo "repeat $r: pipe $(cat "$out/pipe-$r.tps")"
  echo "          torch $(cat "$out/ref-$r.json")"
  echo "          torch, grouped by length $(cat "$out/ref-gbl-$r.json")"
done
"$python" - "$out" "$repeats" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
med = lambda name: statistics.median(json.load(open(f"{out}/{name}-{i}.{'tps' if name == 'pipe' else 'json'}"))["tokens_per_second"] for i in range(1, n + 1))
pipe, ref, gbl = med("pipe"), med("ref"), med("ref-gbl")
print(f"training tokens/s, medians of {n}: pipe {pipe:.0f}; PyTorch dynamic padding {ref:.0f} (pipe {pipe / ref:.2f}x); "
      f"PyTorch grouped by length {gbl:.0f} (pipe {pipe / gbl:.2f}x)")
PY
