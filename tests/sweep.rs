//! `pipe sweep` end to end on the tiny project: trials are ordinary runs (tokenize runs once and
//! is shared), running the sweep again reuses every trial and gives the same output and record,
//! `show` and `best` read the record and the best run reproduces, raising n_trials keeps the
//! first trials, and bad sweep files exit 2 with their position.

mod common;

use std::path::Path;

use common::{RunJson, TINY_PIPELINE, describe, pipe, pipe_command, pipe_ok, project, tiny_csv};
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
    // The plan lists the trials before anything runs, and runs nothing.
    let plan = |dir: &Path| -> Value {
        serde_json::from_str(&pipe_ok(dir, &["sweep", "plan", "sweep.toml", "--json"])).unwrap()
    };
    let planned = plan(dir.path());
    assert!(!dir.path().join("runs/stages").exists(), "planning runs nothing");
    let first = sweep_json(dir.path());
    println!("{first}");
    let after = plan(dir.path());
    for k in 0..3 {
        assert_eq!(planned["trials"][k]["status"], "to run");
        assert_eq!(planned["trials"][k]["set"], first["trials"][k]["set"], "the plan is what ran");
        assert_eq!(after["trials"][k]["run"], first["trials"][k]["run"], "and then shows the runs");
    }
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

    // Again: every trial comes from the store (well under the 2 s the issue allows: it only
    // re-hashes stored outputs); same output, same record bytes.
    let again = std::time::Instant::now();
    assert_eq!(sweep_json(dir.path()), first);
    assert!(again.elapsed().as_secs_f64() < 2.0, "a cached sweep took {:?}", again.elapsed());
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
            format!("{SWEEP}\n[pruner]\nmethod = \"asha\"\nreducton = 3\n"),
            "sweep.toml:11:1: unknown key `reducton` for the asha pruner; did you mean `reduction`?",
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
    let spec = pipe::sweep::spec::SweepSpec::load_with_env(&path, &[], &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.params.len(), 4);
    assert_eq!(spec.n_trials, 12);
    assert!(matches!(spec.pruner, pipe::sweep::pruner::Pruner::Asha { min_epochs: 1, reduction: 2 }));
    assert!(spec.base.dataset.test.is_some(), "selection on a split of train, the test file held out");
    assert!(spec.objective.maximize);
}

/// Three epochs and the validation loss (distinct values where the tiny set's accuracy ties).
fn three_epochs(dir: &Path) {
    let text = TINY_PIPELINE
        .replace("epochs = 1", "epochs = 3")
        .replace("metrics = [\"accuracy\", \"f1\"]", "metrics = [\"loss\", \"accuracy\"]");
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
}

/// TPE past its 10 random start-up trials, ASHA halving at epochs 1 and 2.
const PRUNED: &str = "pipeline = \"pipeline.toml\"\nmethod = \"tpe\"\nn_trials = 12\nseed = 5\n\
                      parallel = 1\n\n[pruner]\nmethod = \"asha\"\nreduction = 2\n\n\
                      [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 3e-2] }\n";

/// `pipe sweep sweep.toml --json` with extra environment variables.
fn sweep_with(dir: &Path, env: &[(&str, &str)]) -> Value {
    let output =
        pipe_command(dir, &["sweep", "sweep.toml", "--json"]).envs(env.iter().copied()).output().unwrap();
    assert!(output.status.success(), "{}", describe(&["sweep", "sweep.toml", "--json"], &output));
    let mut json: Value = serde_json::from_slice(&output.stdout).unwrap();
    json.as_object_mut().unwrap().remove("record"); // the store's path
    json
}

fn record_of(dir: &Path, sweep: &Value) -> String {
    let id = sweep["sweep"].as_str().unwrap();
    std::fs::read_to_string(dir.join("runs/sweeps").join(format!("{id}.toml"))).unwrap()
}

#[test]
fn a_pruned_sweep_is_the_same_whatever_the_threads_parallel_or_timing() {
    let one = project();
    three_epochs(one.path());
    std::fs::write(one.path().join("sweep.toml"), PRUNED).unwrap();
    let serial = sweep_with(one.path(), &[("RAYON_NUM_THREADS", "1")]);
    println!("{serial:#}\n{}", record_of(one.path(), &serial));

    let two = project();
    three_epochs(two.path());
    std::fs::write(two.path().join("sweep.toml"), PRUNED.replace("parallel = 1", "parallel = 2")).unwrap();
    // Early trials slowed down, so that later ones end first.
    let delays = [("RAYON_NUM_THREADS", "2"), ("PIPE_SWEEP_DELAYS", "0:900,2:600,4:700,6:500")];
    let parallel = sweep_with(two.path(), &delays);
    assert_eq!(parallel, serial, "the trial list, runs and decisions do not depend on parallel or timing");
    assert_eq!(record_of(two.path(), &parallel), record_of(one.path(), &serial), "byte-identical records");
    let plots = |dir: &Path| dir.join("runs/sweeps").join(serial["sweep"].as_str().unwrap());
    for file in ["history.png", "history.svg", "parallel.png", "parallel.svg"] {
        let (a, b) = (
            std::fs::read(plots(one.path()).join(file)).unwrap(),
            std::fs::read(plots(two.path()).join(file)).unwrap(),
        );
        assert!(a == b, "{file}: the same sweep draws the same bytes");
    }
    let history = std::fs::read_to_string(plots(one.path()).join("history.svg")).unwrap();
    assert!(history.contains("best so far") && history.contains("pruned (where it stopped)"), "{history}");
    let parallel_svg = std::fs::read_to_string(plots(one.path()).join("parallel.svg")).unwrap();
    assert!(parallel_svg.contains("optimizer.lr") && parallel_svg.contains("(log)"), "{parallel_svg}");

    let trials = serial["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 12);
    let status = |s: &str| trials.iter().filter(|t| t["status"] == s).count();
    assert!(status("pruned") >= 4 && status("complete") >= 2, "ASHA halves at each rung: {serial}");
    let epochs: u64 = trials.iter().map(|t| t["epochs"].as_u64().unwrap()).sum();
    assert!(epochs < 12 * 3, "pruned trials train fewer epochs ({epochs} of 36)");
    // Pruned trials leave no checkpoint behind; complete ones removed theirs when they committed.
    let work = std::fs::read_dir(one.path().join("runs/tmp")).map_or(0, |d| {
        d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("train-")).count()
    });
    assert_eq!(work, 0, "no training checkpoints left in runs/tmp");

    // A pruned trial is the run that `pipe run` gives with its --sets and its stop epoch.
    let pruned = trials.iter().find(|t| t["status"] == "pruned").unwrap();
    let mut args = vec!["run".to_string(), "pipeline.toml".into(), "--json".into()];
    for set in pruned["set"].as_array().unwrap() {
        args.extend(["--set".into(), set.as_str().unwrap().to_string()]);
    }
    args.extend(["--set".into(), format!("train.stop_after_epoch={}", pruned["epochs"])]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fresh = project();
    three_epochs(fresh.path());
    assert_eq!(RunJson::parse(&pipe_ok(fresh.path(), &args)).run, pruned["run"].as_str().unwrap());

    // The best trial trained in pieces (rung by rung, each resuming the last) and still has the
    // bits of one uninterrupted run.
    let best = pipe_ok(one.path(), &["sweep", "best", "sweep.toml"]).trim().to_string();
    let reproduced = pipe_ok(one.path(), &["reproduce", &best]);
    assert!(reproduced.contains("identical"), "{reproduced}");
}

#[test]
fn a_median_pruned_random_sweep_is_the_same_run_in_parallel() {
    // The median rule reads which earlier trials completed, so its decisions wait for them; the
    // random sampler lets every trial start at once.
    let text = PRUNED
        .replace("\"tpe\"", "\"random\"")
        .replace("n_trials = 12", "n_trials = 8")
        .replace("method = \"asha\"\nreduction = 2", "method = \"median\"\nstartup = 2");
    let run = |parallel: &str, env: &[(&str, &str)]| {
        let dir = project();
        three_epochs(dir.path());
        std::fs::write(dir.path().join("sweep.toml"), text.replace("parallel = 1", parallel)).unwrap();
        let json = sweep_with(dir.path(), env);
        (record_of(dir.path(), &json), json)
    };
    let (serial_record, serial) = run("parallel = 1", &[("RAYON_NUM_THREADS", "1")]);
    let (parallel_record, parallel) =
        run("parallel = 2", &[("RAYON_NUM_THREADS", "2"), ("PIPE_SWEEP_DELAYS", "0:800,1:400,3:600")]);
    assert_eq!(parallel, serial);
    assert_eq!(parallel_record, serial_record);
    let pruned = serial["trials"].as_array().unwrap().iter().filter(|t| t["status"] == "pruned").count();
    assert!(pruned >= 1, "the median rule stops some trial: {serial}");
}

#[test]
fn a_killed_sweep_resumes_to_the_same_record() {
    const FOUR: &str = "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 4\nseed = 9\n\n\
                        [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 3e-2] }\n";
    let whole = project();
    three_epochs(whole.path());
    std::fs::write(whole.path().join("sweep.toml"), FOUR).unwrap();
    let uninterrupted = sweep_with(whole.path(), &[]);

    let dir = project();
    three_epochs(dir.path());
    std::fs::write(dir.path().join("sweep.toml"), FOUR).unwrap();
    // Checkpoints are saved after epochs 1 and 2 of each trial: the fifth is trial 3's first.
    let killed = pipe_command(dir.path(), &["sweep", "sweep.toml"])
        .env("PIPE_FAULT", "checkpoint.saved#5")
        .output()
        .unwrap();
    assert!(!killed.status.success(), "{}", describe(&["sweep"], &killed));
    let partial = record_of(dir.path(), &uninterrupted);
    assert_eq!(partial.matches("[[trials]]").count(), 2, "two trials were recorded:\n{partial}");

    let output = pipe_command(dir.path(), &["sweep", "sweep.toml"]).output().unwrap();
    assert!(output.status.success(), "{}", describe(&["sweep"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("resuming from checkpoint"), "trial 3 resumes from its checkpoint:\n{stderr}");
    let resumed = sweep_with(dir.path(), &[]);
    assert_eq!(resumed, uninterrupted);
    assert_eq!(record_of(dir.path(), &resumed), record_of(whole.path(), &uninterrupted));
    assert_eq!(stages(dir.path(), "train"), 4);

    // Raising n_trials from 4 to 6 keeps the first four runs.
    std::fs::write(dir.path().join("sweep.toml"), FOUR.replace("n_trials = 4", "n_trials = 6")).unwrap();
    let six = sweep_with(dir.path(), &[]);
    let runs = |v: &Value| -> Vec<String> {
        v["trials"].as_array().unwrap().iter().map(|t| t["run"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(runs(&six)[..4], runs(&uninterrupted)[..]);
    assert_eq!(stages(dir.path(), "train"), 6);
}

#[test]
fn a_held_out_test_split_is_reported_and_never_steers_the_sweep() {
    // Two projects alike but for their test split's labels: every sweep decision is the same.
    let with_test = |flip: bool| {
        let dir = project();
        let test = tiny_csv(16, 11, false);
        let test = if flip {
            test.replace(",pos", ",tmp").replace(",neg", ",pos").replace(",tmp", ",neg")
        } else {
            test
        };
        std::fs::write(dir.path().join("data/test.csv"), test).unwrap();
        let pipeline = TINY_PIPELINE.replace(
            "validation = \"data/validation.csv\"",
            "validation = \"data/validation.csv\"\ntest = \"data/test.csv\"",
        );
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).unwrap();
        std::fs::write(dir.path().join("sweep.toml"), SWEEP.replace("\"random\"", "\"tpe\"")).unwrap();
        dir
    };
    let (a, b) = (with_test(false), with_test(true));
    let (sweep_a, sweep_b) = (sweep_with(a.path(), &[]), sweep_with(b.path(), &[]));
    let decisions = |v: &Value| -> Vec<(Value, Value, Value)> {
        v["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["set"].clone(), t["objective"].clone(), t["status"].clone()))
            .collect()
    };
    assert_eq!(
        decisions(&sweep_a),
        decisions(&sweep_b),
        "the test split changes no proposal and no objective"
    );
    assert_eq!(sweep_a["best"], sweep_b["best"]);
    let (test_a, test_b) = (&sweep_a["best_test_metrics"], &sweep_b["best_test_metrics"]);
    let accuracy = |t: &Value| t["accuracy"].as_f64().unwrap();
    assert!((accuracy(test_a) + accuracy(test_b) - 1.0).abs() < 1e-9, "flipped labels: {test_a} {test_b}");

    // `pipe sweep show` puts the selected validation value and the held-out test value side by side.
    let shown = pipe_ok(a.path(), &["sweep", "show", "sweep.toml"]);
    assert!(
        shown.contains("(selected on)") && shown.contains(&format!("test accuracy {:.4}", accuracy(test_a))),
        "{shown}"
    );
    let shown_json: Value =
        serde_json::from_str(&pipe_ok(a.path(), &["sweep", "show", "sweep.toml", "--json"])).unwrap();
    assert_eq!(&shown_json["best_test_metrics"], test_a);

    // The run record has the test metrics; `pipe show` prints them; a label the training data
    // lacks is bad input naming the file.
    let best = pipe_ok(a.path(), &["sweep", "best", "sweep.toml"]).trim().to_string();
    let record = std::fs::read_to_string(a.path().join("runs").join(format!("{best}.toml"))).unwrap();
    assert!(record.contains("[test_metrics]"), "{record}");
    assert!(pipe_ok(a.path(), &["show", &best]).contains("held-out test split"));
    std::fs::write(a.path().join("data/test.csv"), "text,label\nsome words,maybe\n").unwrap();
    let output = pipe(a.path(), &["run", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&["run"], &output));
    assert!(stderr.contains("test.csv"), "{stderr}");
    // A test split that repeats validation rows is not held out from selection: said so.
    std::fs::copy(a.path().join("data/validation.csv"), a.path().join("data/test.csv")).unwrap();
    let output = pipe(a.path(), &["run", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}", describe(&["run"], &output));
    assert!(stderr.contains("12 of 12 test rows also occur in the validation data"), "{stderr}");
}
