//! Every run record checked into `runs/` reproduces, bit for bit, with the current code: the
//! README's promise that a colleague's run can be re-made from its hash. The records were made
//! with the real MiniLM, which CI fetches (`scripts/test.sh`); elsewhere without it, SKIPPED.

mod common;

use std::path::Path;

use common::*;

#[test]
fn every_checked_in_run_record_reproduces_bit_for_bit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut records: Vec<_> = std::fs::read_dir(root.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    records.sort();
    assert!(!records.is_empty(), "the README advertises a checked-in record in runs/");
    if minilm_dir().is_none() {
        return;
    }
    for record in records {
        let id = record.file_stem().unwrap().to_str().unwrap().to_string();
        // Only the record, in an empty store: every stage is re-executed from its inputs.
        let store = tempfile::tempdir().unwrap();
        std::fs::copy(&record, store.path().join(format!("{id}.toml"))).unwrap();
        let args = ["reproduce", &id, "--store", store.path().to_str().unwrap()];
        let output = pipe(root, &args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(&format!("run {id} reproduced bit for bit")),
            "{}",
            describe(&args, &output)
        );
        eprintln!("runs/{id}.toml reproduced bit for bit:\n{stdout}");
    }
}
