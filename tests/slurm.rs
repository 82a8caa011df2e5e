//! The Slurm executor against a real one-node cluster on the loopback address (Debian's slurmctld,
//! slurmd and munge, started by `scripts/slurm-cluster.sh`, which `scripts/test.sh` runs).
//!
//! The cluster tests need `SLURM_CONF` and `TEST_SLURM_DIR`; without them they print SKIPPED,
//! except under CI (`CI` set), where they fail.

mod common;

use std::path::Path;

use common::*;

/// Whether a cluster is up (SKIPPED when not, outside CI).
fn cluster() -> bool {
    match (std::env::var_os("SLURM_CONF"), std::env::var_os("TEST_SLURM_DIR")) {
        (Some(_), Some(_)) => true,
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "CI must run the Slurm tests: scripts/test.sh starts the cluster (scripts/slurm-cluster.sh)"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED: no Slurm cluster (set SLURM_CONF and TEST_SLURM_DIR; see scripts/slurm-cluster.sh)"
            );
            false
        }
    }
}

fn digests(dir: &Path, run: &str) -> Vec<String> {
    STAGES.iter().map(|stage| recorded_digest(&dir.join("runs"), run, stage)).collect()
}

#[test]
fn a_pipeline_run_as_slurm_jobs_gives_the_local_run_id_and_digests() {
    if !cluster() {
        return;
    }
    let local = project();
    let reference = run_json(local.path(), &[]);
    let dir = project();
    let args = ["run", "pipeline.toml", "--json", "--executor", "slurm"];
    let output = pipe(dir.path(), &args);
    assert!(output.status.success(), "{}", describe(&args, &output));
    let on_slurm = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(on_slurm.run, reference.run);
    assert_eq!(on_slurm.statuses(), ["cached"; 3], "the jobs ran every stage; the driver only records");
    assert_eq!(digests(dir.path(), &on_slurm.run), digests(local.path(), &reference.run));
    // One job per stage, each with its log, chained: tokenize, then train, then evaluate.
    let stderr = String::from_utf8_lossy(&output.stderr);
    for stage in STAGES {
        assert!(stderr.contains(&format!("{stage:<9} submitted as Slurm job")), "{stderr}");
    }
    let logs: Vec<_> =
        std::fs::read_dir(dir.path().join("runs/slurm")).unwrap().filter_map(Result::ok).collect();
    assert_eq!(logs.len(), 3, "{logs:?}");
}

#[test]
fn a_failing_job_fails_the_run_with_its_log() {
    if !cluster() {
        return;
    }
    let dir = project();
    // Valid for the driver, fatal for the train job: the model it reads is gone by then.
    let args = ["run", "pipeline.toml", "--executor", "slurm", "--sbatch-arg=--begin=now+1"];
    let mut child = pipe_command(dir.path(), &args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Once every job is submitted (the driver has hashed its inputs), the model goes bad.
    let mut stderr = String::new();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    for line in lines.by_ref() {
        let line = line.unwrap();
        stderr.push_str(&line);
        stderr.push('\n');
        if line.contains("evaluate  submitted") {
            break;
        }
    }
    std::fs::write(dir.path().join("model/model.safetensors"), b"not a model").unwrap();
    for line in lines {
        stderr.push_str(&line.unwrap());
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ended FAILED") && stderr.contains("its log: "), "{stderr}");
    let log = stderr.split("its log: ").nth(1).unwrap().lines().next().unwrap().trim();
    assert!(Path::new(log).is_file(), "{log}");
}

#[test]
fn without_sbatch_the_slurm_executor_exits_2_naming_it() {
    let dir = project();
    let mut command = pipe_command(dir.path(), &["run", "pipeline.toml", "--executor", "slurm"]);
    let output = command.env("PATH", "/nonexistent").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sbatch") && stderr.contains("not found on PATH"), "{stderr}");
    assert!(!dir.path().join("runs/stages").exists(), "nothing ran");
}

#[test]
fn a_dry_run_prints_the_batch_scripts_and_submits_nothing() {
    let dir = project();
    let args = [
        "run",
        "pipeline.toml",
        "--executor",
        "slurm",
        "--dry-run",
        "--partition",
        "gpu",
        "--time",
        "1:00:00",
        "--gpus",
        "1",
        "--sbatch-arg=--account=ml",
        "--set",
        "train.epochs=2",
    ];
    let out = pipe_ok(dir.path(), &args);
    assert_eq!(out.matches("#!/bin/sh").count(), 3, "{out}");
    for line in
        ["#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --account=ml"]
    {
        assert_eq!(out.matches(line).count(), 3, "`{line}` in each script: {out}");
    }
    assert_eq!(out.matches("--dependency=afterok:").count(), 2, "{out}");
    assert!(out.contains("--set train.epochs=2 --store") && out.contains("--until evaluate"), "{out}");
    assert!(!dir.path().join("runs/stages").exists(), "nothing ran");
    // A sweep: the tokenize job, then the array of its trials, two at a time.
    sweep_file(dir.path(), 15);
    let out = pipe_ok(dir.path(), &["sweep", "sweep.toml", "--executor", "slurm", "--dry-run"]);
    assert_eq!(out.matches("#!/bin/sh").count(), 2, "{out}");
    assert!(out.contains("#SBATCH --array=0,1,2,3,4,5%2") && out.contains("sweep trial"), "{out}");
    assert!(out.contains("--trial 0 --until tokenize"), "{out}");
    assert!(!dir.path().join("runs/stages").exists(), "nothing ran");
}

/// A 6-trial random sweep of the tiny pipeline, with its own seed (so that tests running at once
/// submit jobs of different names).
fn sweep_file(dir: &Path, seed: u64) {
    let sweep = format!(
        "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 6\nseed = {seed}\nparallel = 2\n\n\
         [params]\n\"optimizer.lr\" = {{ log_uniform = [1e-4, 1e-2] }}\n"
    );
    std::fs::write(dir.join("sweep.toml"), sweep).unwrap();
}

/// `pipe sweep show ID --json` and the bytes of the sweep's record (the only one in the store).
fn sweep_outcome(dir: &Path) -> (String, Vec<u8>) {
    let records: Vec<_> = std::fs::read_dir(dir.join("runs/sweeps"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .collect();
    assert_eq!(records.len(), 1);
    let id = records[0].path().file_stem().unwrap().to_string_lossy().into_owned();
    let show = pipe_ok(dir, &["sweep", "show", &id, "--json"]);
    (show, std::fs::read(records[0].path()).unwrap())
}

/// Distinct jobs Slurm accepted whose name starts with `prefix` (an array counts once).
fn jobs_named(prefix: &str) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("scontrol").args(["show", "jobs", "-o"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace().any(|f| f.strip_prefix("JobName=").is_some_and(|n| n.starts_with(prefix)))
        })
        .filter_map(|l| {
            let field =
                |name: &str| l.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_string);
            field("ArrayJobId=").or_else(|| field("JobId="))
        })
        .collect()
}

#[test]
fn a_random_sweep_on_slurm_gives_the_local_record_byte_for_byte() {
    if !cluster() {
        return;
    }
    let local = project();
    sweep_file(local.path(), 11);
    pipe_ok(local.path(), &["sweep", "sweep.toml", "--json"]);
    let dir = project();
    sweep_file(dir.path(), 11);
    let args = ["sweep", "sweep.toml", "--json", "--executor", "slurm"];
    let output = pipe(dir.path(), &args);
    assert!(output.status.success(), "{}", describe(&args, &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("6 trial(s) submitted as Slurm job array"), "{stderr}");
    assert_eq!(sweep_outcome(dir.path()), sweep_outcome(local.path()));
}

#[test]
fn a_cancelled_trial_job_is_submitted_again_resumes_from_its_checkpoint_and_the_record_is_unchanged() {
    if !cluster() {
        return;
    }
    // Two trials long enough (4,000 rows, 10 epochs: seconds) to be cancelled while they train.
    let sweep = "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 2\nseed = 12\nparallel = 2\n\n\
                 [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 1e-2] }\n";
    let setup = |dir: &Path| {
        std::fs::write(dir.join("data/train.csv"), tiny_csv(4000, 1, false)).unwrap();
        std::fs::write(dir.join("sweep.toml"), sweep).unwrap();
    };
    let local = project();
    setup(local.path());
    let args = ["sweep", "sweep.toml", "--set", "train.epochs=10"];
    pipe_ok(local.path(), &args);
    let dir = project();
    setup(dir.path());
    let mut args = args.to_vec();
    args.extend(["--executor", "slurm"]);
    let mut driver = pipe_command(dir.path(), &args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Trial 0's task, once it has trained for a while.
    let mut running_since = None;
    let task = loop {
        let out = std::process::Command::new("squeue").args(["-h", "-o", "%i %T %j"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ours = |l: &&str| l.contains("RUNNING") && l.ends_with("-trial") && l.contains("pipe-sweep-");
        let trial0 = text.lines().filter(ours).find(|l| l.split(' ').next().unwrap().ends_with("_0"));
        if let Some(line) = trial0 {
            let since = *running_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > std::time::Duration::from_millis(2500) {
                break line.split(' ').next().unwrap().to_string();
            }
        }
        assert!(driver.try_wait().unwrap().is_none(), "the driver ended before trial 0 was cancelled");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(std::process::Command::new("scancel").arg(&task).status().unwrap().success());
    let output = driver.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let again = format!("trial 0: job {task} ended CANCELLED; submitted again as job");
    let line = stderr.lines().find(|l| l.contains(&again)).unwrap_or_else(|| panic!("{stderr}"));
    // The job that took over went on from the checkpoint the cancelled one left.
    let log = line.split("(log: ").nth(1).unwrap().trim_end_matches(')');
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("resuming from checkpoint at step"), "{log}");
    assert_eq!(sweep_outcome(dir.path()), sweep_outcome(local.path()));
}

#[test]
fn a_killed_driver_re_attaches_and_submits_nothing_twice() {
    if !cluster() {
        return;
    }
    let local = project();
    sweep_file(local.path(), 13);
    pipe_ok(local.path(), &["sweep", "sweep.toml"]);
    let dir = project();
    sweep_file(dir.path(), 13);
    let args = ["sweep", "sweep.toml", "--executor", "slurm"];
    let delays = ("PIPE_SWEEP_DELAYS", "0:1500,1:1500,2:1500");
    let mut driver = pipe_command(dir.path(), &args)
        .env(delays.0, delays.1)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(driver.stderr.take().unwrap()));
    let submitted = lines.by_ref().map(|l| l.unwrap()).find(|l| l.contains("submitted as Slurm job array"));
    let name = submitted.expect("the array is submitted").to_string();
    driver.kill().unwrap(); // SIGKILL
    driver.wait().unwrap();
    let again = pipe_command(dir.path(), &args).env(delays.0, delays.1).output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("re-attached to the tokenize job")
            && stderr.contains("re-attached to the trials' job array"),
        "{stderr}"
    );
    assert!(!stderr.contains("submitted as"), "nothing is submitted again: {stderr}");
    let sweep = name.split("logs: ").nth(1).unwrap();
    let prefix =
        Path::new(sweep).file_name().unwrap().to_string_lossy().split("-trial").next().unwrap().to_string();
    assert_eq!(jobs_named(&format!("pipe-{prefix}")).len(), 2, "one tokenize job and one array, once each");
    assert_eq!(sweep_outcome(dir.path()), sweep_outcome(local.path()));
}

#[test]
fn a_node_that_fails_every_job_is_excluded_after_k_failures() {
    if !cluster() {
        return;
    }
    let dir = project();
    sweep_file(dir.path(), 14);
    // Every trial job dies in its train stage (the tokenize job is fine).
    let args = ["sweep", "sweep.toml", "--executor", "slurm", "--exclude-after", "2"];
    let output =
        pipe_command(dir.path(), &args).env("PIPE_FAULT", "store.outputs-hashed:train").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let node = std::process::Command::new("hostname").arg("-s").output().unwrap();
    let node = String::from_utf8_lossy(&node.stdout).trim().to_string();
    assert!(stderr.contains(&format!("node {node} failed 2 jobs in a row: excluded")), "{stderr}");
    // One node only: once it is excluded, Slurm has nowhere to run the trials again.
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("excluded nodes: {node}")), "{stderr}");
}

#[test]
fn a_pruned_sweeps_continuations_run_as_jobs_to_the_local_record() {
    if !cluster() {
        return;
    }
    // Trials run to their first rung in the array; those the pruner keeps go on in jobs of their own.
    let sweep = "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 4\nseed = 16\nparallel = 2\n\n\
                 [pruner]\nmethod = \"asha\"\nreduction = 2\n\n\
                 [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 3e-2] }\n";
    let args = ["sweep", "sweep.toml", "--set", "train.epochs=4"];
    let local = project();
    std::fs::write(local.path().join("sweep.toml"), sweep).unwrap();
    pipe_ok(local.path(), &args);
    let dir = project();
    std::fs::write(dir.path().join("sweep.toml"), sweep).unwrap();
    let mut on_slurm = args.to_vec();
    on_slurm.extend(["--executor", "slurm"]);
    let output = pipe(dir.path(), &on_slurm);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("4 trial(s) submitted as Slurm job array"), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.contains("trial") && l.contains(": submitted as Slurm job")),
        "{stderr}"
    );
    assert_eq!(sweep_outcome(dir.path()), sweep_outcome(local.path()));
}
