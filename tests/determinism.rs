//! The same stage key means the same bits on every machine.
//!
//! A colleague's CPU may have other cache sizes, another SIMD width, another thread count and
//! another C library. pipe's kernels are written so that none of these can change a result (see
//! `src/ops/gemm/mod.rs` and `src/ops/math.rs`); these tests prove it on one machine by forcing
//! every kernel path this CPU can run (`PIPE_KERNEL=portable|avx2|avx512|avx512bf16`) with 1 and 2 threads,
//! on the tiny model and on a model with MiniLM's layer widths (products with k = 1536 that run on
//! the thread pool, optimizer updates over many chunks). The golden digests pin the numerics
//! themselves: a change fails the test until the stage version is bumped in the same commit.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use pipe::ops::cpu::KernelPath;
use pipe::plan::StageKind;

/// One configuration's results: run id, every stage's file digests, and the predictions file.
#[derive(Debug, PartialEq)]
struct Outcome {
    run: String,
    files: BTreeMap<String, String>,
    predictions: Vec<u8>,
}

/// Runs the pipeline in `dir` (with `extra` arguments) into a fresh store under the forced kernel
/// path and thread count, then predicts the validation CSV with the trained model.
fn outcome(dir: &Path, extra: &[&str], path: KernelPath, threads: usize) -> Outcome {
    let store = format!("store-{path}-{threads}");
    let env = [("PIPE_KERNEL", path.name()), ("RAYON_NUM_THREADS", &*threads.to_string())];
    let mut args = vec!["--store", store.as_str()];
    args.extend_from_slice(extra);
    let run = run_json_env(dir, &args, &env);
    assert_eq!(run.statuses(), ["ran"; 3], "{store} starts empty");

    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join(&store).join(format!("{}.toml", run.run))).unwrap())
            .unwrap();
    // The forced path and thread count really took effect, or the comparison proves nothing.
    let env_table = record["environment"].as_table().expect("an [environment] table");
    assert_eq!(env_table["kernel"].as_str(), Some(path.name()), "environment.kernel in {store}");
    assert_eq!(env_table["threads"].as_integer(), Some(threads as i64), "environment.threads in {store}");
    let mut files = BTreeMap::new();
    for stage in record["stages"].as_array().unwrap() {
        let name = stage["name"].as_str().unwrap();
        for (file, digest) in stage["files"].as_table().unwrap() {
            files.insert(format!("{name}/{file}"), digest.as_str().unwrap().to_string());
        }
    }

    let predictions = dir.join(format!("predictions-{path}-{threads}.csv"));
    let predict_args = [
        "predict",
        &run.run,
        "--input",
        "data/validation.csv",
        "--output",
        predictions.to_str().unwrap(),
        "--store",
        &store,
    ];
    let mut command = pipe_command(dir, &predict_args);
    command.envs(env);
    let output = command.output().expect("the pipe binary starts");
    assert!(output.status.success(), "{}", describe(&predict_args, &output));
    Outcome { run: run.run, files, predictions: std::fs::read(predictions).unwrap() }
}

/// Every supported path with 1 and 2 threads gives the outcome of the first.
fn assert_same_bits_everywhere(dir: &Path, extra: &[&str]) {
    let paths: Vec<KernelPath> = KernelPath::ALL.into_iter().filter(|p| p.supported()).collect();
    eprintln!("kernel paths this CPU runs: {paths:?}");
    let mut reference: Option<(String, Outcome)> = None;
    for &path in &paths {
        for threads in [1, 2] {
            let got = outcome(dir, extra, path, threads);
            let label = format!("{path} with {threads} thread(s)");
            match &reference {
                None => reference = Some((label, got)),
                Some((first, want)) => {
                    let mut differences = Vec::new();
                    if got.run != want.run {
                        differences.push(format!("run id {} vs {}", got.run, want.run));
                    }
                    for (file, digest) in &want.files {
                        if got.files.get(file) != Some(digest) {
                            differences.push(format!("{file}: {:?} vs {digest}", got.files.get(file)));
                        }
                    }
                    if got.predictions != want.predictions {
                        differences.push("pipe predict's CSV".into());
                    }
                    assert!(
                        differences.is_empty(),
                        "{label} differs from {first}:\n  {}",
                        differences.join("\n  ")
                    );
                }
            }
        }
    }
}

#[test]
fn the_tiny_pipeline_gives_the_same_bits_on_every_kernel_path_and_thread_count() {
    let dir = project();
    // Dropout on, so that the masks are part of what must agree.
    assert_same_bits_everywhere(
        dir.path(),
        &["--set", "model.dropout=0.1", "--set", "model.attention_dropout=0.1"],
    );
}

/// Writes `model-wide/`: the tiny model's architecture at MiniLM's widths (hidden 384 in 12 heads,
/// intermediate 1536), two layers, with deterministic pseudo-random weights.
fn wide_model(dir: &Path) {
    let tiny = load("parity/bert-tiny/model.safetensors");
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let mut wide = std::collections::HashMap::new();
    for (name, tensor) in &tiny {
        let dims: Vec<usize> = tensor
            .dims()
            .iter()
            .enumerate()
            .map(|(axis, &d)| match d {
                64 if name.contains("position_embeddings") && axis == 0 => 64,
                32 => 384,
                64 => 1536,
                other => other,
            })
            .collect();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.contains("LayerNorm") && name.ends_with("weight") {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.08
                })
                .collect()
        };
        wide.insert(
            name.clone(),
            Tensor::from_vec(values, dims, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap(),
        );
    }
    let out = dir.join("model-wide");
    std::fs::create_dir_all(&out).unwrap();
    candle_core::safetensors::save(&wide, out.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/bert-tiny/config.json")).unwrap())
            .unwrap();
    config["hidden_size"] = 384.into();
    config["intermediate_size"] = 1536.into();
    config["num_attention_heads"] = 12.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn a_model_with_minilm_widths_gives_the_same_bits_on_every_kernel_path_and_thread_count() {
    let dir = project();
    wide_model(dir.path());
    let extra = [
        "--set",
        "model.source=model-wide",
        "--set",
        "model.dropout=0.1",
        "--set",
        "model.attention_dropout=0.1",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.max_grad_norm=1.0",
    ];
    assert_same_bits_everywhere(dir.path(), &extra);
}

/// bf16 mixed precision on the CPU: the native `VDPBF16PS` path (where this CPU has it) and the
/// emulation on every other path give the same bits, with 1 and 2 threads.
#[test]
fn bf16_on_the_cpu_gives_the_same_bits_on_every_kernel_path_and_thread_count() {
    let dir = project();
    wide_model(dir.path());
    let extra = [
        "--set",
        "dtype=bf16",
        "--set",
        "model.source=model-wide",
        "--set",
        "model.dropout=0.1",
        "--set",
        "model.attention_dropout=0.1",
        "--set",
        "train.max_steps=3",
    ];
    assert_same_bits_everywhere(dir.path(), &extra);
}

/// The tiny pipeline's output digests, pinned with the stage versions that produced them.
///
/// If this fails, pipe's numerics or outputs changed. If that was on purpose, bump the stage's
/// version in `StageKind::version` (src/plan/mod.rs) **in the same commit** and update the pair
/// here; otherwise a stored output computed by the old code would be reused under a key that now
/// means other bits.
const GOLDEN: [(&str, u32, &str); 3] = [
    ("tokenize", 2, "56af9fed8f68ef4bec6e0acc5eaae4173d1ef9a0b692bca04eed276478264b06"),
    ("train", 8, "7152f993f605501e85ae611c9aefb771ab92b814c26e898460cc3ef9ed0be8de"),
    ("evaluate", 4, "5f7f932e03c0aae7ea4552ebc56908324529152328326810ee80e93848c10fe6"),
];

/// The same pipeline in bf16 mixed precision on the CPU (the tokenize stage is shared).
const GOLDEN_BF16: [(&str, u32, &str); 2] = [
    ("train", 8, "f3dd5396bb1d2c7eb2b89903873ba5d254d70db67b23fa4732ca20fd096be49a"),
    ("evaluate", 4, "e810a33d24aabd86b1579e9bdc731d132f6cd71cafe8a892a7779688033c646d"),
];

#[test]
fn golden_digests_of_the_tiny_pipeline() {
    let dir = project();
    let mut failures = Vec::new();
    for (extra, golden) in [(&[][..], &GOLDEN[..]), (&["--set", "dtype=bf16"][..], &GOLDEN_BF16[..])] {
        let run = run_json(dir.path(), extra);
        let store = dir.path().join("runs");
        for &(stage, version, digest) in golden {
            let kind = StageKind::ALL.into_iter().find(|k| k.name() == stage).unwrap();
            let got = recorded_digest(&store, &run.run, stage);
            if got != digest || kind.version() != version {
                failures.push(format!(
                    "{stage} {extra:?}: version {} with digest {got}; pinned: version {version} with digest {digest}",
                    kind.version()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the tiny pipeline's outputs changed:\n  {}\nIf the change is intended, bump the stage version in \
         StageKind::version (src/plan/mod.rs) in the same commit and pin the new (version, digest) pairs \
         in GOLDEN (tests/determinism.rs); a changed digest under an unchanged version would let old \
         stored outputs be reused under keys that now mean other bits.",
        failures.join("\n  ")
    );
}

/// The evaluate stage's `validation_predicted_by` fact in the run record.
fn validation_predicted_by(store: &Path, run: &str) -> String {
    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(store.join(format!("{run}.toml"))).unwrap()).unwrap();
    let stages = record["stages"].as_array().unwrap();
    let evaluate = stages.iter().find(|s| s["name"].as_str() == Some("evaluate")).unwrap();
    evaluate["facts"]["validation_predicted_by"].as_str().unwrap().to_string()
}

#[test]
fn the_evaluate_stage_reuses_the_last_evaluation_with_the_bits_it_would_compute() {
    let dir = project();
    let store = dir.path().join("runs");
    // Evaluating after the last epoch leaves the weights alone: both runs save the same model, one
    // with the probabilities its last evaluation computed, the other without evaluations.
    for dtype in ["dtype=f32", "dtype=bf16"] {
        let reused = run_json(dir.path(), &["--set", dtype]);
        let computed = run_json(dir.path(), &["--set", dtype, "--set", "train.eval_every_epoch=false"]);
        assert_eq!(validation_predicted_by(&store, &reused.run), "train", "{dtype}");
        assert_eq!(validation_predicted_by(&store, &computed.run), "evaluate", "{dtype}");
        assert_eq!(
            recorded_digest(&store, &reused.run, "evaluate"),
            recorded_digest(&store, &computed.run, "evaluate"),
            "{dtype}"
        );
    }
}

#[test]
fn an_unknown_kernel_path_is_refused_with_exit_2() {
    let dir = project();
    let mut command = pipe_command(dir.path(), &["plan", "pipeline.toml"]);
    command.env("PIPE_KERNEL", "sse9");
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("PIPE_KERNEL") && stderr.contains("portable, avx2, avx512"), "{stderr}");
    assert!(!dir.path().join("runs").exists(), "nothing was stored");
}
