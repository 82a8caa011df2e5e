//! Dataset formats other than CSV: the same rows as JSON Lines or Parquet (written by pyarrow)
//! give the same stage outputs, and broken files name the file and where.

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

/// `from` (a CSV file) written as Parquet at `to` by pyarrow, as a user would convert it, in row
/// groups of 16 rows (so that the sample spans several); its label column becomes categorical (a
/// dictionary, as pandas writes a `category` column).
fn csv_to_parquet(python: &Path, from: &Path, to: &Path) {
    python_ok(
        python,
        "import sys, pyarrow.csv as c, pyarrow.parquet as p\n\
         table = c.read_csv(sys.argv[1])\n\
         i = table.schema.get_field_index('label')\n\
         table = table.set_column(i, 'label', table.column(i).dictionary_encode())\n\
         p.write_table(table, sys.argv[2], row_group_size=16)",
        &[from.to_str().unwrap(), to.to_str().unwrap()],
    );
}

/// Runs the sample project with its train and validation CSVs converted by `convert` to files
/// with `extension` (the pipeline pointing at them), and checks every stage's outputs against the
/// CSV run's; returns the converted project and its run.
fn same_outputs_as_csv(extension: &str, convert: impl Fn(&Path, &Path)) -> (tempfile::TempDir, RunJson) {
    let csv = project();
    let from_csv = run_json(csv.path(), &[]);
    let converted = project();
    for split in ["train", "validation"] {
        let data = converted.path().join("data");
        convert(&data.join(format!("{split}.csv")), &data.join(format!("{split}.{extension}")));
        std::fs::remove_file(data.join(format!("{split}.csv"))).unwrap();
    }
    let pipeline = std::fs::read_to_string(converted.path().join("pipeline.toml")).unwrap();
    std::fs::write(
        converted.path().join("pipeline.toml"),
        pipeline.replace(".csv\"", &format!(".{extension}\"")),
    )
    .unwrap();
    let from_converted = run_json(converted.path(), &[]);
    assert_ne!(from_converted.key("tokenize"), from_csv.key("tokenize"), "the input file is part of the key");
    for stage in STAGES {
        assert_eq!(
            recorded_digest(&converted.path().join("runs"), &from_converted.run, stage),
            recorded_digest(&csv.path().join("runs"), &from_csv.run, stage),
            "{extension}: {stage}"
        );
    }
    // The tokens are the same, so the train stage's key is too.
    assert_eq!(from_converted.key("train"), from_csv.key("train"));
    assert_eq!(from_converted.metrics, from_csv.metrics);
    // Predicting from such a file reads it the same way.
    let input = converted.path().join(format!("data/validation.{extension}"));
    let out =
        pipe_ok(converted.path(), &["predict", &from_converted.run, "--input", input.to_str().unwrap()]);
    assert_eq!(out.lines().count(), 13, "a header and 12 rows:\n{out}");
    (converted, from_converted)
}

#[test]
fn json_lines_give_the_same_tokens_weights_and_metrics_as_the_csv() {
    same_outputs_as_csv("jsonl", csv_to_jsonl);
}

#[test]
fn parquet_gives_the_same_tokens_weights_and_metrics_as_the_csv() {
    let Some(python) = test_python() else { return };
    let (dir, run) = same_outputs_as_csv("parquet", |from, to| csv_to_parquet(&python, from, to));
    // A file whose extension says nothing is read as the pipeline's `dataset.format` says.
    let data = dir.path().join("data");
    std::fs::rename(data.join("validation.parquet"), data.join("validation.data")).unwrap();
    let out =
        pipe_ok(dir.path(), &["predict", &run.run, "--input", "data/validation.data", "--format", "parquet"]);
    assert_eq!(out.lines().count(), 13, "{out}");
    let pipeline = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    let pipeline = pipeline
        .replace("validation.parquet", "validation.data")
        .replace("[dataset]", "[dataset]\nformat = \"parquet\"");
    std::fs::write(dir.path().join("pipeline.toml"), pipeline).unwrap();
    let again = run_json(dir.path(), &[]);
    assert_eq!(again.metrics, run.metrics);
}

#[test]
fn a_truncated_or_mistyped_parquet_file_exits_2_naming_the_file_and_where() {
    let Some(python) = test_python() else { return };
    let dir = project();
    let data = dir.path().join("data");
    csv_to_parquet(&python, &data.join("train.csv"), &data.join("train.parquet"));
    let pipeline = std::fs::read_to_string(dir.path().join("pipeline.toml")).unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), pipeline.replace("train.csv", "train.parquet")).unwrap();
    let bytes = std::fs::read(data.join("train.parquet")).unwrap();
    std::fs::write(data.join("train.parquet"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    let output = pipe(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&["run"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("data file `data/train.parquet`") && stderr.contains("is the file complete?"),
        "{stderr}"
    );
    // A label column of floats (pandas' type for a column with a missing value) names the column.
    python_ok(
        &python,
        "import sys, pyarrow as pa, pyarrow.parquet as p\n\
         p.write_table(pa.table({'text': ['a', 'b'], 'label': [1.0, None]}), sys.argv[1])",
        &[data.join("train.parquet").to_str().unwrap()],
    );
    let output = pipe(dir.path(), &["run", "pipeline.toml"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&["run"], &output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data/train.parquet`, column `label`: holds Float64"), "{stderr}");
    assert!(!dir.path().join("runs/stages").exists(), "nothing is stored");
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

/// The train stage's key in `pipe plan`'s output (known once tokenize is done).
fn planned_train_key(plan: &str) -> String {
    let line = plan.lines().find(|l| l.starts_with("train ")).unwrap_or_else(|| panic!("{plan}"));
    line.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn the_quick_start_as_json_lines_and_parquet_tokenizes_to_the_csv_bits() {
    let (Some(_), Some(python)) = (minilm_dir(), test_python()) else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let store = tempfile::tempdir().unwrap();
    let store_arg = store.path().to_str().unwrap();
    // Tokenize only, then plan: the train key holds the tokenize output's digest, so equal train
    // keys mean the same token ids and labels (and so the same trained weights).
    let tokenized = |sets: &[String]| -> String {
        let mut args = vec!["run", "pipelines/quickstart.toml", "--until", "tokenize", "--store", store_arg];
        let mut plan = vec!["plan", "pipelines/quickstart.toml", "--store", store_arg];
        for set in sets {
            args.extend(["--set", set]);
            plan.extend(["--set", set]);
        }
        pipe_ok(root, &args);
        planned_train_key(&pipe_ok(root, &plan))
    };
    let from_csv = tokenized(&[]);
    let data = tempfile::tempdir().unwrap();
    for extension in ["jsonl", "parquet"] {
        let mut sets = Vec::new();
        for (split, csv) in
            [("train", "data/sst2/train-4000.csv"), ("validation", "data/sst2/validation.csv")]
        {
            let to = data.path().join(format!("{split}.{extension}"));
            match extension {
                "jsonl" => csv_to_jsonl(&root.join(csv), &to),
                _ => csv_to_parquet(&python, &root.join(csv), &to),
            }
            sets.push(format!("dataset.{split}={}", to.display()));
        }
        assert_eq!(tokenized(&sets), from_csv, "{extension}");
    }
}
