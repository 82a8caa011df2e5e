#!/usr/bin/env bash
# The GPU checks in one go, on a GPU machine that has only this working tree and what
# scripts/gpu-pack.sh put in .gpu/ (the `cuda` build's binaries, the reference script, MiniLM's
# weights in parts, in loads .gpu/a, .gpu/b, ...): no Rust toolchain, no network. Python with torch and transformers must be
# there (the reference's own requirements).
#
# Usage: scripts/gpu-check.sh [checks|recipe|all] [OUT]     (OUT defaults to $OUT, else gpu-check)
#   checks  the CUDA parity tests (tests/cuda.rs), and training throughput at len 128, batch 32,
#           f32 and bf16, of pipe and of ../shared/reference/hf_finetune.py (PyTorch eager, autocast
#           for bf16) side by side, on a model of MiniLM's shape (speed does not depend on weights)
#   recipe  the 4k recipe (pipelines/quickstart.toml) on the GPU: f32 twice, in two stores, compared
#           bit for bit, and bf16; plus the MiniLM parity test. Needs every load (the weights are
#           larger than one call may carry: send .gpu/a with `checks`, then .gpu/b, .gpu/c, ... at
#           once, one call each, while the machine is still warm)
# Each step's outcome goes to OUT/summary.json and OUT/summary.md; a failed step does not stop
# the others. Exit status: 0 when every step that ran passed.
set -uo pipefail
phase=${1:-all}
out=${2:-${OUT:-gpu-check}}
root=$(pwd)
pack=$root/.gpu
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary=$out/summary.jsonl
failed=0
log() { echo "[$(date +%T)] $*" | tee -a "$out/log.txt"; }
# record NAME STATUS JSON: one line of the summary.
record() { printf '{"step":"%s","status":"%s","result":%s}\n' "$1" "$2" "${3:-null}" >>"$summary"; [ "$2" = pass ] || failed=1; }

# The binaries, unpacked once.
mkdir -p "$pack/bin"
for f in "$pack"/*/*.xz; do
  [ -e "$f" ] || continue
  bin=$pack/bin/$(basename "$f" .xz)
  [ -x "$bin" ] || { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$bin" && chmod +x "$bin"; }
done
# The test and bench binaries look for fixtures and data under the directory they were built in.
built_in=$(cat "$pack/a/BUILT_IN")
if [ "$built_in" != "$root" ] && [ ! -e "$built_in" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -s "$root" "$built_in"
fi
# The CUDA 13 runtime, cuBLAS and cuRAND the binaries link (PyTorch's wheels or a toolkit have
# them), and the driver's libcuda.
libs=$(find /usr/local/nvidia /opt /usr/local /usr/lib \( -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \
  -o -name 'libcurand.so.10' -o -name 'libcudart.so.13' -o -name 'libcuda.so.1' \) -not -path '*stubs*' 2>/dev/null |
  xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "libraries from: $libs"
ldd "$pack"/bin/* 2>&1 | grep 'not found' | sort -u | tee -a "$out/log.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$out/log.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}

run_checks() {
  log "CUDA parity tests"
  if PIPE_REQUIRE_GPU=1 "$pack/bin/cuda-tests" --test-threads=1 --nocapture --skip minilm >"$out/cuda-tests.txt" 2>&1; then
    record cuda-tests pass "$(grep -E '^cuda ' "$out/cuda-tests.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().splitlines()))')"
  else
    record cuda-tests fail "$(tail -30 "$out/cuda-tests.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
  fi
  tail -5 "$out/cuda-tests.txt"

  # A model of MiniLM's shape with seeded random weights, for both tools' throughput.
  shape=$pack/shape-model
  python3 - "$pack/a/model/config.json" "$shape" <<'EOF' >>"$out/log.txt" 2>&1
import shutil, sys, torch, transformers
config = transformers.BertConfig.from_json_file(sys.argv[1])
torch.manual_seed(0)
transformers.BertModel(config).save_pretrained(sys.argv[2])
for f in ("tokenizer.json", "vocab.txt"):
    shutil.copy(f"{sys.argv[1].rsplit('/', 1)[0]}/{f}", sys.argv[2])
EOF
  # Interleaved repeats (GPU_CHECK_REPEATS, default 3): the summary reports medians, and the
  # machine's drift between repeats hits both tools alike.
  local rep
  for rep in $(seq 1 "${GPU_CHECK_REPEATS:-3}"); do
    for dtype in f32 bf16; do
      local ops=; [ "$rep" = 1 ] && ops=--ops
      log "pipe throughput, $dtype, repeat $rep"
      local txt=$out/pipe-$dtype-$rep.txt
      if "$pack/bin/train_step" 128 32 40 --device cuda --dtype $dtype --model "$shape" $ops >"$txt" 2>&1; then
        record "pipe-throughput-$dtype" pass "$(grep '^RESULT ' "$txt" | cut -d' ' -f2-)"
      else
        record "pipe-throughput-$dtype" fail "$(tail -20 "$txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
      fi
      tail -3 "$txt"
      log "reference throughput, $dtype, repeat $rep"
      local flag=; [ $dtype = bf16 ] && flag=--bf16
      local json=$out/reference-$dtype-$rep.json
      if python3 "$pack/a/hf_finetune.py" --model-dir "$shape" --train data/sst2/train-4000.csv \
        --validation data/sst2/validation.csv --max-steps 50 --warmup-steps-for-timing 10 --no-eval \
        --device cuda $flag --no-datasets --padding max_length --max-length 128 --batch-size 32 \
        --out-json "$json" >"$out/reference-$dtype-$rep.txt" 2>&1; then
        record "reference-throughput-$dtype" pass "$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["metrics"]))' "$json")"
      else
        record "reference-throughput-$dtype" fail "$(tail -20 "$out/reference-$dtype-$rep.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
      fi
    done
  done
}

run_recipe() {
  local model=models/all-MiniLM-L6-v2
  mkdir -p "$model"
  cp "$pack/a/model/config.json" "$pack/a/model/tokenizer.json" "$pack/a/model/vocab.txt" "$model/"
  local parts=() n
  # The parts in order; a missing load shows as a checksum mismatch.
  shopt -s nullglob
  for n in 1 2 3 4 5; do parts+=("$pack"/*/weights-$n); done
  shopt -u nullglob
  if ! cat "${parts[@]}" >"$model/model.safetensors" 2>/dev/null ||
    ! (cd "$model" && sha256sum -c "$pack/a/model/SHA256" >/dev/null 2>&1) || [ ! -x "$pack/bin/pipe" ]; then
    rm -f "$model/model.safetensors"
    record recipe missing-load "\"every load .gpu/a, .gpu/b, ... must be there: $(ls "$pack"/* 2>&1 | paste -sd' ')\""
    return
  fi
  log "CUDA MiniLM parity test"
  if PIPE_REQUIRE_GPU=1 "$pack/bin/cuda-tests" --test-threads=1 --nocapture minilm >"$out/cuda-minilm.txt" 2>&1; then
    record cuda-minilm pass "$(grep -E '^cuda ' "$out/cuda-minilm.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
  else
    record cuda-minilm fail "$(tail -20 "$out/cuda-minilm.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
  fi
  for run in f32-a f32-b bf16; do
    log "4k recipe on the GPU: $run"
    local dtype=${run%%-*}
    local start=$(date +%s.%N)
    "$pack/bin/pipe" run pipelines/quickstart.toml --set device=cuda --set dtype=$dtype \
      --store "$out/store-$run" --json >"$out/recipe-$run.json" 2>"$out/recipe-$run.err"
    local status=$?
    local seconds=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    if [ $status -eq 0 ]; then
      record "recipe-$run" pass "$(python3 - "$out/recipe-$run.json" "$out/store-$run" "$seconds" <<'EOF'
import glob, json, sys
doc = json.load(open(sys.argv[1]))
record = glob.glob(f"{sys.argv[2]}/*.toml")[0]
import tomllib
rec = tomllib.load(open(record, "rb"))
train = [s for s in rec["stages"] if s["name"] == "train"][0]
print(json.dumps({"run": doc["run"], "metrics": doc["metrics"], "train_digest": train["digest"],
                  "train_key": train["key"], "train_seconds": train["facts"].get("seconds"),
                  "gpu": rec["environment"].get("gpu"), "wall_s": float(sys.argv[3])}))
EOF
)"
    else
      record "recipe-$run" fail "$(tail -20 "$out/recipe-$run.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
    fi
  done
  # The acceptance: the f32 reruns bit-identical, accuracy >= 0.80 in f32 and bf16.
  local verdict
  verdict=$(python3 - "$summary" <<'EOF'
import json, sys
by = {}
for line in open(sys.argv[1]):
    s = json.loads(line)
    by[s["step"]] = s["result"] if s["status"] == "pass" else None
a, b, h = by.get("recipe-f32-a"), by.get("recipe-f32-b"), by.get("recipe-bf16")
ok = bool(a and b and h) and a["train_digest"] == b["train_digest"] and \
    a["metrics"]["accuracy"] >= 0.80 and h["metrics"]["accuracy"] >= 0.80
print(json.dumps({"pass": ok, "f32_reruns_identical": bool(a and b and a["train_digest"] == b["train_digest"]),
                  "accuracy_f32": a and a["metrics"]["accuracy"], "accuracy_bf16": h and h["metrics"]["accuracy"]}))
EOF
)
  case $verdict in *'"pass": true'*) record recipe-acceptance pass "$verdict" ;; *) record recipe-acceptance fail "$verdict" ;; esac
}

case $phase in
  checks) run_checks ;;
  recipe) run_recipe ;;
  all) run_checks; run_recipe ;;
  *) echo "usage: scripts/gpu-check.sh [checks|recipe|all] [OUT]" >&2; exit 2 ;;
esac

# One JSON document and a markdown table of everything recorded so far (both phases, if the
# machine stayed the same between calls).
python3 - "$summary" "$out" "$gpu" <<'EOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
json.dump({"gpu": sys.argv[3], "steps": steps}, open(f"{sys.argv[2]}/summary.json", "w"), indent=1)
by = {s["step"]: s for s in steps}
lines = [f"# GPU check on {sys.argv[3]}", "", "| step | status |", "| --- | --- |"]
lines += [f"| {s['step']} | {s['status']} |" for s in steps]
def rates(step, key):
    return sorted(s["result"][key] for s in steps
                  if s["step"] == step and s["status"] == "pass" and isinstance(s["result"], dict))
def median(v):
    return v[len(v) // 2] if v else None
lines += ["", "| samples/s, len 128, batch 32 (median of repeats; all) | f32 | bf16 |", "| --- | --- | --- |"]
table = {}
for label, tool, key in [("pipe, SST-2 rows padded to 128", "pipe-throughput", "sst2_samples_per_s"),
                         ("pipe, dense rows", "pipe-throughput", "dense_samples_per_s"),
                         ("PyTorch eager (padded to 128 = dense FLOPs)", "reference-throughput", "train_samples_per_s_median_step")]:
    cells = []
    for d in ("f32", "bf16"):
        v = rates(f"{tool}-{d}", key)
        table[(label, d)] = median(v)
        cells.append("-" if not v else f"**{median(v):.0f}** ({', '.join(f'{x:.0f}' for x in v)})")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
for d in ("f32", "bf16"):
    ref = table[("PyTorch eager (padded to 128 = dense FLOPs)", d)]
    if ref:
        sst2, dense = table[("pipe, SST-2 rows padded to 128", d)], table[("pipe, dense rows", d)]
        lines.append(f"\n{d}: pipe / PyTorch = {sst2 / ref:.2f}x on padded SST-2 rows, {dense / ref:.2f}x on dense rows" if sst2 and dense else "")
for run in ("f32-a", "f32-b", "bf16"):
    r = by.get(f"recipe-{run}", {}).get("result")
    if isinstance(r, dict):
        lines.append(f"\n4k recipe {run}: run {r['run']}, accuracy {r['metrics'].get('accuracy')}, train digest {r['train_digest']}, {r['wall_s']} s")
a, b = by.get("recipe-f32-a", {}).get("result"), by.get("recipe-f32-b", {}).get("result")
if isinstance(a, dict) and isinstance(b, dict):
    lines.append(f"\nf32 reruns bit-identical: {a['train_digest'] == b['train_digest']}")
open(f"{sys.argv[2]}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $failed
