//! Faults injected on purpose: kills at every named point of the commit protocols and at random
//! times, concurrent runs, a full disk. After each, `pipe verify` finds nothing corrupt, the next
//! run succeeds, and the result is bit for bit an uninterrupted run's.

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Two epochs, so that a checkpoint is written at the end of the first.
const TWO_EPOCHS: [&str; 2] = ["--set", "train.epochs=2"];

fn args_for(store: &str) -> Vec<&str> {
    let mut args = vec!["run", "pipeline.toml", "--json", "--store", store];
    args.extend_from_slice(&TWO_EPOCHS);
    args
}

/// `pipe verify --store store` must find nothing corrupt.
fn assert_verifies(dir: &Path, store: &str, after: &str) {
    let args = ["verify", "--store", store];
    let output = pipe(dir, &args);
    assert!(output.status.success(), "after {after}: {}", describe(&args, &output));
}

/// The run finishes with exactly the reference's run id and stage digests.
fn assert_finishes_like(dir: &Path, store: &str, reference: &RunJson, after: &str) -> RunJson {
    let args = args_for(store);
    let output = pipe(dir, &args);
    assert!(output.status.success(), "the run after {after}: {}", describe(&args, &output));
    let run = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(run.run, reference.run, "run id after {after}");
    for stage in STAGES {
        assert_eq!(
            recorded_digest(&dir.join(store), &run.run, stage),
            recorded_digest(&dir.join("reference"), &reference.run, stage),
            "{stage} after {after}"
        );
    }
    run
}

fn reference(dir: &Path) -> RunJson {
    let output = pipe(dir, &args_for("reference"));
    assert!(output.status.success(), "{}", describe(&args_for("reference"), &output));
    RunJson::parse(&String::from_utf8_lossy(&output.stdout))
}

#[test]
fn a_kill_at_every_named_point_leaves_a_store_that_verifies_and_finishes_the_same() {
    let dir = project();
    let reference = reference(dir.path());
    // Every point, first where a run reaches it, then in each stage that reaches it.
    let mut targets: Vec<String> = pipe::fault::POINTS.iter().map(|p| p.to_string()).collect();
    for point in ["store.outputs-hashed", "store.manifest-written", "store.renamed"] {
        targets.extend(STAGES.iter().map(|stage| format!("{point}:{stage}")));
    }
    for point in &targets {
        let store = format!("store-{}", point.replace(':', "-"));
        let args = args_for(&store);
        let mut command = pipe_command(dir.path(), &args);
        command.env("PIPE_FAULT", point);
        let output = command.output().unwrap();
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGABRT),
            "PIPE_FAULT={point} must abort the run: {}",
            describe(&args, &output)
        );
        assert_verifies(dir.path(), &store, point);
        let run = assert_finishes_like(dir.path(), &store, &reference, point);
        // A stage killed before its rename is redone; one killed after it is reused.
        if let Some((point, stage)) = point.split_once(':') {
            let want = if point == "store.renamed" { "cached" } else { "ran" };
            assert_eq!(run.status(stage), want, "{stage} after a kill at {point}");
        }
        assert_verifies(dir.path(), &store, &format!("the run after {point}"));
    }
}

#[test]
fn fifty_kills_at_random_times_never_leave_anything_corrupt() {
    let dir = project();
    let reference = reference(dir.path());
    // How long an uninterrupted run takes here, to spread the kills over it.
    let started = Instant::now();
    let output = pipe(dir.path(), &args_for("timing"));
    assert!(output.status.success());
    let span = started.elapsed().as_micros() as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for kill in 0..50 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Fresh stores sometimes, so that early points (tokenize, first commits) are hit too.
        if kill % 10 == 0 {
            let _ = std::fs::remove_dir_all(dir.path().join("killed"));
        }
        let delay = Duration::from_micros((state >> 33) % span.max(1));
        let mut child = pipe_command(dir.path(), &args_for("killed"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        assert_verifies(dir.path(), "killed", &format!("kill {kill} after {delay:?}"));
    }
    assert_finishes_like(dir.path(), "killed", &reference, "50 kills");
}

#[test]
fn concurrent_runs_compute_each_stage_once() {
    let dir = project();
    // 8 processes of one pipeline, then 8 of 4 pipelines that share the tokenize stage.
    let lrs = ["1e-3", "2e-3", "3e-3", "4e-3"];
    for (store, variants) in
        [("same", vec!["1e-3"; 8]), ("shared", lrs.iter().chain(&lrs).copied().collect())]
    {
        let children: Vec<_> = variants
            .iter()
            .map(|lr| {
                let set = format!("optimizer.lr={lr}");
                let args = ["run", "pipeline.toml", "--json", "--store", store, "--set", &set];
                pipe_command(dir.path(), &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
            })
            .collect();
        let mut ran: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "{}", describe(&["run", "(concurrent)"], &output));
            let run = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
            for stage in &run.stages {
                *ran.entry((stage.name.clone(), stage.key.clone())).or_default() +=
                    usize::from(stage.status == "ran");
            }
        }
        for ((stage, key), count) in &ran {
            assert_eq!(*count, 1, "{store}: {stage} {key} was computed {count} times");
        }
        let tokenize_keys = ran.keys().filter(|(stage, _)| stage == "tokenize").count();
        assert_eq!(tokenize_keys, 1, "{store}: every pipeline shares one tokenize stage");
        assert_verifies(dir.path(), store, "concurrent runs");
    }
}

#[test]
fn a_full_disk_fails_the_run_with_the_path_and_keeps_what_was_stored() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    let store = dir.path().join("runs");
    let before: Vec<String> = STAGES.iter().map(|s| recorded_digest(&store, &first.run, s)).collect();
    // Files may grow to 64 KiB: the tokenize output fits, the trained model (~140 KiB) does not.
    let args = ["run", "pipeline.toml", "--set", "train.epochs=2", "--set", "seed=7"];
    let mut command = pipe_command(dir.path(), &args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            // Ignored, SIGXFSZ turns into EFBIG from write(2), as on a full disk.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        })
    };
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&args, &output));
    assert!(stderr.contains("File too large") && stderr.contains("runs/tmp/train-"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_verifies(dir.path(), "runs", "a full disk");
    let after: Vec<String> = STAGES.iter().map(|s| recorded_digest(&store, &first.run, s)).collect();
    assert_eq!(before, after, "the earlier record and stages are intact");
    // With room again, the same run succeeds.
    let again = pipe(dir.path(), &args);
    assert!(again.status.success(), "{}", describe(&args, &again));
}

/// Runs the two-epoch pipeline into `store` until its first checkpoint is saved, aborts it there,
/// and returns the checkpoint's path.
fn checkpoint_of_a_killed_run(dir: &Path) -> std::path::PathBuf {
    let mut command = pipe_command(dir, &args_for("store"));
    command.env("PIPE_FAULT", "checkpoint.saved");
    assert_eq!(command.output().unwrap().status.signal(), Some(libc::SIGABRT));
    let work = std::fs::read_dir(dir.join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("train-"));
    work.expect("a train work directory").join("checkpoint/checkpoint.safetensors")
}

#[test]
fn a_truncated_checkpoint_is_ignored_with_a_warning_and_the_run_finishes_the_same() {
    let dir = project();
    let reference = reference(dir.path());
    let args = args_for("store");
    let checkpoint = checkpoint_of_a_killed_run(dir.path());
    let bytes = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 2]).unwrap();

    let output = pipe(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}", describe(&args, &output));
    assert!(stderr.contains("ignoring the checkpoint"), "{stderr}");
    assert!(!dir.path().join("store/tmp").read_dir().unwrap().any(|_| true), "the stage's work is cleared");
    let run = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(run.run, reference.run);
    assert_eq!(
        recorded_digest(&dir.path().join("store"), &run.run, "train"),
        recorded_digest(&dir.path().join("reference"), &reference.run, "train")
    );
}

#[test]
fn verify_reports_kept_checkpoints_and_drops_them_when_asked() {
    let dir = project();
    checkpoint_of_a_killed_run(dir.path());
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--store", "store"];
        args.extend_from_slice(extra);
        let output = pipe(dir.path(), &args);
        assert!(output.status.success(), "{}", describe(&args, &output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(verify(&[]).contains("checkpoint kept"), "kept by default");
    assert!(verify(&["--drop-checkpoints"]).contains("checkpoint removed"));
    assert!(!dir.path().join("store/tmp").read_dir().unwrap().any(|_| true), "nothing left in tmp/");
}

#[test]
fn a_checkpoint_of_another_format_or_with_inconsistent_columns_is_ignored() {
    type Tensors = std::collections::HashMap<String, candle_core::Tensor>;
    type Metadata = std::collections::HashMap<String, String>;
    let other_format: &dyn Fn(&mut Tensors, &mut Metadata) = &|_, meta| {
        meta.insert("format".into(), "pipe-checkpoint-1".into());
    };
    let short_column: &dyn Fn(&mut Tensors, &mut Metadata) = &|tensors, _| {
        let lr = tensors["log.lr"].narrow(0, 0, 1).unwrap();
        tensors.insert("log.lr".into(), lr);
    };
    for (what, edit) in [("another format", other_format), ("a short log column", short_column)] {
        let dir = project();
        let reference = reference(dir.path());
        let args = args_for("store");
        let path = checkpoint_of_a_killed_run(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap_or_default();
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        edit(&mut tensors, &mut meta);
        assert!(tensors["log.loss"].dim(0).unwrap() >= 1, "{what}: the checkpoint holds steps");
        let views: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
        // Written back through safetensors itself, which keeps the (edited) metadata.
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = views
            .iter()
            .map(|(n, t)| {
                let v = t.flatten_all().unwrap();
                let bytes: Vec<u8> = match t.dtype() {
                    candle_core::DType::F32 => {
                        v.to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect()
                    }
                    _ => v
                        .to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                };
                (n.clone(), bytes, t.dims().to_vec())
            })
            .collect();
        let tensor_views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .zip(&views)
            .map(|((n, b, shape), (_, t))| {
                let dtype = if t.dtype() == candle_core::DType::F32 {
                    safetensors::Dtype::F32
                } else {
                    safetensors::Dtype::F64
                };
                (n.clone(), safetensors::tensor::TensorView::new(dtype, shape.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(tensor_views, Some(meta), &path).unwrap();

        let output = pipe(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{what}: {}", describe(&args, &output));
        assert!(stderr.contains("ignoring the checkpoint"), "{what}: {stderr}");
        let run = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
        assert_eq!(run.run, reference.run, "{what}");
    }
}
