//! Helpers shared by the integration tests: fixtures, tolerances, tiny models.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pipe::model::Batch;

/// `tests/fixtures/...` inside the crate.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture loads")
}

/// `‖x − ref‖₂ / max(‖ref‖₂, floor)`, the comparison of `tests/fixtures/parity/README.md`.
pub fn rel_err(x: &Tensor, reference: &Tensor, floor: f64) -> f64 {
    let x = x.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let r = reference.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(x.dims(), r.dims(), "shapes differ");
    let diff = (x - &r).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let norm = r.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    diff / norm.max(floor)
}

/// A scalar stored as a one-element tensor.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
}

/// The fixture's padded batch (i64 tensors) as model input in `dtype`.
pub fn fixture_batch(case: &HashMap<String, Tensor>, dtype: DType) -> (Batch, Vec<u32>) {
    let u32s = |name: &str| case[name].to_dtype(DType::U32).unwrap();
    let mask = case["attention_mask"].to_dtype(dtype).unwrap();
    let real_tokens = scalar(&mask.sum_all().unwrap()) as usize;
    let labels = case["labels"].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap();
    let batch = Batch {
        input_ids: u32s("input_ids"),
        attention_mask: mask,
        token_type_ids: u32s("token_type_ids"),
        real_tokens,
    };
    (batch, labels)
}

/// Logits, loss and each parameter's gradient (in parameter order) of a fixture's batch.
pub fn loss_and_grads(
    model: &pipe::model::Classifier,
    case: &HashMap<String, Tensor>,
) -> (Tensor, Tensor, Vec<Option<Tensor>>) {
    let (batch, labels) = fixture_batch(case, model.dtype());
    let logits = model.forward(&batch, pipe::model::Mode::Eval).unwrap();
    let loss = pipe::ops::cross_entropy(&logits, &labels, None).unwrap();
    let store = loss.backward().unwrap();
    let grads = model.params().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect();
    (logits, loss, grads)
}

/// Asserts that `model` (`what`, in messages) gives a fixture's float64 logits and loss within 1e-5
/// and every gradient within 1e-5 (floor-normalised, `tests/fixtures/parity/README.md`), for
/// exactly the parameters the reference trains. Returns the worst gradient error and where.
pub fn assert_matches_reference(
    what: &str,
    model: &pipe::model::Classifier,
    case: &HashMap<String, Tensor>,
) -> (f64, String) {
    let (logits, loss, grads) = loss_and_grads(model, case);
    let e = rel_err(&logits, &case["expected.logits"], 0.0);
    assert!(e < 1e-5, "{what}: logits err {e:e}");
    let e = rel_err(&loss.reshape(1).unwrap(), &case["expected.loss"], 0.0);
    assert!(e < 1e-5, "{what}: loss err {e:e}");
    let floor = 1e-3 * scalar(&case["expected.grad_global_norm"]);
    let mut worst = (0f64, String::new());
    for ((name, _), grad) in model.params().iter().zip(&grads) {
        let reference = case.get(&format!("grad.{name}")).unwrap_or_else(|| {
            panic!("{what}: pipe trains `{name}`, which the reference does not have or train")
        });
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{what}: {name} received no gradient"));
        let e = rel_err(grad, reference, floor);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    assert!(worst.0 < 1e-5, "{what}: worst gradient error {:e} at {}", worst.0, worst.1);
    let references = case.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads.len(), references, "{what}: every parameter the reference trains");
    worst
}

/// The MiniLM checkpoint, when it has been fetched (`scripts/fetch-model.sh`); tests that need it
/// print why they skip otherwise.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PIPE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "CI runs the real-model tests, but MiniLM is not at {} (scripts/test.sh fetches it)",
            dir.display()
        );
    } else {
        // Written to the stream itself, not through eprintln!, so that the test harness does not
        // swallow it: a skipped check must be visible in CI logs.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the real MiniLM is not at {} (run scripts/fetch-model.sh to include this test)",
            dir.display()
        );
        None
    }
}

/// A Python interpreter with pyarrow, tensorboard and mlflow (`TEST_PYTHON`, which
/// scripts/mlflow-server.sh exports), for the tests that check pipe's files and logs with those
/// tools' own readers; as [`minilm_dir`], its absence fails under CI and skips visibly elsewhere.
pub fn test_python() -> Option<PathBuf> {
    match std::env::var_os("TEST_PYTHON") {
        Some(python) => Some(PathBuf::from(python)),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "CI runs the format and tracking tests, but TEST_PYTHON is not set (scripts/test.sh sets it)"
            )
        }
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no TEST_PYTHON with pyarrow, tensorboard and mlflow (scripts/mlflow-server.sh makes one)"
            );
            None
        }
    }
}

/// Runs `script` with `python` and `args`, and returns what it printed; a failure panics with its
/// output.
pub fn python_ok(python: &Path, script: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("the test Python starts");
    assert!(
        output.status.success(),
        "python failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The real SmolLM2-135M-Instruct GGUF, when it has been fetched (`scripts/fetch-smollm2.sh`); as
/// [`minilm_dir`], a missing model fails under CI and skips visibly elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PIPE_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        Some(path)
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "CI runs the real-model tests, but SmolLM2 is not at {} (scripts/test.sh fetches it)",
            path.display()
        );
    } else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the real SmolLM2 is not at {} (run scripts/fetch-smollm2.sh to include this test)",
            path.display()
        );
        None
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny project for driving the `pipe` binary end to end.
// ---------------------------------------------------------------------------------------------

/// Words that make a row `pos`.
pub const POS_WORDS: [&str; 8] = ["good", "great", "happy", "nice", "lovely", "superb", "bright", "fine"];
/// Words that make a row `neg`.
pub const NEG_WORDS: [&str; 8] = ["bad", "awful", "sad", "ugly", "grim", "dull", "weak", "poor"];
/// Words that say nothing about the label.
pub const FILLER_WORDS: [&str; 16] = [
    "the", "a", "film", "movie", "was", "is", "very", "plot", "acting", "story", "and", "it", "quite",
    "really", "cast", "ending",
];

/// The vocabulary of the tiny tokenizer: exactly 128 entries (the tiny model's `vocab_size`),
/// special tokens first.
pub fn tiny_vocab() -> Vec<String> {
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ",", "."].map(String::from).to_vec();
    vocab.extend(POS_WORDS.iter().chain(&NEG_WORDS).chain(&FILLER_WORDS).map(|w| w.to_string()));
    let mut n = vocab.len();
    while vocab.len() < 128 {
        vocab.push(format!("w{n}"));
        n += 1;
    }
    vocab
}

/// A Hugging Face `tokenizer.json`: WordPiece over [`tiny_vocab`], BERT normalizer (lowercase),
/// BERT pre-tokenizer, `[CLS] $A [SEP]`.
pub fn tiny_tokenizer_json() -> String {
    use serde_json::json;
    let vocab = tiny_vocab();
    let ids: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    let added: Vec<_> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"id": i, "content": w, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let special = |name: &str| json!({"SpecialToken": {"id": name, "type_id": 0}});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]")],
            "pair": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]"),
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids},
    });
    serde_json::to_string_pretty(&doc).expect("JSON")
}

/// `rows` sentences, half `pos` and half `neg` (alternating), from a seeded generator: a few
/// filler words with one or two words of the label's set mixed in. The first row of each call
/// with `quote_one` holds a comma, so it is written as a quoted CSV field.
pub fn tiny_csv(rows: usize, seed: u64, quote_one: bool) -> String {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut out = String::from("text,label\n");
    for row in 0..rows {
        let (label, words) = if row % 2 == 0 { ("pos", &POS_WORDS) } else { ("neg", &NEG_WORDS) };
        let mut sentence: Vec<String> =
            (0..3 + next(4)).map(|_| FILLER_WORDS[next(FILLER_WORDS.len())].to_string()).collect();
        for _ in 0..1 + next(2) {
            let at = next(sentence.len() + 1);
            sentence.insert(at, words[next(words.len())].to_string());
        }
        // A few words from the generated tail of the vocabulary, so rows are (almost surely) unique.
        sentence.push(format!("w{}", 40 + next(88)));
        let text = sentence.join(" ");
        if quote_one && row == 0 {
            out.push_str(&format!("\"{text}, {}\",{label}\n", FILLER_WORDS[next(FILLER_WORDS.len())]));
        } else {
            out.push_str(&format!("{text},{label}\n"));
        }
    }
    out
}

/// The pipeline file of [`tiny_project`].
pub const TINY_PIPELINE: &str = r#"# A tiny pipeline for the CLI tests.
[dataset]
train = "data/train.csv"
validation = "data/validation.csv"

[tokenizer]
source = "model"
max_length = 16

[model]
source = "model"

[optimizer]
lr = 1e-3

[train]
epochs = 1
batch_size = 8

[evaluate]
metrics = ["accuracy", "f1"]
"#;

/// Writes a tiny project into `dir`: `model/` (the random bert-tiny fixture and a 128-word
/// tokenizer), `data/train.csv` (48 rows) and `data/validation.csv` (12 rows) with labels
/// `pos`/`neg`, and `pipeline.toml`. A whole pipeline runs on it in about a second.
pub fn tiny_project(dir: &Path) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("parity/bert-tiny").join(file), model.join(file)).unwrap();
    }
    std::fs::write(model.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.csv"), tiny_csv(48, 1, true)).unwrap();
    std::fs::write(data.join("validation.csv"), tiny_csv(12, 2, false)).unwrap();
    std::fs::write(dir.join("pipeline.toml"), TINY_PIPELINE).unwrap();
}

/// The `pipe` binary, to run in `dir`, with no `PIPE_*` variable of the test's environment (so
/// the store is `dir/runs`, the CLI's default, and no variable changes the pipeline).
pub fn pipe_command(dir: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pipe"));
    command.current_dir(dir).args(args);
    for (name, _) in std::env::vars_os() {
        // PIPE_* variables are pipeline layers, and a developer's MLflow server is no place
        // for test runs.
        if name.to_string_lossy().starts_with("PIPE_") || name == "MLFLOW_TRACKING_URI" {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `pipe args...` in `dir` to completion.
pub fn pipe(dir: &Path, args: &[&str]) -> std::process::Output {
    pipe_command(dir, args).output().expect("the pipe binary starts")
}

/// Everything a finished `pipe` printed, for failure messages.
pub fn describe(args: &[&str], output: &std::process::Output) -> String {
    format!(
        "`pipe {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `pipe args...` in `dir`, asserts that it succeeded, and returns its stdout.
pub fn pipe_ok(dir: &Path, args: &[&str]) -> String {
    let output = pipe(dir, args);
    assert!(output.status.success(), "{}", describe(args, &output));
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
}

/// The stages of a pipeline, in order.
pub const STAGES: [&str; 3] = ["tokenize", "train", "evaluate"];

/// A fresh directory holding the tiny project.
pub fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_project(dir.path());
    dir
}

/// One stage of `pipe run --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRun {
    pub name: String,
    pub key: String,
    pub status: String,
}

/// The `pipe run --json` object.
#[derive(Debug, Clone)]
pub struct RunJson {
    pub run: String,
    pub stages: Vec<StageRun>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl RunJson {
    pub fn parse(stdout: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("`pipe run --json` printed no JSON object ({e}):\n{stdout}"));
        let text = |v: &serde_json::Value, k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("no string `{k}` in {v}\nwhole output: {stdout}"))
                .to_string()
        };
        let stages: Vec<StageRun> = v["stages"]
            .as_array()
            .unwrap_or_else(|| panic!("no `stages` array in {stdout}"))
            .iter()
            .map(|s| {
                assert!(s["seconds"].is_number(), "stage without numeric `seconds`: {s}");
                StageRun { name: text(s, "name"), key: text(s, "key"), status: text(s, "status") }
            })
            .collect();
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, STAGES, "stages of `pipe run --json`:\n{stdout}");
        let metrics =
            v["metrics"].as_object().unwrap_or_else(|| panic!("no `metrics` object in {stdout}")).clone();
        Self { run: text(&v, "run"), stages, metrics }
    }

    pub fn statuses(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.status.as_str()).collect()
    }

    pub fn keys(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.key.as_str()).collect()
    }

    pub fn status(&self, stage: &str) -> &str {
        &self.stages.iter().find(|s| s.name == stage).expect("every stage is listed").status
    }
}

impl RunJson {
    /// The key of one stage.
    pub fn key(&self, stage: &str) -> &str {
        &self.stages.iter().find(|s| s.name == stage).expect("every stage is listed").key
    }
}

/// `pipe run pipeline.toml --json` plus `extra` arguments, which must succeed, with `env` set.
pub fn run_json_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> RunJson {
    let mut args = vec!["run", "pipeline.toml", "--json"];
    args.extend_from_slice(extra);
    let mut command = pipe_command(dir, &args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("the pipe binary starts");
    assert!(output.status.success(), "{}", describe(&args, &output));
    RunJson::parse(&String::from_utf8_lossy(&output.stdout))
}

/// `pipe run pipeline.toml --json` plus `extra` arguments, which must succeed.
pub fn run_json(dir: &Path, extra: &[&str]) -> RunJson {
    run_json_env(dir, extra, &[])
}

/// The output digest of `stage` in the run record `<store>/<run>.toml`.
pub fn recorded_digest(store: &Path, run: &str, stage: &str) -> String {
    let path = store.join(format!("{run}.toml"));
    let record: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let stages = record["stages"].as_array().unwrap_or_else(|| panic!("no stages in {}", path.display()));
    let entry = stages.iter().find(|s| s["name"].as_str() == Some(stage)).expect("every stage is recorded");
    entry["digest"].as_str().expect("a digest").to_string()
}

/// Replaces the first `o` after the header of a CSV (every tiny-project sentence has one) with `0`:
/// the same length, other bytes.
pub fn change_one_byte_of_the_rows(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = bytes.iter().position(|&b| b == b'\n').unwrap();
    let at = header + bytes[header..].iter().position(|&b| b == b'o').expect("an `o` in the rows");
    bytes[at] = b'0';
    std::fs::write(path, &bytes).unwrap();
}
