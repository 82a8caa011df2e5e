//! The `pipe` binary end to end, on a tiny project written into a temporary directory (a random
//! 2-layer BERT with a 128-word tokenizer and 60 CSV rows, so a whole pipeline runs in about a
//! second): caching and what invalidates it, bad input (exit code 2, a located message, the store
//! untouched), a training run killed mid-way, concurrent runs, and the `show`/`ls`/`schema`
//! commands.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    RunJson, STAGES, change_one_byte_of_the_rows, describe, pipe, pipe_command, pipe_ok, project,
    recorded_digest, run_json,
};
use serde_json::Value;

/// One stage of `pipe plan`'s table.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    status: String,
    reasons: Vec<String>,
}

/// `pipe plan pipeline.toml` plus `extra` arguments: the stages in order, and the raw text.
fn plan(dir: &Path, extra: &[&str]) -> (Vec<Planned>, String) {
    let mut args = vec!["plan", "pipeline.toml"];
    args.extend_from_slice(extra);
    let text = pipe_ok(dir, &args);
    let mut stages: Vec<Planned> = Vec::new();
    for line in text.lines() {
        if let Some(reason) = line.trim_start().strip_prefix("- ").filter(|_| line.starts_with(' ')) {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("a reason before any stage in `pipe plan`:\n{text}"))
                .reasons
                .push(reason.to_string());
        } else if !line.trim().is_empty() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [name, _key, status] = words[..] else {
                panic!("unexpected `pipe plan` line {line:?}:\n{text}")
            };
            stages.push(Planned { name: name.into(), status: status.into(), reasons: Vec::new() });
        }
    }
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, STAGES, "stages of `pipe plan`:\n{text}");
    (stages, text)
}

fn planned<'a>(stages: &'a [Planned], name: &str) -> &'a Planned {
    stages.iter().find(|s| s.name == name).expect("every stage is planned")
}

/// The 1-based line of `pipeline.toml` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}`")) + 1
}

// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_tokenizer_loads_and_encodes() {
    let dir = project();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("model/tokenizer.json"))
        .unwrap_or_else(|e| panic!("the tiny tokenizer.json does not load: {e}"));
    assert_eq!(tokenizer.get_vocab_size(true), 128, "the tiny model's vocab_size");
    let vocab = common::tiny_vocab();
    let id = |w: &str| vocab.iter().position(|v| v == w).unwrap() as u32;
    let encoding = tokenizer.encode("The FILM, good zebra", true).unwrap();
    assert_eq!(encoding.get_ids(), [2, id("the"), id("film"), id(","), id("good"), 1, 3]);
}

#[test]
fn second_run_is_fully_cached() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    assert_eq!(first.statuses(), ["ran"; 3], "first run: {first:?}");
    for metric in ["accuracy", "f1"] {
        let value = first.metrics.get(metric).and_then(Value::as_f64);
        assert!(value.is_some_and(|v| (0.0..=1.0).contains(&v)), "metric {metric}: {:?}", first.metrics);
    }
    let second = run_json(dir.path(), &[]);
    assert_eq!(second.statuses(), ["cached"; 3], "second run: {second:?}");
    assert_eq!(second.run, first.run, "the run id");
    assert_eq!(second.keys(), first.keys(), "the stage keys");

    let (stages, text) = plan(dir.path(), &[]);
    for stage in &stages {
        assert_eq!(stage.status, "fresh", "{} after two runs:\n{text}", stage.name);
    }
    let record = dir.path().join("runs").join(format!("{}.toml", first.run));
    assert!(record.is_file(), "no run record at {}", record.display());
    assert!(dir.path().join("runs/.gitignore").is_file(), "no runs/.gitignore");
}

#[test]
fn changing_a_train_parameter_reruns_train_and_evaluate_only() {
    let dir = project();
    let first = run_json(dir.path(), &[]);

    let (stages, text) = plan(dir.path(), &["--set", "train.epochs=2"]);
    assert_eq!(planned(&stages, "tokenize").status, "fresh", "tokenize:\n{text}");
    let train = planned(&stages, "train");
    assert_eq!(train.status, "dirty", "train:\n{text}");
    assert!(
        train.reasons.iter().any(|r| r == "train.epochs changed: 1 -> 2"),
        "train's reasons should name `train.epochs changed: 1 -> 2`:\n{text}"
    );
    assert_eq!(planned(&stages, "evaluate").status, "dirty", "evaluate:\n{text}");

    let second = run_json(dir.path(), &["--set", "train.epochs=2"]);
    assert_eq!(second.statuses(), ["cached", "ran", "ran"], "run with train.epochs=2: {second:?}");
    assert_eq!(second.stages[0].key, first.stages[0].key, "tokenize's key");
    assert_ne!(second.run, first.run, "the run id must change with the training");
}

#[test]
fn editing_one_byte_of_the_train_csv_dirties_tokenize() {
    let dir = project();
    run_json(dir.path(), &[]);
    change_one_byte_of_the_rows(&dir.path().join("data/train.csv"));

    let (stages, text) = plan(dir.path(), &[]);
    let tokenize = planned(&stages, "tokenize");
    assert_eq!(tokenize.status, "dirty", "tokenize after editing data/train.csv:\n{text}");
    assert!(
        tokenize.reasons.iter().any(|r| r.contains("input dataset.train changed")),
        "tokenize's reasons should contain `input dataset.train changed`:\n{text}"
    );
    for later in ["train", "evaluate"] {
        assert_eq!(planned(&stages, later).status, "dirty", "{later}:\n{text}");
    }
}

// --- Bad input: exit code 2, a message that points at the problem, the store untouched. -------

/// Runs `pipe run <file>` in `dir` (which has never had a successful run) and checks that it
/// fails with exit code 2, that stderr contains every one of `expected`, and that no store was
/// created.
fn assert_bad_input(dir: &Path, file: &str, expected: &[&str]) -> String {
    let args = ["run", file];
    let output = pipe(dir, &args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit code, expected 2 for bad input\n{}",
        describe(&args, &output)
    );
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "stderr should contain {fragment:?}\n{}",
            describe(&args, &output)
        );
    }
    assert!(
        !dir.join("runs").exists(),
        "bad input must leave the store untouched, but `runs/` was created\n{}",
        describe(&args, &output)
    );
    stderr
}

/// Replaces the line of `pipeline.toml` that starts with `prefix` by `with`; returns its line number.
fn edit_pipeline(dir: &Path, prefix: &str, with: &str) -> usize {
    let text = std::fs::read_to_string(dir.join("pipeline.toml")).unwrap();
    let line = line_of(&text, prefix);
    let edited: Vec<&str> =
        text.lines().enumerate().map(|(i, l)| if i + 1 == line { with } else { l }).collect();
    std::fs::write(dir.join("pipeline.toml"), edited.join("\n") + "\n").unwrap();
    line
}

/// `file:line:col` with a numeric column somewhere in `stderr`.
fn assert_located(stderr: &str, file: &str, line: usize) {
    let at = format!("{file}:{line}:");
    let found = stderr
        .match_indices(&at)
        .any(|(i, _)| stderr[i + at.len()..].chars().next().is_some_and(|c| c.is_ascii_digit()));
    assert!(found, "stderr should point at `{at}<column>`:\n{stderr}");
}

#[test]
fn malformed_toml_is_reported_with_its_position() {
    let dir = project();
    let line = edit_pipeline(dir.path(), "[train]", "[train");
    let stderr = assert_bad_input(dir.path(), "pipeline.toml", &["invalid TOML", "expected `]`", "[train"]);
    assert_located(&stderr, "pipeline.toml", line);
}

#[test]
fn unknown_key_is_reported_with_a_suggestion() {
    let dir = project();
    let line = edit_pipeline(dir.path(), "epochs", "epoch = 1");
    let stderr =
        assert_bad_input(dir.path(), "pipeline.toml", &["unknown key `epoch`", "did you mean", "epochs"]);
    assert!(stderr.contains(&format!("pipeline.toml:{line}:1")), "position of `epoch`:\n{stderr}");
}

#[test]
fn wrong_type_is_reported_with_its_position() {
    let dir = project();
    let line = edit_pipeline(dir.path(), "epochs", "epochs = \"three\"");
    let stderr =
        assert_bad_input(dir.path(), "pipeline.toml", &["train.epochs", "expected a non-negative integer"]);
    assert!(stderr.contains(&format!("pipeline.toml:{line}:10")), "position of `\"three\"`:\n{stderr}");
}

#[test]
fn missing_data_file_is_named() {
    let dir = project();
    edit_pipeline(dir.path(), "train = ", "train = \"data/nope.csv\"");
    assert_bad_input(dir.path(), "pipeline.toml", &["data/nope.csv", "dataset.train", "cannot read"]);
}

#[test]
fn missing_csv_column_is_named() {
    let dir = project();
    let path = dir.path().join("data/train.csv");
    let text = std::fs::read_to_string(&path).unwrap().replacen("text,label", "sentence,label", 1);
    std::fs::write(&path, text).unwrap();
    assert_bad_input(dir.path(), "pipeline.toml", &["data/train.csv", "no column `text`", "`sentence`"]);
}

#[test]
fn empty_csv_is_reported() {
    let dir = project();
    std::fs::write(dir.path().join("data/train.csv"), "").unwrap();
    assert_bad_input(dir.path(), "pipeline.toml", &["data/train.csv", "is empty", "header"]);
}

#[test]
fn header_only_csv_is_reported() {
    let dir = project();
    std::fs::write(dir.path().join("data/train.csv"), "text,label\n").unwrap();
    assert_bad_input(dir.path(), "pipeline.toml", &["data/train.csv", "has a header but no rows"]);
}

#[test]
fn validation_label_unseen_in_training_is_reported_with_its_line() {
    let dir = project();
    let path = dir.path().join("data/validation.csv");
    let mut lines: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
    // Line 5 of the file (the header is line 1).
    let row = &mut lines[4];
    let comma = row.rfind(',').unwrap();
    row.replace_range(comma + 1.., "neutral");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    assert_bad_input(
        dir.path(),
        "pipeline.toml",
        &["data/validation.csv:5", "`neutral`", "does not occur in the training data", "neg, pos"],
    );
}

// ---------------------------------------------------------------------------------------------

/// Epochs that make training last a few seconds (600 steps: about 2.4 s in the dev profile on 2
/// cores), long enough to be killed in the middle and short enough to run to the end in the test.
const LONG_EPOCHS: &str = "train.epochs=100";

#[test]
fn killed_training_leaves_nothing_done_and_the_next_run_succeeds() {
    let dir = project();
    let args = ["run", "pipeline.toml", "--json", "--set", LONG_EPOCHS];
    let mut child =
        pipe_command(dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let tmp = dir.path().join("runs/tmp");
    let started = Instant::now();
    let training = || {
        std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("train-"))
    };
    while !training() {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            panic!(
                "`pipe run` ended ({status}) before a runs/tmp/train-* directory appeared\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no runs/tmp/train-* after 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "training finished within 300 ms; raise LONG_EPOCHS so that there is something to kill"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let done: Vec<_> = std::fs::read_dir(dir.path().join("runs/stages/train"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("MANIFEST.json").exists())
        .map(|e| e.path())
        .collect();
    assert!(done.is_empty(), "a killed train stage counts as done: {done:?}");
    let (stages, text) = plan(dir.path(), &["--set", LONG_EPOCHS]);
    assert_eq!(planned(&stages, "tokenize").status, "fresh", "tokenize finished before the kill:\n{text}");
    assert_eq!(planned(&stages, "train").status, "dirty", "train after the kill:\n{text}");

    let rerun = RunJson::parse(&pipe_ok(dir.path(), &args));
    assert_eq!(rerun.statuses(), ["cached", "ran", "ran"], "the run after the kill: {rerun:?}");
    let (stages, text) = plan(dir.path(), &["--set", LONG_EPOCHS]);
    assert!(stages.iter().all(|s| s.status == "fresh"), "after the rerun:\n{text}");

    // Whatever the rerun reused from the killed one (checkpoints), it trained the same model as a
    // run that was never interrupted.
    let mut clean_args = args.to_vec();
    clean_args.extend(["--store", "uninterrupted"]);
    let clean = RunJson::parse(&pipe_ok(dir.path(), &clean_args));
    assert_eq!(clean.statuses(), ["ran"; 3], "the uninterrupted run: {clean:?}");
    assert_eq!(
        recorded_digest(&dir.path().join("runs"), &rerun.run, "train"),
        recorded_digest(&dir.path().join("uninterrupted"), &clean.run, "train"),
        "the model trained after the kill differs from an uninterrupted run's"
    );
    assert_eq!(rerun.metrics, clean.metrics, "metrics after the kill vs. uninterrupted");
}

#[test]
fn schema_command_prints_the_checked_in_schema() {
    let dir = tempfile::tempdir().unwrap();
    let printed = pipe_ok(dir.path(), &["schema"]);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    if printed != checked_in {
        let first = printed.lines().zip(checked_in.lines()).position(|(a, b)| a != b);
        panic!(
            "`pipe schema` differs from {} (first differing line: {:?}; {} vs {} bytes); regenerate \
             it with `pipe schema > schemas/pipeline.schema.json`",
            path.display(),
            first.map(|i| (i + 1, printed.lines().nth(i), checked_in.lines().nth(i))),
            printed.len(),
            checked_in.len()
        );
    }
}

#[test]
fn show_config_runs_again_to_the_same_run() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    let prefix = &first.run[..6];

    let config = pipe_ok(dir.path(), &["show", prefix, "--config"]);
    std::fs::write(dir.path().join("x.toml"), &config).unwrap();
    let again = RunJson::parse(&pipe_ok(dir.path(), &["run", "x.toml", "--json"]));
    assert_eq!(again.run, first.run, "`pipe show --config` ran to another run; it printed:\n{config}");
    assert_eq!(again.statuses(), ["cached"; 3], "running the shown config: {again:?}");

    let shown = pipe_ok(dir.path(), &["show", prefix]);
    assert!(shown.contains(&first.run), "`pipe show {prefix}` does not name the run:\n{shown}");
    assert!(shown.contains("accuracy"), "`pipe show {prefix}` does not show accuracy:\n{shown}");
    let listed = pipe_ok(dir.path(), &["ls"]);
    assert!(listed.contains(&first.run), "`pipe ls` does not list the run:\n{listed}");
}

#[test]
fn two_concurrent_runs_share_the_work() {
    let dir = project();
    let args = ["run", "pipeline.toml", "--json"];
    let spawn =
        || pipe_command(dir.path(), &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (a, b) = (spawn(), spawn());
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let runs: Vec<RunJson> = outputs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", describe(&args, o));
            RunJson::parse(&String::from_utf8_lossy(&o.stdout))
        })
        .collect();
    assert_eq!(runs[0].run, runs[1].run, "the two runs' ids");
    let mut train: Vec<&str> = runs.iter().map(|r| r.status("train")).collect();
    train.sort();
    assert_eq!(train, ["cached", "ran"], "train across the two runs (exactly one does the work): {runs:?}");
}

/// A pipeline for a GPU on a build without CUDA: exit 2 with a message that says so, before
/// anything is stored. (A `cuda` build on a machine without a GPU says "no usable CUDA GPU";
/// scripts/gpu-check.sh runs the GPU side.)
#[test]
#[cfg(not(feature = "cuda"))]
fn a_device_this_build_cannot_honour_is_refused() {
    let dir = project();
    let text = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), format!("device = \"cuda:1\"\n{text}")).unwrap();
    assert_bad_input(
        dir.path(),
        "pipeline.toml",
        &["device `cuda:1`", "built without CUDA support", "--features cuda"],
    );
}
