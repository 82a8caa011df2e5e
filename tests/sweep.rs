//! `pipe sweep` end to end on the tiny project: trials are ordinary runs (tokenize runs once and
//! is shared), running the sweep again reuses every trial and gives the same output and record,
//! `show` and `best` read the record and the best run reproduces, raising n_trials keeps the
//! first trials, and bad sweep files exit 2 with their position.

mod common;

use std::path::Path;

use common::{describe, pipe, pipe_ok, project};
use serde_json::Value;

const SWEEP: &str = "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 3\nseed = 7\n\n\
                     [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 1e-2] }\n";

/// Stage directories of `kind` in the project's store.
fn stages(dir: &Path, kind: &str) -> usize {
    std::fs::read_dir(dir.join("runs/stages").join(kind)).map_or(0, |d| d.count())
}

fn sweep_json(dir: &Path) -> Value {
    serde_json::from_str(&pipe_ok(dir, &["sweep", "sweep.toml", "--json"])).unwrap()
}

#[test]
fn a_sweep_shares_tokenize_reruns_from_the_store_and_extends() {
    let dir = project();
    std::fs::write(dir.path().join("sweep.toml"), SWEEP).unwrap();
    let first = sweep_json(dir.path());
    println!("{first}");
    let trials = first["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3);
    assert!(trials.iter().all(|t| t["status"] == "complete" && t["objective"].is_number()), "{first}");
    let runs: Vec<&str> = trials.iter().map(|t| t["run"].as_str().unwrap()).collect();
    assert!(runs[0] != runs[1] && runs[1] != runs[2], "three distinct runs: {runs:?}");
    assert_eq!(stages(dir.path(), "tokenize"), 1, "every trial shares one tokenize stage");
    assert_eq!(stages(dir.path(), "train"), 3);
    let record = dir.path().join("runs/sweeps").join(format!("{}.toml", first["sweep"].as_str().unwrap()));
    let record_text = std::fs::read_to_string(&record).unwrap();
    for run in &runs {
        assert!(record_text.contains(run), "the record lists run {run}");
        assert!(dir.path().join("runs").join(format!("{run}.toml")).is_file(), "run record {run}");
    }

    println!("{record_text}\n{}", pipe_ok(dir.path(), &["sweep", "sweep.toml"]));

    // Again: every trial comes from the store; same output, same record bytes.
    assert_eq!(sweep_json(dir.path()), first);
    assert_eq!((stages(dir.path(), "tokenize"), stages(dir.path(), "train")), (1, 3));
    assert_eq!(std::fs::read_to_string(&record).unwrap(), record_text);

    // show and best read the record, by id or by sweep file; the best run reproduces.
    let id = first["sweep"].as_str().unwrap();
    let shown: Value = serde_json::from_str(&pipe_ok(dir.path(), &["sweep", "show", id, "--json"])).unwrap();
    assert_eq!(shown["trials"], first["trials"]);
    assert_eq!(shown["best"], first["best"]);
    let best = pipe_ok(dir.path(), &["sweep", "best", "sweep.toml"]).trim().to_string();
    let best_number = first["best"].as_u64().unwrap() as usize;
    assert_eq!(best, runs[best_number]);
    assert_eq!(pipe_ok(dir.path(), &["sweep", "best", &id[..6]]).trim(), best);
    let reproduced = pipe_ok(dir.path(), &["reproduce", &best]);
    assert!(reproduced.contains("identical"), "{reproduced}");
    let missing = pipe(dir.path(), &["sweep", "best", "abc123"]);
    assert_eq!(missing.status.code(), Some(2), "{}", describe(&["sweep", "best", "abc123"], &missing));

    // More trials: the first three are the same runs.
    std::fs::write(dir.path().join("sweep.toml"), SWEEP.replace("n_trials = 3", "n_trials = 4")).unwrap();
    let extended = sweep_json(dir.path());
    assert_eq!(extended["sweep"], first["sweep"], "n_trials is not part of the sweep's identity");
    let extended_runs: Vec<&str> =
        extended["trials"].as_array().unwrap().iter().map(|t| t["run"].as_str().unwrap()).collect();
    assert_eq!(extended_runs[..3], runs[..]);
    assert_eq!(stages(dir.path(), "train"), 4);
}

#[test]
fn bad_sweep_files_exit_2_with_their_position() {
    let dir = project();
    let cases = [
        (
            SWEEP.replace("n_trials = 3", "n_trial = 3"),
            "sweep.toml:3:1: unknown key `n_trial` in a sweep file; did you mean `n_trials`?",
        ),
        (
            SWEEP.replace("optimizer.lr", "optimizer.lrr"),
            "sweep.toml:7:1: `optimizer.lrr`: unknown key `lrr` in [optimizer]; did you mean `lr`?",
        ),
        (SWEEP.replace("1e-4, 1e-2", "0.0, 1e-2"), "a log scale needs positive bounds"),
        (
            SWEEP.replace("seed = 7", "seed = 7\nparallel = 2"),
            "parallel = 2: this version of pipe runs one trial at a time",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(dir.path().join("sweep.toml"), &text).unwrap();
        let output = pipe(dir.path(), &["sweep", "sweep.toml"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}", describe(&["sweep", "sweep.toml"], &output));
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
        assert!(!dir.path().join("runs").exists(), "bad input stores nothing");
    }
}

#[test]
fn the_example_sweep_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps/quickstart-lr.toml");
    let spec = pipe::sweep::spec::SweepSpec::load_with_env(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.params.len(), 2);
    assert!(spec.objective.maximize);
}
