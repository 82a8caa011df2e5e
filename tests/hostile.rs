//! Hostile or corrupt input from outside the process — a pipeline file, `--set`, a run record
//! pulled from git, a run id on the command line — is refused with exit code 2 and a message, never
//! a panic, and never makes pipe write outside its store.

mod common;

use std::path::Path;

use common::*;

fn assert_refused(dir: &Path, args: &[&str], expect: &str) {
    let output = pipe(dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", describe(args, &output));
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{}", describe(args, &output));
    assert!(!stderr.contains("panicked"), "{}", describe(args, &output));
}

#[test]
fn a_pipeline_name_cannot_write_outside_the_store() {
    let dir = project();
    let outside = dir.path().join("outside");
    // In the file, through --set, and through a hand-made record given to `pipe reproduce`.
    let file = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(dir.path().join("evil.toml"), format!("name = \"../../outside/pwn\"\n{file}")).unwrap();
    assert_refused(dir.path(), &["run", "evil.toml"], "a pipeline name is one path component");
    assert_refused(dir.path(), &["run", "pipeline.toml", "--set", "name=../outside/pwn"], "`name`");
    assert_refused(dir.path(), &["run", "pipeline.toml", "--set", "name=.hidden"], "`name`");

    let run = run_json(dir.path(), &[]);
    let store = dir.path().join("runs");
    let record = std::fs::read_to_string(store.join(format!("{}.toml", run.run))).unwrap();
    // Hand-made: without a checksum, which would otherwise reject the edit before the name check.
    let evil = without_checksum(&record).replace("name = \"pipeline\"", "name = \"../../outside/pwn\"");
    assert_ne!(evil, record, "the record holds the pipeline's name");
    std::fs::write(store.join(format!("{}.toml", run.run)), evil).unwrap();
    assert_refused(dir.path(), &["reproduce", &run.run], "a pipeline name is one path component");
    assert!(!outside.exists(), "nothing may be written outside the store");
    assert!(!dir.path().parent().unwrap().join("outside").exists());
}

#[test]
fn run_ids_that_are_not_run_ids_are_refused() {
    let dir = project();
    let run = run_json(dir.path(), &[]);
    for bad in ["../../etc", "", "ABC", "0123456789abcdef0"] {
        assert_refused(dir.path(), &["show", bad], "is not a run id");
        assert_refused(dir.path(), &["reproduce", bad], "is not a run id");
    }
    // Two records sharing a prefix: ambiguous, with the candidates named.
    let store = dir.path().join("runs");
    let text = std::fs::read_to_string(store.join(format!("{}.toml", run.run))).unwrap();
    for id in ["abcabcabc000", "abcabcabc001"] {
        let copy = text.replace(&format!("run = \"{}\"", run.run), &format!("run = \"{id}\""));
        std::fs::write(store.join(format!("{id}.toml")), copy).unwrap();
    }
    assert_refused(dir.path(), &["show", "abcabc"], "ambiguous");
}

#[test]
fn a_record_with_forged_keys_or_digests_is_refused_before_anything_runs() {
    let dir = project();
    let run = run_json(dir.path(), &[]);
    let store = dir.path().join("runs");
    let path = store.join(format!("{}.toml", run.run));
    let text = std::fs::read_to_string(&path).unwrap();
    let key = run.key("train").to_string();
    for (forged, expect) in [
        ("../../../../tmp/x", "is not a SHA-256 digest"),
        ("ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé", "is not a SHA-256 digest"),
    ] {
        std::fs::write(&path, text.replace(&key, forged)).unwrap();
        assert_refused(dir.path(), &["reproduce", &run.run], expect);
        assert_refused(dir.path(), &["show", &run.run], expect);
    }
    // A record whose `run` field disagrees with its file name.
    std::fs::write(&path, text.replacen(&format!("run = \"{}\"", run.run), "run = \"000000000000\"", 1))
        .unwrap();
    assert_refused(dir.path(), &["show", &run.run], "the id in its file name");
}

/// `pipe verify` in `dir`: (exit code, stdout).
fn verify(dir: &Path) -> (Option<i32>, String) {
    let output = pipe(dir, &["verify"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{}", describe(&["verify"], &output));
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A record's text without its `checksum` line.
fn without_checksum(text: &str) -> String {
    text.lines().filter(|l| !l.starts_with("checksum = ")).map(|l| format!("{l}\n")).collect()
}

#[test]
fn every_kind_of_store_corruption_is_found_set_aside_and_redone() {
    let dir = project();
    let good = run_json(dir.path(), &[]);
    let store = dir.path().join("runs");
    let (code, out) = verify(dir.path());
    assert_eq!(code, Some(0), "a fresh store verifies:\n{out}");
    assert!(out.contains("3 stage(s) and 1 record(s) verified, 0 corrupt"), "{out}");

    let stage = |kind: &str| store.join("stages").join(kind).join(good.key(kind));
    let record = store.join(format!("{}.toml", good.run));
    let record_text = std::fs::read_to_string(&record).unwrap();
    type Damage = Box<dyn Fn()>;
    let damages: Vec<(&str, &str, Damage)> = vec![
        ("a truncated stage file", "content changed", {
            let p = stage("train").join("model/model.safetensors");
            Box::new(move || {
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            })
        }),
        ("a flipped bit", "content changed", {
            let p = stage("tokenize").join("tokens.safetensors");
            Box::new(move || {
                let mut bytes = std::fs::read(&p).unwrap();
                let at = bytes.len() - 1;
                bytes[at] ^= 1;
                std::fs::write(&p, bytes).unwrap();
            })
        }),
        ("a truncated manifest", "unreadable manifest", {
            let p = stage("evaluate").join("MANIFEST.json");
            Box::new(move || {
                let text = std::fs::read(&p).unwrap();
                std::fs::write(&p, &text[..text.len() / 3]).unwrap();
            })
        }),
        ("a manifest that is not JSON", "unreadable manifest", {
            let p = stage("train").join("MANIFEST.json");
            Box::new(move || std::fs::write(&p, "not json at all").unwrap())
        }),
        ("a manifest listing a missing file", "predictions.csv", {
            let p = stage("evaluate").join("predictions.csv");
            Box::new(move || std::fs::remove_file(&p).unwrap())
        }),
        ("a stage directory replaced by a symlink out of the store", "symbolic link", {
            let (p, outside) = (stage("evaluate"), dir.path().join("outside-copy"));
            Box::new(move || {
                std::fs::rename(&p, &outside).unwrap();
                std::os::unix::fs::symlink(&outside, &p).unwrap();
            })
        }),
        // Without its checksum (a record written before checksums, or a forger who dropped it),
        // an edited key or file digest is still found by what it no longer agrees with.
        ("a record edited by hand (a key)", "not the hash of its stage keys", {
            let (p, text, key) =
                (record.clone(), without_checksum(&record_text), good.key("evaluate").to_string());
            Box::new(move || std::fs::write(&p, text.replace(&key, &"0".repeat(64))).unwrap())
        }),
        ("a record edited by hand (a metric)", "checksum does not match", {
            let (p, text) = (record.clone(), record_text.clone());
            Box::new(move || std::fs::write(&p, text.replacen("accuracy = 0.", "accuracy = 1.", 1)).unwrap())
        }),
        ("a record edited by hand (a file digest)", "file digests differ", {
            let (p, text) = (record.clone(), without_checksum(&record_text));
            Box::new(move || {
                let at = text.find("\"predictions.csv\" = \"").unwrap() + "\"predictions.csv\" = \"".len();
                let mut edited = text.clone();
                edited.replace_range(at..at + 64, &"1".repeat(64));
                std::fs::write(&p, edited).unwrap();
            })
        }),
    ];
    for (what, expect, damage) in damages {
        damage();
        let (code, out) = verify(dir.path());
        assert_eq!(code, Some(1), "{what}: verify must fail:\n{out}");
        assert!(out.contains("CORRUPT") && out.contains(expect), "{what}: expected {expect:?} in:\n{out}");
        // The next run redoes what was set aside and ends with the same bits.
        let again = run_json(dir.path(), &[]);
        assert_eq!(again.run, good.run, "{what}: the run after repair");
        if !record.exists() {
            std::fs::write(&record, &record_text).unwrap(); // a record set aside is restored from git
        }
        let (code, out) = verify(dir.path());
        assert_eq!(code, Some(0), "{what}: the repaired store verifies:\n{out}");
        for kind in STAGES {
            assert_eq!(recorded_digest(&store, &good.run, kind), recorded_digest(&store, &again.run, kind));
        }
    }
}

#[test]
fn bad_input_that_a_later_stage_finds_exits_2_before_any_stage_runs() {
    let dir = project();
    // The tiny model has 64 positions: the train stage's check must stop the run before tokenize.
    let args = ["run", "pipeline.toml", "--set", "tokenizer.max_length=100"];
    assert_refused(dir.path(), &args, "max_position_embeddings");
    assert!(!dir.path().join("runs/stages").exists(), "no stage may be committed");
    assert_refused(
        dir.path(),
        &["run", "pipeline.toml", "--set", "train.epochs=9223372036854775807"],
        "at most",
    );
}

#[test]
fn a_label_column_with_100000_distinct_values_is_refused() {
    let dir = project();
    let mut csv = String::from("text,label\n");
    for i in 0..100_000 {
        csv.push_str(&format!("good film {i},id{i}\n"));
    }
    std::fs::write(dir.path().join("data/train.csv"), csv).unwrap();
    assert_refused(dir.path(), &["run", "pipeline.toml"], "at most 1024 classes");
    assert!(!dir.path().join("runs/stages").exists(), "no stage may be committed");
}

/// Runs the tiny pipeline after `damage` and expects exit 2 naming `expect`, with no stage stored.
fn refused_after(damage: impl FnOnce(&Path), expect: &str) {
    let dir = project();
    damage(dir.path());
    assert_refused(dir.path(), &["run", "pipeline.toml"], expect);
    assert!(!dir.path().join("runs/stages").exists(), "no stage may be committed");
}

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    std::fs::write(dir.join(rel), bytes).unwrap();
}

#[test]
fn hostile_csv_files_are_refused_with_file_and_line() {
    let rows = tiny_csv(48, 1, false);
    let mut invalid_utf8 = rows.clone().into_bytes();
    invalid_utf8.extend_from_slice(b"bad \xff\xfe bytes,pos\n");
    refused_after(|d| write(d, "data/train.csv", &invalid_utf8), "data/train.csv");
    let nul = format!("{rows}nul\0inside,pos\n");
    refused_after(|d| write(d, "data/train.csv", nul.as_bytes()), "data/train.csv");
    let ragged = format!("{rows}one,two,three\n");
    refused_after(|d| write(d, "data/train.csv", ragged.as_bytes()), "data/train.csv");
    let duplicate_header = rows
        .replacen("text,label", "text,text,label", 1)
        .replace(",pos\n", ",x,pos\n")
        .replace(",neg\n", ",x,neg\n");
    refused_after(|d| write(d, "data/train.csv", duplicate_header.as_bytes()), "text");
    let huge = format!("{rows}{},pos\n", "a".repeat(10 << 20));
    let dir = project();
    write(dir.path(), "data/train.csv", huge.as_bytes());
    let output = pipe(dir.path(), &["run", "pipeline.toml"]);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("panicked"),
        "a 10 MB field: {}",
        describe(&["run"], &output)
    );
}

#[test]
fn a_bom_and_crlf_line_ends_read_as_the_same_rows() {
    let dir = project();
    let plain = run_json(dir.path(), &[]);
    for (what, bytes) in [
        ("a BOM", [b"\xef\xbb\xbf".as_slice(), tiny_csv(48, 1, true).as_bytes()].concat()),
        ("CRLF", tiny_csv(48, 1, true).replace('\n', "\r\n").into_bytes()),
    ] {
        write(dir.path(), "data/train.csv", &bytes);
        let run = run_json(dir.path(), &[]);
        let store = dir.path().join("runs");
        assert_eq!(
            recorded_digest(&store, &run.run, "tokenize"),
            recorded_digest(&store, &plain.run, "tokenize"),
            "{what}: the same tokens and labels"
        );
    }
}

#[test]
fn broken_model_files_are_refused() {
    refused_after(|d| write(d, "model/tokenizer.json", b"{ not json"), "tokenizer.json");
    refused_after(|d| write(d, "model/tokenizer.json", b"{}"), "tokenizer.json");
    refused_after(|d| write(d, "model/config.json", b"[1, 2"), "config.json");
    refused_after(|d| write(d, "model/config.json", b"{\"model_type\": \"bert\"}"), "config.json");
    // An architecture pipe does not have: the error names it and the supported ones.
    let unsupported = |d: &Path| {
        let path = d.join("model/config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["model_type"] = "gpt2".into();
        write(d, "model/config.json", config.to_string().as_bytes());
    };
    refused_after(
        unsupported,
        "model_type `gpt2` is not supported (supported: bert, distilbert, electra, modernbert, roberta",
    );
    // A safetensors header that claims more bytes than the file has, and one of several GB.
    let weights = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    refused_after(
        |d| {
            let mut bytes = weights(d);
            bytes.truncate(bytes.len() / 2);
            write(d, "model/model.safetensors", &bytes);
        },
        "model.safetensors",
    );
    refused_after(
        |d| {
            let mut bytes = weights(d);
            bytes[..8].copy_from_slice(&(5u64 << 30).to_le_bytes());
            write(d, "model/model.safetensors", &bytes);
        },
        "model.safetensors",
    );
}

#[test]
fn extends_must_name_a_file_inside_the_project() {
    let dir = project();
    let file = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::create_dir_all(dir.path().join("adir")).unwrap();
    write(dir.path(), "a.toml", format!("extends = \"adir\"\n{file}").as_bytes());
    assert_refused(dir.path(), &["run", "a.toml"], "adir");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("base.toml"), "seed = 1\n").unwrap();
    let base = outside.path().join("base.toml");
    write(dir.path(), "b.toml", format!("extends = {:?}\n{file}", base.to_str().unwrap()).as_bytes());
    assert_refused(dir.path(), &["run", "b.toml"], "outside");
}

#[test]
fn a_null_fact_in_a_stored_manifest_does_not_break_the_record() {
    let dir = project();
    let run = run_json(dir.path(), &[]);
    let store = dir.path().join("runs");
    let manifest = store.join("stages/train").join(run.key("train")).join("MANIFEST.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["facts"]["final_loss"] = serde_json::Value::Null;
    m["facts"]["list"] = serde_json::json!([1, null]);
    std::fs::write(&manifest, m.to_string()).unwrap();
    std::fs::remove_file(store.join(format!("{}.toml", run.run))).unwrap();
    let again = run_json(dir.path(), &[]);
    assert_eq!(again.statuses(), ["cached"; 3]);
    assert!(store.join(format!("{}.toml", run.run)).exists(), "the record is written");
}

#[test]
fn a_tokenizer_edited_while_training_is_not_stored_under_the_old_key() {
    let dir = project();
    let args = ["run", "pipeline.toml", "--set", "train.epochs=400"];
    let child = pipe_command(dir.path(), &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs (the train stage's work directory exists), then edit the file.
    let tmp = dir.path().join("runs/tmp");
    let started = std::time::Instant::now();
    while !std::fs::read_dir(&tmp)
        .is_ok_and(|mut d| d.any(|e| e.unwrap().file_name().to_string_lossy().starts_with("train-")))
    {
        assert!(started.elapsed().as_secs() < 60, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let path = dir.path().join("model/tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n")).unwrap(); // the same tokenizer, other bytes
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("changed while the stage ran"), "{stderr}");
    assert!(!dir.path().join("runs/stages/train").exists(), "nothing stored under the old key");
}
