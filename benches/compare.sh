#!/usr/bin/env bash
# Side-by-side benchmark of pipe and the PyTorch reference recipe on this machine.
#
#   benches/compare.sh [REPEATS]          (default 3; results under bench-results/<time>/;
#                                          about 16 minutes per repeat on the 2-core machine, and
#                                          11 more for the first one's 67,349-row inference)
#   benches/compare.sh --summary DIR N    (the table again from an earlier run's files)
#
# Needs models/all-MiniLM-L6-v2 (scripts/fetch-model.sh) and a Python with torch, transformers
# and datasets: $PYTHON, default .venv/bin/python (python3 -m venv .venv &&
# .venv/bin/pip install torch transformers datasets). The reference script is $REFERENCE, default
# ../shared/reference/hf_finetune.py. Each repeat runs pipe and the reference back to back, so
# both see the same machine state; the summary reports medians and pipe/PyTorch ratios. The
# headline compares with the reference's strongest CPU setting (`--padding dynamic
# --group-by-length`; and `--bf16` for the training step), not only the guide's padded recipe.
# Inference: `pipe predict` (its whole run: loading, tokenizing, predicting) against PyTorch's
# batched inference loop alone (benches/ref_predict.py: dynamic padding, inference_mode) on the
# 872 validation rows (every repeat) and on the 67,349 training rows (the first repeat only:
# PyTorch alone takes eight minutes for it). A BERT-base-sized model with random weights
# (scripts/make-bert-base.py) trains dense rows against the reference, with each side's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = --summary ]; then
  # Summarise an earlier run's files again: benches/compare.sh --summary bench-results/<time> N
  out=$2 repeats=$3
else
repeats=${1:-3}
reference=${REFERENCE:-../shared/reference/hf_finetune.py}
model=models/all-MiniLM-L6-v2
out=bench-results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
[ -f "$model/model.safetensors" ] || scripts/fetch-model.sh "$model"
base=models/bert-base-random
[ -f "$base/model.safetensors" ] || HF_HUB_OFFLINE=1 "$python" scripts/make-bert-base.py "$base" >/dev/null
cargo build --release --locked --quiet
cargo bench --locked --no-run --quiet 2>/dev/null
step_bench=$(ls -t target/release/deps/train_step-* | grep -v '\.d$' | head -1)
bench() { cargo bench --locked --quiet --bench "$@" 2>/dev/null | grep -v '^$'; }
ref=("$python" "$reference" --model-dir "$model" --threads 2 --validation data/sst2/validation.csv)
ref() { HF_HUB_OFFLINE=1 "${ref[@]}" "$@" >/dev/null 2>&1; }
timed() { /usr/bin/time -f '{"wall_s": %e, "max_rss_kib": %M}' -o "$1" "${@:2}"; }

for i in $(seq 1 "$repeats"); do
  echo "repeat $i/$repeats" >&2
  bench tokenize >"$out/pipe-tokenize-$i.json"
  bench train_step -- 128 32 >"$out/pipe-step128-$i.txt"
  ref --train data/sst2/train.csv --max-length 128 --batch-size 32 --max-steps 12 \
      --warmup-steps-for-timing 2 --no-eval --out-json "$out/ref-step128-$i.json"
  rm -rf "$out/store"
  timed "$out/pipe-recipe-time-$i.json" target/release/pipe run pipelines/quickstart.toml \
      --store "$out/store" --json >"$out/pipe-recipe-$i.json"
  for j in 1 2 3 4 5; do
    timed "$out/pipe-cached-$i-$j.json" target/release/pipe run pipelines/quickstart.toml --store "$out/store" --json >/dev/null
  done
  HF_HUB_OFFLINE=1 timed "$out/ref-recipe-time-$i.json" "${ref[@]}" --train data/sst2/train-4000.csv --max-length 64 --batch-size 32 \
      --epochs 1 --out-json "$out/ref-recipe-$i.json" >/dev/null 2>&1
  # PyTorch's strongest CPU setting: pad each batch to its longest row, batches of similar lengths.
  HF_HUB_OFFLINE=1 timed "$out/ref-strong-time-$i.json" "${ref[@]}" --train data/sst2/train-4000.csv --max-length 64 --batch-size 32 \
      --epochs 1 --padding dynamic --group-by-length --out-json "$out/ref-strong-$i.json" >/dev/null 2>&1
  rm -rf "$out/store-bucketed"
  timed "$out/pipe-bucketed-time-$i.json" target/release/pipe run pipelines/quickstart.toml --set train.length_bucketing=true \
      --store "$out/store-bucketed" --json >"$out/pipe-bucketed-$i.json"
  ref --train data/sst2/train.csv --max-length 128 --batch-size 32 --max-steps 12 --bf16 \
      --warmup-steps-for-timing 2 --no-eval --out-json "$out/ref-step128-bf16-$i.json"
  bench train_step -- 128 32 --dtype bf16 >"$out/pipe-step128-bf16-$i.txt"
  rm -rf "$out/store-bf16"
  timed "$out/pipe-bf16-time-$i.json" target/release/pipe run pipelines/quickstart.toml --set dtype=bf16 \
      --store "$out/store-bf16" --json >"$out/pipe-bf16-$i.json"
  run=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["run"])' "$out/pipe-recipe-$i.json")
  inputs=(validation)
  [ "$i" = 1 ] && inputs+=(train)
  for input in "${inputs[@]}"; do
    timed "$out/pipe-predict-$input-time-$i.json" target/release/pipe predict "$run" --store "$out/store" \
        --input "data/sst2/$input.csv" --output "$out/predictions-$input.csv" 2>/dev/null
    HF_HUB_OFFLINE=1 "$python" benches/ref_predict.py --model-dir "$model" --threads 2 \
        --input "data/sst2/$input.csv" 2>/dev/null >"$out/ref-predict-$input-$i.json"
  done
  # BERT-base size, dense rows, batch 16: speed and each side's peak RSS.
  timed "$out/pipe-base-time-$i.json" "$step_bench" 128 16 --model "$base" >"$out/pipe-base-$i.txt" 2>/dev/null
  HF_HUB_OFFLINE=1 "$python" "$reference" --model-dir "$base" --threads 2 --validation data/sst2/validation.csv \
      --train data/sst2/train.csv --max-length 128 --batch-size 16 --max-steps 12 --warmup-steps-for-timing 2 \
      --no-eval --out-json "$out/ref-base-$i.json" >/dev/null 2>&1
done

fi

"$python" - "$out" "$repeats" <<'PY'
import glob, json, re, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
med = statistics.median
load = lambda p: json.load(open(p))
pipe_tok = med(load(f"{out}/pipe-tokenize-{i}.json")["rows_per_s"] for i in range(1, n + 1))
ref_tok = med(load(f"{out}/ref-step128-{i}.json")["metrics"]["tokenize_train_rows_per_s"] for i in range(1, n + 1))
def step(i, dtype=""):
    text = open(f"{out}/pipe-step128{dtype}-{i}.txt").read()
    gflops = [float(x) for x in re.findall(r"([0-9.]+) GFLOP/s", text)]  # the machine's GEMM, then the dense step's
    gflops.append(float(re.search(r"([0-9.]+) with bf16 operands", text).group(1)))  # the bf16 GEMM
    return json.loads(text.split("RESULT ", 1)[1].splitlines()[0]), gflops
pipe_sps = med(step(i)[0]["sst2_samples_per_s"] for i in range(1, n + 1))
pipe_dense = med(step(i)[0]["dense_samples_per_s"] for i in range(1, n + 1))
gemm_rate = med(step(i)[1][0] for i in range(1, n + 1))
dense_rate = med(step(i)[1][1] for i in range(1, n + 1))
ref_sps = med(load(f"{out}/ref-step128-{i}.json")["metrics"]["train_samples_per_s_median_step"] for i in range(1, n + 1))
pipe_wall = med(load(f"{out}/pipe-recipe-time-{i}.json")["wall_s"] for i in range(1, n + 1))
ref_wall = med(load(f"{out}/ref-recipe-time-{i}.json")["wall_s"] for i in range(1, n + 1))
pipe_acc = med(load(f"{out}/pipe-recipe-{i}.json")["metrics"]["accuracy"] for i in range(1, n + 1))
ref_acc = med(load(f"{out}/ref-recipe-{i}.json")["metrics"]["validation_accuracy"] for i in range(1, n + 1))
pipe_rss = med(load(f"{out}/pipe-recipe-time-{i}.json")["max_rss_kib"] / 1024 for i in range(1, n + 1))
ref_rss = med(load(f"{out}/ref-recipe-{i}.json")["metrics"]["peak_rss_mib"] for i in range(1, n + 1))
cached = med(load(p)["wall_s"] for p in glob.glob(f"{out}/pipe-cached-*.json"))
import tomllib
record = tomllib.load(open(glob.glob(f"{out}/store/*.toml")[0], "rb"))
train_facts = next(s for s in record["stages"] if s["name"] == "train")["facts"]
ref_train_s = med(load(f"{out}/ref-recipe-{i}.json")["timings_s"]["train"] for i in range(1, n + 1))
ref_recipe_sps = med(load(f"{out}/ref-recipe-{i}.json")["metrics"]["train_samples_per_s_overall"] for i in range(1, n + 1))
strong_wall = med(load(f"{out}/ref-strong-time-{i}.json")["wall_s"] for i in range(1, n + 1))
strong_acc = med(load(f"{out}/ref-strong-{i}.json")["metrics"]["validation_accuracy"] for i in range(1, n + 1))
bucket_wall = med(load(f"{out}/pipe-bucketed-time-{i}.json")["wall_s"] for i in range(1, n + 1))
bucket_acc = med(load(f"{out}/pipe-bucketed-{i}.json")["metrics"]["accuracy"] for i in range(1, n + 1))
ref_bf16 = med(load(f"{out}/ref-step128-bf16-{i}.json")["metrics"]["train_samples_per_s_median_step"] for i in range(1, n + 1))
pipe_dense_bf16 = med(step(i, "-bf16")[0]["dense_samples_per_s"] for i in range(1, n + 1))
dense_rate_bf16 = med(step(i, "-bf16")[1][1] for i in range(1, n + 1))
gemm_rate_bf16 = med(step(i, "-bf16")[1][2] for i in range(1, n + 1))
bf16_wall = med(load(f"{out}/pipe-bf16-time-{i}.json")["wall_s"] for i in range(1, n + 1))
bf16_acc = med(load(f"{out}/pipe-bf16-{i}.json")["metrics"]["accuracy"] for i in range(1, n + 1))
def predict(name):
    rows = load(f"{out}/ref-predict-{name}-1.json")["rows"]
    repeats = [i for i in range(1, n + 1) if glob.glob(f"{out}/ref-predict-{name}-{i}.json")]
    pipe = med(rows / load(f"{out}/pipe-predict-{name}-time-{i}.json")["wall_s"] for i in repeats)
    ref = med(load(f"{out}/ref-predict-{name}-{i}.json")["rows_per_s"] for i in repeats)
    return rows, len(repeats), pipe, ref
predict_rows = [predict(name) for name in ("validation", "train")]
def base_step(i):
    return json.loads(open(f"{out}/pipe-base-{i}.txt").read().split("RESULT ", 1)[1].splitlines()[0])
base_pipe = med(base_step(i)["dense_samples_per_s"] for i in range(1, n + 1))
base_ref = med(load(f"{out}/ref-base-{i}.json")["metrics"]["train_samples_per_s_median_step"] for i in range(1, n + 1))
base_pipe_rss = med(load(f"{out}/pipe-base-time-{i}.json")["max_rss_kib"] / 1024 for i in range(1, n + 1))
base_ref_rss = med(load(f"{out}/ref-base-{i}.json")["metrics"]["peak_rss_mib"] for i in range(1, n + 1))
nan = float("nan")
rows = [
    ("**4,000-row recipe against PyTorch's strongest setting** (dynamic padding + group_by_length), wall s", pipe_wall, strong_wall, strong_wall / pipe_wall),
    ("same, pipe with `train.length_bucketing = true`, wall s", bucket_wall, strong_wall, strong_wall / bucket_wall),
    ("same, accuracy: pipe default / PyTorch strongest (difference)", pipe_acc, strong_acc, pipe_acc - strong_acc),
    ("same, accuracy: pipe length-bucketed / PyTorch strongest (difference)", bucket_acc, strong_acc, bucket_acc - strong_acc),
    ("**dense rows** (all 128 positions real), batch 32, f32 training samples/s (PyTorch: rows padded to 128, the same FLOPs)", pipe_dense, ref_sps, pipe_dense / ref_sps),
    ("same, pipe f32 / PyTorch bf16 autocast", pipe_dense, ref_bf16, pipe_dense / ref_bf16),
    ("pipe's dense step, GFLOP/s / the machine's f32 GEMM GFLOP/s on the FFN's shape", dense_rate, gemm_rate, dense_rate / gemm_rate),
    ("**bf16 dense step**, samples/s: pipe `dtype = \"bf16\"` / PyTorch bf16 autocast", pipe_dense_bf16, ref_bf16, pipe_dense_bf16 / ref_bf16),
    ("same, pipe bf16 / pipe f32 (last column: speed-up)", pipe_dense_bf16, pipe_dense, pipe_dense_bf16 / pipe_dense),
    ("pipe's bf16 dense step, GFLOP/s / the machine's bf16-operand GEMM GFLOP/s on the FFN's shape", dense_rate_bf16, gemm_rate_bf16, dense_rate_bf16 / gemm_rate_bf16),
    ("4,000-row recipe, pipe bf16 against PyTorch's strongest f32 setting, wall s", bf16_wall, strong_wall, strong_wall / bf16_wall),
    ("same, accuracy: pipe bf16 / pipe f32 (difference)", bf16_acc, pipe_acc, bf16_acc - pipe_acc),
    ("tokenization, rows/s (67,349 rows)", pipe_tok, ref_tok, pipe_tok / ref_tok),
    ("training on SST-2 rows padded to 128, batch 32, samples/s", pipe_sps, ref_sps, pipe_sps / ref_sps),
    ("4,000-row recipe against the guide's setting (pad to max_length), wall s", pipe_wall, ref_wall, ref_wall / pipe_wall),
    ("4,000-row recipe, training samples/s (pipe: padding to the batch's longest row)", train_facts["samples_per_second"], ref_recipe_sps, train_facts["samples_per_second"] / ref_recipe_sps),
    ("4,000-row recipe, training s (lower is better)", train_facts["seconds"], ref_train_s, ref_train_s / train_facts["seconds"]),
    ("4,000-row recipe, accuracy (last column: difference)", pipe_acc, ref_acc, pipe_acc - ref_acc),
    ("peak RSS during the recipe, MiB (lower is better)", pipe_rss, ref_rss, ref_rss / pipe_rss),
    ("fully cached pipe run, wall s", cached, nan, nan),
]
for rows_n, runs, pipe_rps, ref_rps in predict_rows:
    rows.append((f"**inference**, {rows_n:,} rows/s: `pipe predict` whole run / PyTorch's inference loop ({runs} repeat(s))", pipe_rps, ref_rps, pipe_rps / ref_rps))
rows.append(("**BERT-base size** (12 x 768), dense rows len 128, batch 16, f32 training samples/s", base_pipe, base_ref, base_pipe / base_ref))
rows.append(("same, peak RSS of the whole benchmark process, MiB (last column: pipe / PyTorch, lower is better)", base_pipe_rss, base_ref_rss, base_pipe_rss / base_ref_rss))
print(f"pipe training on the recipe: {train_facts['tokens_per_second']:.0f} real tokens/s (last repeat)")
print(f"medians of {n} side-by-side repeats ({out})\n")
print("| measure | pipe | PyTorch | pipe advantage |\n|---|---|---|---|")
for name, a, b, r in rows:
    print(f"| {name} | {a:.4g} | {b:.4g} | {r:.3g} |")
PY
