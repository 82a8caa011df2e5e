//! The remote store against a real S3 server (SeaweedFS, started by `scripts/s3-server.sh`, which
//! `scripts/test.sh` runs) and against a shared directory: round trips by run id, races between
//! pushers, kills, corruption on the server, and misconfiguration.
//!
//! The S3 tests need `AWS_ENDPOINT_URL`, the AWS credentials and `TEST_S3_BUCKET`; without them
//! they print SKIPPED, except under CI (`CI` set), where they fail.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;

/// A fresh prefix in the test bucket, or `None` (SKIPPED) when no server is configured.
fn s3_remote(test: &str) -> Option<String> {
    match (std::env::var("AWS_ENDPOINT_URL"), std::env::var("TEST_S3_BUCKET")) {
        (Ok(_), Ok(bucket)) => {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            Some(format!("s3://{bucket}/{test}-{}-{nanos}", std::process::id()))
        }
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must run the S3 tests: scripts/test.sh starts the server (scripts/s3-server.sh)")
        }
        _ => {
            eprintln!(
                "SKIPPED: no S3 server (set AWS_ENDPOINT_URL and TEST_S3_BUCKET; see scripts/s3-server.sh)"
            );
            None
        }
    }
}

/// A raw request to the S3 server with curl (SigV4-signed with the test credentials), bypassing
/// pipe: the HTTP status code.
fn s3_raw(method: &str, remote: &str, rel: &str, body: Option<&[u8]>, headers: &[&str]) -> u16 {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let bucket_and_prefix = remote.strip_prefix("s3://").unwrap();
    let url = format!("{endpoint}/{bucket_and_prefix}/{rel}");
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let user = format!(
        "{}:{}",
        std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()
    );
    let mut command = std::process::Command::new("curl");
    command.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--aws-sigv4"]);
    command.arg(format!("aws:amz:{region}:s3")).args(["--user", &user]);
    // curl signs the payload's hash only when given it.
    let payload = pipe::digest::bytes(body.unwrap_or_default());
    command.args(["-H", &format!("x-amz-content-sha256: {payload}")]);
    for header in headers {
        command.args(["-H", header]);
    }
    if body.is_some() {
        command.args(["--data-binary", "@-"]).stdin(Stdio::piped());
    }
    let mut child = command.arg(&url).stdout(Stdio::piped()).spawn().expect("curl runs");
    if let Some(body) = body {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(body).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0)
}

/// `pipe args... --remote remote` in `dir` with `env`.
fn pipe_remote(dir: &Path, args: &[&str], remote: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--remote", remote]);
    let mut command = pipe_command(dir, &all);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn pipe_remote_ok(dir: &Path, args: &[&str], remote: &str) -> String {
    let output = pipe_remote(dir, args, remote, &[]);
    assert!(output.status.success(), "{}", describe(args, &output));
    String::from_utf8(output.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Every file under `dir` with its content, to show a store was left untouched.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().display().to_string(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// The digests a run record lists for its stages.
fn digests(dir: &Path, run: &str) -> Vec<String> {
    STAGES.iter().map(|stage| recorded_digest(&dir.join("runs"), run, stage)).collect()
}

/// Machine A runs and pushes; machine B, with an empty store and the run id only, pulls, shows,
/// predicts, runs (nothing trains) and reproduces; machine C runs with the remote and pulls every
/// stage instead of computing it.
fn round_trip(remote: &str) {
    let a = project();
    let out = pipe_remote_ok(a.path(), &["run", "pipeline.toml", "--json", "--push"], remote);
    let pushed = json(&out);
    for stage in pushed["stages"].as_array().unwrap() {
        assert_eq!(stage["status"], "ran", "{out}");
        assert_eq!(stage["pushed"], true, "{out}");
    }
    let run = pushed["run"].as_str().unwrap().to_string();

    let b = project();
    let listed = pipe_remote_ok(b.path(), &["ls"], remote);
    assert!(listed.contains("in the remote") && listed.contains(&run[..12]), "{listed}");
    let pulled = json(&pipe_remote_ok(b.path(), &["pull", &run, "--json"], remote));
    assert_eq!(pulled["record"], "pulled");
    for stage in pulled["stages"].as_array().unwrap() {
        assert_eq!(stage["status"], "pulled", "{pulled}");
    }
    assert_eq!(digests(b.path(), &run), digests(a.path(), &run));
    assert!(pipe_ok(b.path(), &["show", &run]).contains(&run));
    let predicted = pipe_ok(b.path(), &["predict", &run, "--text", "a good film"]);
    assert!(predicted.lines().count() >= 2, "{predicted}");
    let rerun = run_json(b.path(), &[]);
    assert_eq!(rerun.run, run);
    assert_eq!(rerun.statuses(), ["cached"; 3], "after a pull nothing runs");
    let reproduced = pipe_remote_ok(b.path(), &["reproduce", &run], remote);
    assert!(reproduced.contains("reproduced bit for bit"), "{reproduced}");
    assert!(reproduced.contains("remote copy: 3 stage(s) identical"), "{reproduced}");

    // The variables do what the flags do (and are not taken for pipeline keys).
    let c = project();
    let mut command = pipe_command(c.path(), &["run", "pipeline.toml", "--json"]);
    let output = command.env("PIPE_REMOTE", remote).env("PIPE_REMOTE_REQUIRED", "1").output().unwrap();
    assert!(output.status.success(), "{}", describe(&["run"], &output));
    let out = String::from_utf8(output.stdout).unwrap();
    let statuses: Vec<String> = json(&out)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().into())
        .collect();
    assert_eq!(statuses, ["pulled"; 3], "{out}");
    assert_eq!(digests(c.path(), &run), digests(a.path(), &run));
    assert!(
        !c.path().join("runs/tmp").exists()
            || std::fs::read_dir(c.path().join("runs/tmp")).unwrap().count() == 0
    );
}

#[test]
fn a_colleague_pulls_a_pushed_run_by_its_id_and_nothing_trains() {
    let Some(remote) = s3_remote("round-trip") else { return };
    round_trip(&remote);
}

#[test]
fn a_shared_directory_is_a_remote_too() {
    let shared = tempfile::tempdir().unwrap();
    round_trip(&format!("file://{}", shared.path().display()));
}

#[test]
fn the_server_refuses_a_second_create_only_put_with_412() {
    let Some(remote) = s3_remote("conditional") else { return };
    let create = ["If-None-Match: *"];
    assert_eq!(s3_raw("PUT", &remote, "x", Some(b"first"), &create), 200);
    assert_eq!(s3_raw("PUT", &remote, "x", Some(b"second"), &create), 412);
    // The server checks the SHA-256 the client sends: a wrong one is refused.
    let wrong = "x-amz-checksum-sha256: 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    assert_eq!(s3_raw("PUT", &remote, "y", Some(b"not empty"), &[wrong]) / 100, 4);
}

#[test]
fn of_four_create_only_puts_at_once_one_writes_and_three_see_412() {
    let Some(remote) = s3_remote("put-race") else { return };
    let remote = std::sync::Arc::new(pipe::store::Remote::open(&remote, Default::default()).unwrap());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let writers: Vec<_> = (0..4u8)
        .map(|i| {
            let (remote, barrier) = (remote.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                remote.put_if_absent("stages/train/MANIFEST.json", vec![b'0' + i; 64]).unwrap()
            })
        })
        .collect();
    let outcomes: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    use pipe::store::remote::Pushed;
    assert_eq!(outcomes.iter().filter(|o| **o == Pushed::Written).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == Pushed::Raced).count(), 3, "{outcomes:?}");
}

#[test]
fn four_pushes_of_one_run_at_once_write_each_manifest_once() {
    let Some(remote) = s3_remote("race") else { return };
    let a = project();
    let run = run_json(a.path(), &[]).run;
    let stores: Vec<String> = (0..4).map(|i| format!("store-{i}")).collect();
    for store in &stores {
        copy_dir(&a.path().join("runs"), &a.path().join(store));
    }
    let children: Vec<_> = stores
        .iter()
        .map(|store| {
            pipe_command(a.path(), &["push", &run, "--json", "--store", store, "--remote", &remote])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut writes = std::collections::BTreeMap::<String, usize>::new();
    let mut record_writes = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", describe(&["push"], &output));
        let report = json(&String::from_utf8_lossy(&output.stdout));
        for stage in report["stages"].as_array().unwrap() {
            let status = stage["status"].as_str().unwrap();
            assert!(["pushed", "present", "raced"].contains(&status), "{report}");
            *writes.entry(stage["name"].as_str().unwrap().into()).or_default() +=
                usize::from(status == "pushed");
        }
        record_writes += usize::from(report["record"] == "pushed");
    }
    assert_eq!(
        writes.values().copied().collect::<Vec<_>>(),
        [1, 1, 1],
        "one manifest write per stage: {writes:?}"
    );
    assert_eq!(record_writes, 1);
    let b = project();
    pipe_remote_ok(b.path(), &["pull", &run], &remote);
    assert_eq!(digests(b.path(), &run), digests(a.path(), &run));
    let verified = pipe_remote_ok(b.path(), &["verify"], &remote);
    assert!(verified.contains("3 stage(s) verified, 0 problem(s)"), "{verified}");
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from).into_iter().filter_map(Result::ok) {
        let dest = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn a_push_killed_midway_leaves_no_manifest_and_the_next_push_completes() {
    use std::os::unix::process::ExitStatusExt;
    let Some(remote) = s3_remote("killed") else { return };
    let a = project();
    let run = run_json(a.path(), &[]).run;
    // Killed after the train stage's blobs, before its manifest; then in the middle of a
    // multipart upload (small parts, so that the tiny model goes up in several).
    let faults: [&[(&str, &str)]; 2] = [
        &[("PIPE_FAULT", "remote.blobs-pushed:train")],
        &[
            ("PIPE_FAULT", "remote.part-pushed"),
            ("PIPE_MULTIPART_THRESHOLD", "40000"),
            ("PIPE_MULTIPART_CHUNKSIZE", "32768"),
        ],
    ];
    for (i, env) in faults.iter().enumerate() {
        let remote = format!("{remote}/{i}");
        let output = pipe_remote(a.path(), &["push", &run], &remote, env);
        assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{}", describe(&["push"], &output));
        let b = project();
        let pulled = pipe_remote(b.path(), &["pull", &run], &remote, &[]);
        assert!(!pulled.status.success(), "nothing of a killed push may be pulled");
        // The stage the kill interrupted is a miss for a colleague: it runs there.
        let out = pipe_remote_ok(b.path(), &["run", "pipeline.toml", "--json"], &remote);
        let train = json(&out)["stages"][1]["status"].clone();
        assert_eq!(train, "ran", "{out}");
        let again = pipe_remote_ok(a.path(), &["push", &run, "--json"], &remote);
        assert_eq!(json(&again)["stages"][1]["status"], "pushed", "{again}");
        let c = project();
        pipe_remote_ok(c.path(), &["pull", &run], &remote);
        assert_eq!(digests(c.path(), &run), digests(a.path(), &run));
    }
}

#[test]
fn corrupt_or_missing_blobs_are_misses_that_verify_names_and_repair_mends() {
    let Some(remote) = s3_remote("corrupt") else { return };
    let a = project();
    let run = json(&pipe_remote_ok(a.path(), &["run", "pipeline.toml", "--json", "--push"], &remote))["run"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = |stage: &str| -> serde_json::Value {
        let key = recorded_key(a.path(), &run, stage);
        json(
            &std::fs::read_to_string(a.path().join(format!("runs/stages/{stage}/{key}/MANIFEST.json")))
                .unwrap(),
        )
    };
    let model_sha =
        manifest("train")["files"]["model/model.safetensors"]["sha256"].as_str().unwrap().to_string();
    let metrics_sha = manifest("evaluate")["files"]["metrics.json"]["sha256"].as_str().unwrap().to_string();
    // On the server: one blob's content replaced, another deleted.
    assert_eq!(s3_raw("PUT", &remote, &format!("cas/sha256/{model_sha}"), Some(b"garbage"), &[]), 200);
    assert_eq!(s3_raw("DELETE", &remote, &format!("cas/sha256/{metrics_sha}"), None, &[]) / 100, 2);

    let b = project();
    let output = pipe_remote(b.path(), &["run", "pipeline.toml", "--json"], &remote, &[]);
    assert!(output.status.success(), "{}", describe(&["run"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("corrupt") && stderr.contains("missing"), "both are reported: {stderr}");
    let statuses: Vec<String> = json(&String::from_utf8_lossy(&output.stdout))["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().into())
        .collect();
    assert_eq!(statuses, ["pulled", "ran", "ran"]);
    assert_eq!(digests(b.path(), &run), digests(a.path(), &run));

    let c = project();
    let verify = pipe_remote(c.path(), &["verify"], &remote, &[]);
    assert_eq!(verify.status.code(), Some(1));
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(report.contains(&format!("train/{}", recorded_key(a.path(), &run, "train"))), "{report}");
    assert!(report.contains("corrupt") && report.contains("missing"), "{report}");
    let repaired = pipe_remote_ok(a.path(), &["verify", "--repair"], &remote);
    assert!(repaired.contains("2 blob(s) repaired"), "{repaired}");
    let clean = pipe_remote_ok(c.path(), &["verify"], &remote);
    assert!(clean.contains("3 stage(s) verified, 0 problem(s)"), "{clean}");
}

fn recorded_key(dir: &Path, run: &str, stage: &str) -> String {
    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join(format!("runs/{run}.toml"))).unwrap()).unwrap();
    let stages = record["stages"].as_array().unwrap();
    let entry = stages.iter().find(|s| s["name"].as_str() == Some(stage)).unwrap();
    entry["key"].as_str().unwrap().to_string()
}

#[test]
fn a_misconfigured_remote_exits_2_naming_it_and_leaves_the_local_store_alone() {
    let Some(remote) = s3_remote("misconfigured") else { return };
    let a = project();
    run_json(a.path(), &[]);
    let before = snapshot(&a.path().join("runs"));
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let cases: [(&str, &str, &str, &[&str]); 3] = [
        (remote.as_str(), "AWS_SECRET_ACCESS_KEY", "wrong", &["403", "pipe-test"]),
        (
            "s3://no-such-bucket-for-pipe/x",
            "AWS_REGION",
            "us-east-1",
            &["no-such-bucket-for-pipe", "NoSuchBucket"],
        ),
        (remote.as_str(), "AWS_ENDPOINT_URL", &closed, &[&closed[..], "pipe-test"]),
    ];
    for (url, name, value, expected) in cases {
        for args in [&["run", "pipeline.toml"][..], &["pull", "0123456789ab"][..]] {
            let output = pipe_remote(a.path(), args, url, &[(name, value)]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{name}={value}: {}", describe(args, &output));
            for word in expected {
                assert!(stderr.contains(word), "{name}={value}: `{word}` missing from: {stderr}");
            }
            if name != "AWS_ENDPOINT_URL" {
                assert!(stderr.contains(&endpoint), "the endpoint is named: {stderr}");
            }
        }
    }
    assert!(snapshot(&a.path().join("runs")) == before, "the local store is untouched");
}

/// A TCP proxy in front of the S3 server that forwards the first `budget` bytes its clients send,
/// then drops every connection and refuses new ones: a remote that answers at first, then fails.
fn flaky_proxy(budget: usize) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let target = std::env::var("AWS_ENDPOINT_URL").unwrap().trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming().filter_map(Result::ok) {
            if sent.load(Ordering::SeqCst) >= budget {
                continue; // dropped: the connection is closed at once
            }
            let Ok(server) = TcpStream::connect(&target) else { continue };
            let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut from_server, mut to_client) = (server, client);
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = from_client.read(&mut buf) {
                    if sent.fetch_add(n, Ordering::SeqCst) + n > budget
                        || to_server.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
                let _ = to_server.shutdown(Shutdown::Both);
                let _ = from_client.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
        }
    });
    format!("http://{address}")
}

#[test]
fn a_remote_that_fails_mid_run_is_a_warning_unless_required() {
    let Some(remote) = s3_remote("flaky") else { return };
    let a = project();
    let pushed = json(&pipe_remote_ok(a.path(), &["run", "pipeline.toml", "--json", "--push"], &remote));
    let run = pushed["run"].as_str().unwrap().to_string();
    // Enough for the listing that opens the remote, not for the stages.
    let budget = 1500;
    let b = project();
    let proxy = flaky_proxy(budget);
    let output =
        pipe_remote(b.path(), &["run", "pipeline.toml", "--json"], &remote, &[("AWS_ENDPOINT_URL", &proxy)]);
    assert!(output.status.success(), "{}", describe(&["run"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning") && stderr.contains("runs here"), "{stderr}");
    let report = json(&String::from_utf8_lossy(&output.stdout));
    let statuses: Vec<&str> =
        report["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["ran"; 3]);
    assert_eq!(digests(b.path(), &run), digests(a.path(), &run));

    let c = project();
    let proxy = flaky_proxy(budget);
    let args = ["run", "pipeline.toml", "--remote-required"];
    let output = pipe_remote(c.path(), &args, &remote, &[("AWS_ENDPOINT_URL", &proxy)]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&args, &output));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&proxy));
    let verified = pipe(c.path(), &["verify"]);
    assert!(verified.status.success(), "nothing half-pulled is left: {}", describe(&["verify"], &verified));
}

#[test]
fn gc_deletes_only_stages_no_recent_record_refers_to() {
    let dir = project();
    let first = run_json(dir.path(), &[]);
    let second = run_json(dir.path(), &["--set", "train.epochs=2"]);
    assert_eq!(first.key("tokenize"), second.key("tokenize"));
    // The second run's record is the only recent one.
    std::fs::remove_file(dir.path().join(format!("runs/{}.toml", first.run))).unwrap();
    let store = pipe::store::Store::new(dir.path().join("runs"));
    let stages = || store.stage_keys().unwrap().len();
    assert_eq!(stages(), 5);
    // Stages finished within the age are kept whatever refers to them...
    assert!(pipe_ok(dir.path(), &["gc", "--older-than", "1h"]).contains("deleted 0 stage(s)"));
    // ...so make them two hours old.
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for (kind, key) in store.stage_keys().unwrap() {
        let manifest =
            std::fs::File::options().write(true).open(store.stage_dir(&kind, &key).join("MANIFEST.json"));
        manifest.unwrap().set_modified(two_hours_ago).unwrap();
    }
    let dry = pipe_ok(dir.path(), &["gc", "--older-than", "1h", "--dry-run"]);
    assert!(dry.contains("would delete 2 stage(s)"), "{dry}");
    assert_eq!(stages(), 5);
    let done = pipe_ok(dir.path(), &["gc", "--older-than", "1h"]);
    assert!(done.contains("deleted 2 stage(s)"), "{done}");
    assert_eq!(stages(), 3);
    assert_eq!(run_json(dir.path(), &["--set", "train.epochs=2"]).statuses(), ["cached"; 3]);
    // No record is younger than no time at all: everything goes.
    assert!(pipe_ok(dir.path(), &["gc", "--older-than", "0s"]).contains("deleted 3 stage(s)"));
    assert_eq!(stages(), 0);
    let bad = pipe(dir.path(), &["gc", "--older-than", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_sweep_pushes_its_trials_and_record_and_a_colleague_reuses_them() {
    let shared = tempfile::tempdir().unwrap();
    let remote = format!("file://{}", shared.path().display());
    let sweep = "pipeline = \"pipeline.toml\"\nmethod = \"random\"\nn_trials = 2\nseed = 7\n\n\
                 [params]\n\"optimizer.lr\" = { log_uniform = [1e-4, 1e-2] }\n";
    let a = project();
    std::fs::write(a.path().join("sweep.toml"), sweep).unwrap();
    pipe_remote_ok(a.path(), &["sweep", "sweep.toml", "--json", "--push"], &remote);
    let records: Vec<_> = std::fs::read_dir(a.path().join("runs/sweeps"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .collect();
    assert_eq!(records.len(), 1);
    let name = records[0].file_name();
    assert_eq!(
        std::fs::read(shared.path().join("sweeps").join(&name)).unwrap(),
        std::fs::read(records[0].path()).unwrap(),
        "the sweep record is in the remote"
    );
    let b = project();
    std::fs::write(b.path().join("sweep.toml"), sweep).unwrap();
    pipe_remote_ok(b.path(), &["sweep", "sweep.toml", "--json"], &remote);
    assert_eq!(
        std::fs::read(b.path().join("runs/sweeps").join(&name)).unwrap(),
        std::fs::read(records[0].path()).unwrap()
    );
    // Pulled stages carry the pusher's manifests verbatim (their timings included): nothing ran.
    let manifests = |dir: &Path| -> Vec<(String, String)> {
        let store = pipe::store::Store::new(dir.join("runs"));
        let keys = store.stage_keys().unwrap();
        let read = |kind: &str, key: &str| {
            std::fs::read_to_string(store.stage_dir(kind, key).join("MANIFEST.json")).unwrap()
        };
        keys.iter().map(|(kind, key)| (format!("{kind}/{key}"), read(kind, key))).collect()
    };
    assert_eq!(manifests(b.path()), manifests(a.path()));
}
