//! Reproducibility and resumable training, through the `pipe` binary on the tiny project of
//! `common::tiny_project` (a random 2-layer BERT, 48 training rows; a whole pipeline runs in about
//! a second): the same bits with 1 and 2 threads, `pipe reproduce` from a record alone and what it
//! says when a stored file or an input changed, training killed (SIGKILL) or interrupted (SIGINT)
//! and resumed to the same model, and `pipe show --config` / `pipe diff`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    STAGES, change_one_byte_of_the_rows, describe, pipe, pipe_command, pipe_ok, project, recorded_digest,
    run_json, run_json_env,
};

/// Epochs that make training last a few seconds: 100 epochs of 6 steps (48 rows, batch 8), with a
/// checkpoint at the end of every epoch.
const LONG_EPOCHS: &str = "train.epochs=100";
const LONG_TOTAL_STEPS: u64 = 600;
const STEPS_PER_EPOCH: u64 = 6;

// --- Run records ---------------------------------------------------------------------------------

/// One `[[stages]]` entry of a run record.
#[derive(Debug, Clone, PartialEq)]
struct RecordedStage {
    name: String,
    key: String,
    digest: String,
    /// `[stages.files]`: output path -> sha256.
    files: BTreeMap<String, String>,
}

fn read_record(store: &Path, run: &str) -> toml::Table {
    let path = store.join(format!("{run}.toml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: not TOML: {e}", path.display()))
}

/// The `[[stages]]` of the record `<store>/<run>.toml`, in order.
fn recorded_stages(store: &Path, run: &str) -> Vec<RecordedStage> {
    let record = read_record(store, run);
    let where_ = format!("{}/{run}.toml", store.display());
    let stages = record.get("stages").and_then(toml::Value::as_array);
    let stages = stages.unwrap_or_else(|| panic!("no [[stages]] in {where_}"));
    stages
        .iter()
        .map(|s| {
            let text = |k: &str| {
                s.get(k)
                    .and_then(toml::Value::as_str)
                    .unwrap_or_else(|| panic!("a stage without a string `{k}` in {where_}: {s}"))
                    .to_string()
            };
            let files = s
                .get("files")
                .and_then(toml::Value::as_table)
                .unwrap_or_else(|| panic!("a stage without [stages.files] in {where_}: {s}"))
                .iter()
                .map(|(p, d)| {
                    let d = d
                        .as_str()
                        .unwrap_or_else(|| panic!("file digest of {p} is not a string in {where_}"));
                    (p.clone(), d.to_string())
                })
                .collect();
            RecordedStage { name: text("name"), key: text("key"), digest: text("digest"), files }
        })
        .collect()
}

// --- Processes -----------------------------------------------------------------------------------

/// stdout and stderr of a finished command, together (for "the output names ...").
fn all_output(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `runs/tmp/train-*/checkpoint/checkpoint.safetensors`, if some training run has written one.
fn checkpoint_in(store: &Path) -> Option<PathBuf> {
    std::fs::read_dir(store.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("train-"))
        .map(|e| e.path().join("checkpoint/checkpoint.safetensors"))
        .find(|p| p.is_file())
}

/// Waits until the child (a `pipe run` into `store`) has written its first training checkpoint,
/// so that it is in the middle of training; panics with its stderr if it ends first.
fn wait_for_checkpoint(child: &mut Child, store: &Path) -> PathBuf {
    let started = Instant::now();
    loop {
        if let Some(path) = checkpoint_in(store) {
            return path;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!(
                "`pipe run` ended ({status}) before a {}/tmp/train-*/checkpoint/checkpoint.safetensors \
                 appeared\nstderr:\n{stderr}",
                store.display()
            );
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no training checkpoint after 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `N` of the first `<prefix>N` in `text`.
fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let at = text.find(prefix)? + prefix.len();
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `N` of `resuming from checkpoint at step N/<total>` in a run's stderr; panics with the whole
/// output when there is none or `<total>` is not the run's 600 steps.
fn resumed_step(args: &[&str], output: &Output) -> u64 {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let prefix = "resuming from checkpoint at step ";
    let step = number_after(&stderr, prefix)
        .unwrap_or_else(|| panic!("the rerun did not say `{prefix}N/...`\n{}", describe(args, output)));
    assert!(
        stderr.contains(&format!("{prefix}{step}/{LONG_TOTAL_STEPS}")),
        "the rerun should resume at step {step} of {LONG_TOTAL_STEPS}\n{}",
        describe(args, output)
    );
    step
}

/// The run id on the closing `run <id>  ...` line of `pipe run` (without `--json`).
fn summary_run_id(args: &[&str], output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("run ")?.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("no `run <id>` line in stdout\n{}", describe(args, output)))
}

/// The train stage of an uninterrupted `LONG_EPOCHS` run, computed once for the whole file.
struct Reference {
    run: String,
    train_digest: String,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = project();
        let clean = run_json(dir.path(), &["--set", LONG_EPOCHS, "--store", "clean"]);
        assert_eq!(clean.statuses(), ["ran"; 3], "the uninterrupted reference run: {clean:?}");
        let train_digest = recorded_digest(&dir.path().join("clean"), &clean.run, "train");
        Reference { run: clean.run, train_digest }
    })
}

/// Every path below `dir`, relative and sorted (empty when `dir` does not exist).
fn tree(dir: &Path) -> Vec<String> {
    let mut paths: Vec<String> =
        walk(dir).into_iter().map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned()).collect();
    paths.sort();
    paths
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// `tmp/reproduce-*` entries left in a store.
fn reproduce_leftovers(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("reproduce-"))
        .collect()
}

/// Asserts that `pipe reproduce` said `identical` for every stage and `reproduced bit for bit`.
fn assert_reproduced(args: &[&str], output: &Output) {
    assert!(output.status.success(), "`pipe reproduce` failed\n{}", describe(args, output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for stage in STAGES {
        let identical = stdout.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words == [stage, "identical"]
        });
        assert!(identical, "no `{stage} identical` line\n{}", describe(args, output));
    }
    assert!(
        stdout.contains("reproduced bit for bit"),
        "no `reproduced bit for bit`\n{}",
        describe(args, output)
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn two_empty_stores_give_identical_runs_with_1_and_2_threads() {
    let dir = project();
    let a = run_json_env(dir.path(), &["--store", "a"], &[("RAYON_NUM_THREADS", "1")]);
    let b = run_json_env(dir.path(), &["--store", "b"], &[("RAYON_NUM_THREADS", "2")]);
    assert_eq!(a.statuses(), ["ran"; 3], "store a starts empty: {a:?}");
    assert_eq!(b.statuses(), ["ran"; 3], "store b starts empty: {b:?}");
    assert_eq!(a.run, b.run, "run ids with 1 and 2 threads");
    assert_eq!(a.keys(), b.keys(), "stage keys with 1 and 2 threads");

    // The thread counts really took effect (the record notes them), or the test proves nothing.
    for (store, run, threads) in [("a", &a.run, 1), ("b", &b.run, 2)] {
        let record = read_record(&dir.path().join(store), run);
        let recorded =
            record.get("environment").and_then(|e| e.get("threads")).and_then(toml::Value::as_integer);
        assert_eq!(recorded, Some(threads), "environment.threads in {store}/{run}.toml");
    }

    let ra = recorded_stages(&dir.path().join("a"), &a.run);
    let rb = recorded_stages(&dir.path().join("b"), &b.run);
    let names = |r: &[RecordedStage]| r.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ra), STAGES, "stages recorded in a/{}.toml", a.run);
    assert_eq!(names(&rb), STAGES, "stages recorded in b/{}.toml", b.run);
    let mut differences = Vec::new();
    for (sa, sb) in ra.iter().zip(&rb) {
        assert!(!sa.files.is_empty(), "{} records no output files in a/{}.toml", sa.name, a.run);
        if sa.digest != sb.digest {
            differences
                .push(format!("{}: digest {} (1 thread) vs {} (2 threads)", sa.name, sa.digest, sb.digest));
        }
        let paths: std::collections::BTreeSet<&String> = sa.files.keys().chain(sb.files.keys()).collect();
        for path in paths {
            let (da, db) = (sa.files.get(path), sb.files.get(path));
            if da != db {
                differences.push(format!("{}: {path}: {da:?} (1 thread) vs {db:?} (2 threads)", sa.name));
            }
        }
    }
    assert!(differences.is_empty(), "the runs with 1 and 2 threads differ:\n  {}", differences.join("\n  "));
}

#[test]
fn reproduce_reports_identical() {
    let dir = project();
    let run = run_json(dir.path(), &["--store", "a"]).run;
    let prefix = &run[..6];

    // A colleague who pulled only the record from git.
    let colleague = dir.path().join("colleague");
    std::fs::create_dir(&colleague).unwrap();
    let record = format!("{run}.toml");
    std::fs::copy(dir.path().join("a").join(&record), colleague.join(&record)).unwrap();
    let args = ["reproduce", prefix, "--store", "colleague"];
    assert_reproduced(&args, &pipe(dir.path(), &args));
    assert_eq!(reproduce_leftovers(&colleague), Vec::<String>::new(), "scratch left in colleague/tmp");

    // The original store, whose stored copies are checked as well.
    let args = ["reproduce", prefix, "--store", "a"];
    assert_reproduced(&args, &pipe(dir.path(), &args));
    assert_eq!(reproduce_leftovers(&dir.path().join("a")), Vec::<String>::new(), "scratch left in a/tmp");
}

#[test]
fn reproduce_names_a_tampered_stored_model_file() {
    let dir = project();
    let first = run_json(dir.path(), &["--store", "a"]);
    let weights = dir.path().join("a/stages/train").join(first.key("train")).join("model/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();

    let args = ["reproduce", &first.run, "--store", "a"];
    let output = pipe(dir.path(), &args);
    let text = all_output(&output);
    assert!(
        !output.status.success(),
        "reproduce succeeded with a tampered stored model\n{}",
        describe(&args, &output)
    );
    assert!(
        text.contains("model/model.safetensors"),
        "the output should name model/model.safetensors\n{}",
        describe(&args, &output)
    );
    assert!(!text.contains("reproduced bit for bit"), "claims success\n{}", describe(&args, &output));
    assert_eq!(reproduce_leftovers(&dir.path().join("a")), Vec::<String>::new(), "scratch left in a/tmp");
}

#[test]
fn reproduce_names_an_edited_dataset_before_running() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    change_one_byte_of_the_rows(&dir.path().join("data/train.csv"));

    let store = dir.path().join("runs");
    let before = tree(&store);
    let args = ["reproduce", &first.run];
    let output = pipe(dir.path(), &args);
    let text = all_output(&output);
    assert!(
        !output.status.success(),
        "reproduce succeeded on an edited dataset\n{}",
        describe(&args, &output)
    );
    assert!(
        text.contains("dataset.train"),
        "the output should name dataset.train\n{}",
        describe(&args, &output)
    );
    assert!(
        text.contains("nothing was run"),
        "the output should say nothing was run\n{}",
        describe(&args, &output)
    );
    assert!(!text.contains("reproduced bit for bit"), "claims success\n{}", describe(&args, &output));
    // No stage started: no progress line, no verdict per stage, the store as it was.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("running"), "a stage ran\n{}", describe(&args, &output));
    assert!(
        !text.contains("identical") && !text.contains("DIFFERS"),
        "stages were compared, so they were run\n{}",
        describe(&args, &output)
    );
    assert_eq!(tree(&store), before, "the store changed although nothing should have run");
}

#[test]
fn sigkill_mid_training_resumes_from_the_last_checkpoint_to_the_same_bits() {
    let dir = project();
    let store = dir.path().join("runs");
    let args = ["run", "pipeline.toml", "--set", LONG_EPOCHS];
    let mut child =
        pipe_command(dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_checkpoint(&mut child, &store);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "training finished within 200 ms of its first checkpoint; raise LONG_EPOCHS"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(checkpoint_in(&store).is_some(), "the checkpoint did not survive the kill");

    let rerun = pipe(dir.path(), &args);
    assert!(rerun.status.success(), "the run after the kill failed\n{}", describe(&args, &rerun));
    let step = resumed_step(&args, &rerun);
    assert!(
        step > 0 && step < LONG_TOTAL_STEPS && step.is_multiple_of(STEPS_PER_EPOCH),
        "resumed at step {step}: expected an epoch end (a multiple of {STEPS_PER_EPOCH}) in 1..{LONG_TOTAL_STEPS}\n{}",
        describe(&args, &rerun)
    );
    let run = summary_run_id(&args, &rerun);
    let reference = reference();
    assert_eq!(
        recorded_digest(&store, &run, "train"),
        reference.train_digest,
        "the model trained after the kill (resumed at step {step}) differs from an uninterrupted run's"
    );
    assert_eq!(run, reference.run, "the run id after the kill vs. an uninterrupted run's");
}

#[test]
fn sigint_checkpoints_exits_130_and_resumes() {
    let dir = project();
    let store = dir.path().join("runs");
    let args = ["run", "pipeline.toml", "--set", LONG_EPOCHS];
    let mut child =
        pipe_command(dir.path(), &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_checkpoint(&mut child, &store);
    assert!(child.try_wait().unwrap().is_none(), "training finished before it could be interrupted");

    let pid = child.id() as libc::pid_t;
    // SAFETY: sends a signal to our own child, which has not been reaped (try_wait said it runs).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0, "kill(SIGINT) failed");
    let sent = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if sent.elapsed() > Duration::from_secs(5) {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!("`pipe run` still ran 5 s after SIGINT\n{}", describe(&args, &output));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "exit code after SIGINT\n{}", describe(&args, &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let saved = number_after(&stderr, "checkpoint saved at step ")
        .unwrap_or_else(|| panic!("stderr should name the checkpoint step\n{}", describe(&args, &output)));
    assert!(saved > 0 && saved < LONG_TOTAL_STEPS, "checkpoint step {saved}\n{}", describe(&args, &output));
    assert!(checkpoint_in(&store).is_some(), "no checkpoint in runs/tmp after SIGINT");

    let rerun = pipe(dir.path(), &args);
    assert!(rerun.status.success(), "the run after SIGINT failed\n{}", describe(&args, &rerun));
    let step = resumed_step(&args, &rerun);
    assert_eq!(step, saved, "the rerun resumed at another step than the one SIGINT saved");
    let run = summary_run_id(&args, &rerun);
    let reference = reference();
    assert_eq!(
        recorded_digest(&store, &run, "train"),
        reference.train_digest,
        "the model trained after SIGINT (resumed at step {step}) differs from an uninterrupted run's"
    );
    assert_eq!(run, reference.run, "the run id after SIGINT vs. an uninterrupted run's");
}

#[test]
fn show_config_and_diff() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    let second = run_json(dir.path(), &["--set", "optimizer.lr=0.002"]);
    assert_ne!(first.run, second.run, "changing optimizer.lr must change the run");

    let shown = pipe_ok(dir.path(), &["show", &second.run[..6], "--config"]);
    let config: toml::Table =
        toml::from_str(&shown).unwrap_or_else(|e| panic!("`pipe show --config` is not TOML ({e}):\n{shown}"));
    let lr = config.get("optimizer").and_then(|o| o.get("lr")).and_then(toml::Value::as_float);
    assert_eq!(lr, Some(0.002), "optimizer.lr in `pipe show --config` of the second run:\n{shown}");

    let diff = pipe_ok(dir.path(), &["diff", &first.run, &second.run]);
    let lines: Vec<&str> = diff.lines().map(str::trim).collect();
    let lr_line = lines
        .iter()
        .find(|l| l.starts_with("optimizer.lr"))
        .unwrap_or_else(|| panic!("`pipe diff` has no optimizer.lr line:\n{diff}"));
    // `optimizer.lr: <first> -> <second>`, whatever the float formatting.
    let values: Vec<f64> = lr_line
        .trim_start_matches("optimizer.lr")
        .trim_start_matches(':')
        .split("->")
        .map(|v| v.trim().parse().unwrap_or_else(|e| panic!("{v:?} in {lr_line:?}: {e}\n{diff}")))
        .collect();
    assert_eq!(values, [0.001, 0.002], "the values on {lr_line:?}:\n{diff}");
    let parameters: Vec<&&str> =
        lines.iter().skip(1).filter(|l| !l.is_empty() && !l.starts_with("metric ")).collect();
    assert_eq!(parameters, [lr_line], "optimizer.lr is the only parameter that differs:\n{diff}");
    assert!(
        lines.iter().any(|l| l.starts_with("metric accuracy")),
        "`pipe diff` has no accuracy line:\n{diff}"
    );
}
