//! Dataset formats other than CSV: the same rows as JSON Lines give the same stage outputs.

mod common;

use std::path::Path;

use common::*;

/// `from` (a CSV file with a header) written as JSON Lines at `to`, every field a string.
fn csv_to_jsonl(from: &Path, to: &Path) {
    let mut reader = csv::Reader::from_path(from).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    let mut out = String::new();
    for record in reader.records() {
        let record = record.unwrap();
        let object: serde_json::Map<String, serde_json::Value> =
            header.iter().cloned().zip(record.iter().map(|v| serde_json::Value::String(v.into()))).collect();
        out.push_str(&serde_json::Value::Object(object).to_string());
        out.push('\n');
    }
    std::fs::write(to, out).unwrap();
}

#[test]
fn json_lines_give_the_same_tokens_weights_and_metrics_as_the_csv() {
    let csv = project();
    let from_csv = run_json(csv.path(), &[]);
    let jsonl = project();
    for split in ["train", "validation"] {
        let data = jsonl.path().join("data");
        csv_to_jsonl(&data.join(format!("{split}.csv")), &data.join(format!("{split}.jsonl")));
        std::fs::remove_file(data.join(format!("{split}.csv"))).unwrap();
    }
    let pipeline = std::fs::read_to_string(jsonl.path().join("pipeline.toml")).unwrap();
    std::fs::write(jsonl.path().join("pipeline.toml"), pipeline.replace(".csv\"", ".jsonl\"")).unwrap();
    let from_jsonl = run_json(jsonl.path(), &[]);
    assert_ne!(from_jsonl.key("tokenize"), from_csv.key("tokenize"), "the input file is part of the key");
    for stage in STAGES {
        assert_eq!(
            recorded_digest(&jsonl.path().join("runs"), &from_jsonl.run, stage),
            recorded_digest(&csv.path().join("runs"), &from_csv.run, stage),
            "{stage}"
        );
    }
    // The tokens are the same, so the train stage's key is too.
    assert_eq!(from_jsonl.key("train"), from_csv.key("train"));
    assert_eq!(from_jsonl.metrics, from_csv.metrics);
    // Predicting from a JSON Lines file reads it the same way.
    let input = jsonl.path().join("data/validation.jsonl");
    let out = pipe_ok(jsonl.path(), &["predict", &from_jsonl.run, "--input", input.to_str().unwrap()]);
    assert_eq!(out.lines().count(), 13, "a header and 12 rows:\n{out}");
}

#[test]
fn a_bad_json_line_exits_2_naming_the_file_and_line() {
    let dir = project();
    let data = dir.path().join("data");
    csv_to_jsonl(&data.join("train.csv"), &data.join("train.jsonl"));
    let mut text = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    text.push_str("{\"sentence\": \"unfinished\n");
    std::fs::write(data.join("train.jsonl"), text).unwrap();
    let pipeline = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), pipeline.replace("train.csv", "train.jsonl")).unwrap();
    let output = pipe(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&["run"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("train.jsonl:49: malformed row: not JSON"), "{stderr}");
    assert!(!dir.path().join("runs/stages").exists(), "nothing is stored");
}
