//! What users expect of a fine-tuning tool, through the `pipe` binary on the tiny project of
//! `common::tiny_project` (a random 2-layer BERT, 48 training and 12 validation rows): a seeded,
//! stratified validation split and leakage between the splits reported (or dropped), evaluation
//! during training with its curves, early stopping that keeps the best epoch, class weights, and
//! `pipe predict` agreeing with the evaluate stage.

mod common;

use std::path::{Path, PathBuf};

use common::{describe, pipe, pipe_ok, project};
use serde_json::Value;

/// A finished `pipe run --json`: the run id and each stage's directory in the store.
struct Run {
    id: String,
    store: PathBuf,
    record: toml::Table,
}

impl Run {
    /// The directory of `stage`'s outputs.
    fn dir(&self, stage: &str) -> PathBuf {
        let key = self.stage(stage)["key"].as_str().expect("a key").to_string();
        self.store.join("stages").join(stage).join(key)
    }

    /// The record's entry for `stage`.
    fn stage(&self, stage: &str) -> &toml::Table {
        self.record["stages"]
            .as_array()
            .and_then(|s| {
                s.iter().filter_map(toml::Value::as_table).find(|s| s["name"].as_str() == Some(stage))
            })
            .unwrap_or_else(|| panic!("no stage {stage} in the record of {}", self.id))
    }

    /// A JSON output file of `stage`.
    fn json(&self, stage: &str, file: &str) -> Value {
        let path = self.dir(stage).join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The train stage's `metrics.jsonl`, one object per evaluation.
    fn evaluations(&self) -> Vec<Value> {
        let path = self.dir("train").join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }
}

/// `pipe run pipeline.toml --json` in `dir` with the store `store` (relative to `dir`) and
/// `overrides` as `--set` arguments; it must succeed. Returns the run and its stderr.
fn run(dir: &Path, store: &str, overrides: &[&str]) -> (Run, String) {
    let mut args = vec!["run", "pipeline.toml", "--json", "--store", store];
    for o in overrides {
        args.extend(["--set", o]);
    }
    let output = pipe(dir, &args);
    assert!(output.status.success(), "{}", describe(&args, &output));
    let stdout: Value = serde_json::from_slice(&output.stdout).expect("`pipe run --json` prints JSON");
    let id = stdout["run"].as_str().expect("a run id").to_string();
    let store = dir.join(store);
    let record = toml::from_str(&std::fs::read_to_string(store.join(format!("{id}.toml"))).unwrap()).unwrap();
    (Run { id, store, record }, String::from_utf8_lossy(&output.stderr).into_owned())
}

// --- Validation split and leakage ---------------------------------------------------------------

/// `rows` distinct texts with labels `a`, `b`, `c` in the proportions 6:3:1.
fn three_class_csv(rows: usize) -> String {
    let mut out = String::from("text,label\n");
    for row in 0..rows {
        let label = match row % 10 {
            0..6 => "a",
            6..9 => "b",
            _ => "c",
        };
        out.push_str(&format!("the film w{} w{} number {row},{label}\n", 40 + row % 88, 40 + row / 88 % 88));
    }
    out
}

/// (train, validation) rows per class, from the tokenize stage's `labels.json`.
fn class_counts(run: &Run) -> (Vec<u64>, Vec<u64>) {
    let labels = run.json("tokenize", "labels.json");
    let counts = |key: &str| -> Vec<u64> {
        labels[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {labels}"))
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect()
    };
    (counts("train_class_counts"), counts("validation_class_counts"))
}

#[test]
fn validation_split_is_seeded_and_stratified() {
    let dir = project();
    std::fs::write(dir.path().join("data/train.csv"), three_class_csv(1000)).unwrap();
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    let text = text.replace("validation = \"data/validation.csv\"", "validation_split = 0.2");
    std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
    // Training is beside the point here.
    let overrides: &[&str] = &["train.max_steps=1"];

    let (first, _) = run(dir.path(), "runs", overrides);
    let (again, _) = run(dir.path(), "again", overrides);
    let tokens_digest = |run: &Run| run.stage("tokenize")["digest"].as_str().unwrap().to_string();
    assert_eq!(tokens_digest(&first), tokens_digest(&again), "the same seed must draw the same split");

    let mut seeded = overrides.to_vec();
    seeded.push("seed=7");
    let (other, _) = run(dir.path(), "runs", &seeded);
    assert_ne!(tokens_digest(&first), tokens_digest(&other), "another seed must draw another split");

    for run in [&first, &other] {
        let (train, validation) = class_counts(run);
        let total: u64 = train.iter().chain(&validation).sum();
        let validation_total: u64 = validation.iter().sum();
        assert_eq!(total, 1000, "every row is in one split: {train:?} {validation:?}");
        assert_eq!(validation_total, 200, "20% of the rows validate: {validation:?}");
        for class in 0..3 {
            let share_all = (train[class] + validation[class]) as f64 / total as f64;
            let share_validation = validation[class] as f64 / validation_total as f64;
            assert!(
                (share_all - share_validation).abs() <= 0.01,
                "class {class}: {share_validation:.3} of validation, {share_all:.3} of all rows"
            );
        }
    }
}

#[test]
fn leakage_is_reported_with_counts_and_examples_and_can_be_dropped() {
    let dir = project();
    let train = std::fs::read_to_string(dir.path().join("data/train.csv")).unwrap();
    // Three training rows (the 2nd to 4th data rows; the 1st is quoted) planted in validation.
    let planted: Vec<&str> = train.lines().skip(2).take(3).collect();
    let path = dir.path().join("data/validation.csv");
    let mut validation = std::fs::read_to_string(&path).unwrap();
    for row in &planted {
        validation.push_str(row);
        validation.push('\n');
    }
    std::fs::write(&path, validation).unwrap();
    let example = planted[0].rsplit_once(',').unwrap().0;

    let (kept, stderr) = run(dir.path(), "runs", &[]);
    assert!(
        stderr.contains("warning: 3 of 15 validation rows also occur in the training data")
            && stderr.contains(&format!("{example:?}"))
            && stderr.contains("dataset.drop_duplicates = true"),
        "the leakage warning should give the count, an example and the remedy:\n{stderr}"
    );
    let labels = kept.json("tokenize", "labels.json");
    assert_eq!(
        (labels["validation_rows"].as_u64(), labels["validation_leaked_rows"].as_u64()),
        (Some(15), Some(3))
    );
    assert_eq!(labels["validation_rows_dropped"].as_u64(), Some(0), "{labels}");

    let (dropped, stderr) = run(dir.path(), "runs", &["dataset.drop_duplicates=true"]);
    assert!(stderr.contains("dropped 3 of 15 validation rows"), "{stderr}");
    let labels = dropped.json("tokenize", "labels.json");
    assert_eq!(
        (labels["validation_rows"].as_u64(), labels["validation_rows_dropped"].as_u64()),
        (Some(12), Some(3))
    );
    assert_eq!(dropped.json("evaluate", "metrics.json")["rows"].as_u64(), Some(12), "evaluated rows");
}

// --- Evaluation during training, curves, early stopping ----------------------------------------

#[test]
fn every_run_with_evaluation_draws_its_curves() {
    let dir = project();
    let (first, _) = run(dir.path(), "runs", &["train.epochs=3"]);
    let evaluations = first.evaluations();
    let epochs: Vec<f64> = evaluations.iter().map(|e| e["epoch"].as_f64().unwrap()).collect();
    assert_eq!(epochs, [1.0, 2.0, 3.0], "one evaluation per epoch: {evaluations:?}");
    for e in &evaluations {
        for key in ["step", "train_loss", "validation_loss", "accuracy", "f1"] {
            assert!(e[key].is_number(), "no {key} in {e}");
        }
    }
    let png = std::fs::read(first.dir("train").join("curves.png")).expect("curves.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "curves.png is not a PNG");
    let svg = std::fs::read_to_string(first.dir("train").join("curves.svg")).expect("curves.svg");
    assert!(svg.contains("<svg") && svg.contains("validation loss"), "curves.svg: {svg:.200}");

    let shown = pipe_ok(dir.path(), &["show", &first.id]);
    for name in ["curves.png", "curves.svg"] {
        let path = first.dir("train").join(name);
        let relative = path.strip_prefix(dir.path()).unwrap();
        assert!(shown.contains(&relative.display().to_string()), "`pipe show` should print {name}:\n{shown}");
    }

    // The same numbers draw the same bytes (the curves are part of the stage's digest).
    let (elsewhere, _) = run(dir.path(), "elsewhere", &["train.epochs=3"]);
    assert_eq!(std::fs::read(elsewhere.dir("train").join("curves.png")).unwrap(), png);

    // Every N steps, and the last step whatever N.
    let (stepped, _) = run(
        dir.path(),
        "runs",
        &["train.epochs=2", "train.eval_every_epoch=false", "train.eval_every_steps=5"],
    );
    let steps: Vec<u64> = stepped.evaluations().iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [5, 10, 12], "evaluations every 5 of 12 steps");

    let (silent, _) = run(dir.path(), "runs", &["train.epochs=2", "train.eval_every_epoch=false"]);
    for name in ["metrics.jsonl", "curves.png", "curves.svg"] {
        assert!(!silent.dir("train").join(name).exists(), "{name} without evaluations");
    }
}

/// Training that overfits the 48 rows: the validation loss falls, then rises for good.
const OVERFITTING: [&str; 4] =
    ["train.epochs=30", "optimizer.lr=3e-3", "schedule.kind=\"constant\"", "train.early_stopping.patience=2"];

#[test]
fn early_stopping_saves_the_best_epoch_which_the_evaluate_stage_scores() {
    let dir = project();
    let (run, _) = run(dir.path(), "runs", &OVERFITTING);
    let evaluations = run.evaluations();
    assert!(
        evaluations.len() < 30,
        "training should stop before the last of 30 epochs: {} evaluations",
        evaluations.len()
    );
    let best: Vec<&Value> = evaluations.iter().filter(|e| e["best"] == Value::Bool(true)).collect();
    let [best] = best[..] else { panic!("exactly one evaluation should be the best: {evaluations:#?}") };
    let loss = |e: &Value| e["validation_loss"].as_f64().unwrap();
    assert!(evaluations.iter().all(|e| loss(best) <= loss(e)), "the best has the lowest validation loss");
    let last = evaluations.last().unwrap();
    assert_eq!(
        last["step"].as_u64().unwrap() - best["step"].as_u64().unwrap(),
        2 * 6,
        "stopped after 2 epochs (the patience) without improvement"
    );

    let metrics = run.json("evaluate", "metrics.json");
    assert_eq!(
        metrics["loss"].as_f64(),
        best["validation_loss"].as_f64(),
        "validation loss, evaluate vs best"
    );
    assert_eq!(metrics["accuracy"].as_f64(), best["accuracy"].as_f64(), "accuracy, evaluate vs best");
    assert_eq!(metrics["macro_f1"].as_f64(), best["f1"].as_f64(), "f1, evaluate vs best");

    let early =
        run.stage("train")["facts"]["early_stopping"].as_table().expect("early stopping facts").clone();
    assert_eq!(early["stopped_early"].as_bool(), Some(true), "{early:?}");
    assert_eq!(early["best_epoch"].as_float(), best["epoch"].as_f64(), "{early:?}");
    let shown = pipe_ok(dir.path(), &["show", &run.id]);
    assert!(shown.contains("stopped early; saved epoch"), "`pipe show`:\n{shown}");
    // The saved weights are not the last evaluation's: the evaluate stage predicted them itself.
    assert_eq!(run.stage("evaluate")["facts"]["validation_predicted_by"].as_str(), Some("evaluate"));
}

#[test]
fn interrupted_early_stopping_resumes_to_the_same_bits() {
    let dir = project();
    // Overfits early, then runs on for the patience: 100 evaluations (every 4 steps and at each
    // epoch's end) without improvement, some 300 steps, long enough to be interrupted.
    let overrides = [
        "train.epochs=200",
        "optimizer.lr=3e-3",
        "schedule.kind=\"constant\"",
        "train.early_stopping.patience=100",
        "train.eval_every_steps=4",
    ];
    let mut args = vec!["run", "pipeline.toml", "--json"];
    for o in &overrides {
        args.extend(["--set", o]);
    }
    let mut child = common::pipe_command(dir.path(), &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = dir.path().join("runs/tmp");
    let checkpointed = || {
        std::fs::read_dir(&tmp).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("train-")
                && e.path().join("checkpoint/checkpoint.safetensors").is_file()
        })
    };
    let started = std::time::Instant::now();
    while !checkpointed() {
        assert!(child.try_wait().unwrap().is_none(), "`pipe run` ended before its first checkpoint");
        assert!(started.elapsed().as_secs() < 60, "no checkpoint after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none(), "training ended within 100 ms of its first checkpoint");
    // SAFETY: signalling a child process this test started and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", describe(&args, &output));

    assert!(checkpointed(), "no checkpoint to resume from after the interruption");
    let (resumed, _) = run(dir.path(), "runs", &overrides);
    let (clean, _) = run(dir.path(), "clean", &overrides);
    assert_eq!(resumed.id, clean.id, "the run ids");
    assert_eq!(resumed.stage("train")["digest"].as_str(), clean.stage("train")["digest"].as_str());
    assert_eq!(resumed.evaluations(), clean.evaluations(), "metrics.jsonl, resumed vs uninterrupted");
    assert_eq!(
        resumed.stage("train")["facts"]["early_stopping"]["stopped_early"].as_bool(),
        Some(true),
        "the patience should run out before the 200 epochs"
    );
}

// --- Class weights -----------------------------------------------------------------------------

#[test]
fn class_weights_change_the_training_and_must_fit_the_classes() {
    let dir = project();
    let (plain, _) = run(dir.path(), "runs", &[]);
    let (balanced, _) = run(dir.path(), "runs", &["train.class_weights=\"balanced\""]);
    // The tiny data is balanced, so "balanced" weighs both classes 1 and trains the same model.
    assert_ne!(plain.stage("train")["key"].as_str(), balanced.stage("train")["key"].as_str());
    assert_eq!(plain.stage("train")["digest"].as_str(), balanced.stage("train")["digest"].as_str());
    let (weighted, _) = run(dir.path(), "runs", &["train.class_weights=[1.0, 3.0]"]);
    assert_ne!(plain.stage("train")["digest"].as_str(), weighted.stage("train")["digest"].as_str());

    let args = ["run", "pipeline.toml", "--set", "train.class_weights=[1, 2, 3]"];
    let output = pipe(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&args, &output));
    assert!(stderr.contains("lists 3 weights, but the training data has 2 classes (neg, pos)"), "{stderr}");
}

// --- pipe predict ------------------------------------------------------------------------------

/// The `N of M` of `accuracy A (N of M rows)` on stderr.
fn correct_of_rows(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("accuracy "))
        .unwrap_or_else(|| panic!("no accuracy:\n{stderr}"));
    let counts =
        line.split_once('(').and_then(|(_, rest)| rest.strip_suffix(" rows)")).expect("`(N of M rows)`");
    let (correct, rows) = counts.split_once(" of ").expect("`N of M`");
    (correct.parse().unwrap(), rows.parse().unwrap())
}

#[test]
fn predict_on_the_validation_csv_agrees_with_the_evaluate_stage() {
    let dir = project();
    let (run, _) = run(dir.path(), "runs", &["train.epochs=8", "optimizer.lr=3e-3"]);
    let metrics = run.json("evaluate", "metrics.json");

    let args = ["predict", &run.id[..8], "--input", "data/validation.csv"];
    let output = pipe(dir.path(), &args);
    assert!(output.status.success(), "{}", describe(&args, &output));
    let (correct, rows) = correct_of_rows(&String::from_utf8_lossy(&output.stderr));
    assert_eq!(rows, 12);
    assert_eq!(
        Some(correct as f64 / rows as f64),
        metrics["accuracy"].as_f64(),
        "accuracy, predict vs evaluate"
    );

    // Row by row, the same predicted labels as the evaluate stage's predictions.csv.
    let column = |text: &str, name: &str| -> Vec<String> {
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let index = reader.headers().unwrap().iter().position(|h| h == name).expect("the column");
        reader.records().map(|r| r.unwrap()[index].to_string()).collect()
    };
    let predicted = column(&String::from_utf8_lossy(&output.stdout), "predicted");
    let evaluated = std::fs::read_to_string(run.dir("evaluate").join("predictions.csv")).unwrap();
    assert_eq!(predicted, column(&evaluated, "predicted"));

    let out =
        pipe_ok(dir.path(), &["predict", &run.id, "--text", "a good film", "--text", "bad, awful movie"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a row per text:\n{out}");
    assert_eq!(lines[0], "text,predicted,p_neg,p_pos");
    assert!(lines[2].starts_with("\"bad, awful movie\","), "{out}");

    pipe_ok(dir.path(), &["predict", &run.id, "--input", "data/validation.csv", "--output", "preds.csv"]);
    let written = std::fs::read_to_string(dir.path().join("preds.csv")).unwrap();
    assert_eq!(column(&written, "predicted"), predicted, "--output writes the same predictions");

    let args = ["predict", "ffffffff", "--text", "x"];
    let output = pipe(dir.path(), &args);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&args, &output));
}
