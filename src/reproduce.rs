//! `pipe reproduce`: re-execute a recorded run from scratch and compare every output with the
//! record, bit for bit.
//!
//! The record carries the resolved configuration, each stage's input digests and each output
//! file's digest. Reproducing (1) checks the inputs first, naming any whose content differs before
//! doing any work, (2) runs every stage in an empty scratch store (never from the cache), (3)
//! compares each stage's files with the record, and (4) checks the copies still kept in the
//! record's own store, if any. Environment differences (pipe version, threads, device, dtype, OS)
//! are listed alongside, as likely explanations of a mismatch.

use std::collections::BTreeMap;

use crate::config::{self, Pipeline};
use crate::device::Target;
use crate::engine::{self, EngineError, build_stages};
use crate::plan::StageKind;
use crate::records::Record;
use crate::stages::{Observer, Upstream};
use crate::store::{Lookup, Store, StoreError, short};

/// How one stage compared with the record.
#[derive(Debug, Clone, PartialEq)]
pub struct StageVerdict {
    pub kind: StageKind,
    /// What differs; empty when the stage reproduced bit for bit.
    pub differences: Vec<String>,
}

/// The outcome of `pipe reproduce`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reproduction {
    /// Inputs whose content differs from the record (nothing was run when this is not empty).
    pub changed_inputs: Vec<String>,
    /// Per stage, in order (empty when inputs changed).
    pub stages: Vec<StageVerdict>,
    /// Problems with the outputs kept in the record's store (and in its remote, if any).
    pub stored_copies: Vec<String>,
    /// Stages whose copy in the store's remote matches the record, file for file.
    pub remote_matches: usize,
    /// `field: recorded -> now` for environment facts that differ.
    pub environment: Vec<String>,
}

impl Reproduction {
    /// Whether everything matched.
    pub fn identical(&self) -> bool {
        self.changed_inputs.is_empty()
            && self.stored_copies.is_empty()
            && self.stages.iter().all(|s| s.differences.is_empty())
    }
}

/// Re-executes `record` in a scratch store under `store` and compares.
pub fn reproduce(store: &Store, record: &Record, observe: Observer<'_>) -> Result<Reproduction, EngineError> {
    let scratch_root =
        store.root().join("tmp").join(format!("reproduce-{}-{}", record.id, std::process::id()));
    let result = reproduce_in(store, &scratch_root, record, observe);
    let _ = std::fs::remove_dir_all(&scratch_root);
    result
}

fn reproduce_in(
    store: &Store,
    scratch_root: &std::path::Path,
    record: &Record,
    observe: Observer<'_>,
) -> Result<Reproduction, EngineError> {
    std::fs::create_dir_all(scratch_root)
        .map_err(|source| StoreError::Io { path: scratch_root.into(), source })?;
    let config_path = scratch_root.join("pipeline.toml");
    std::fs::write(&config_path, record.config_toml())
        .map_err(|source| StoreError::Io { path: config_path.clone(), source })?;
    // The record's configuration alone: no PIPE_* variables, no overrides.
    let pipeline = config::load_with_env(&config_path, &[], &[])?;

    let mut changed_inputs = Vec::new();
    let (stages, target) = build_stages(&pipeline)?;
    let environment = environment_differences(record, &target, &pipeline);
    for stage in stages {
        let kind = stage.kind();
        let now = stage.key_fields(&Upstream::new()).inputs;
        let recorded = recorded_inputs(record, kind);
        for (name, digest) in &now {
            let is_upstream = StageKind::ALL.iter().any(|k| k.name() == name);
            match recorded.get(name) {
                _ if is_upstream => {}
                Some(old) if old == digest => {}
                Some(old) => changed_inputs.push(format!(
                    "{name}: sha256 {} in the record, {} now",
                    short(old),
                    short(digest)
                )),
                None => changed_inputs.push(format!("{name}: not in the record")),
            }
        }
    }
    changed_inputs.dedup();
    let (stored_copies, remote_matches) = check_stored_copies(store, record)?;
    if !changed_inputs.is_empty() {
        return Ok(Reproduction {
            changed_inputs,
            stages: Vec::new(),
            stored_copies,
            remote_matches,
            environment,
        });
    }

    let scratch = Store::new(scratch_root.join("store"));
    let outcome = engine::run(&pipeline, &scratch, observe)?;
    let mut stages = Vec::new();
    for kind in StageKind::ALL {
        let mut differences = Vec::new();
        let recorded = recorded_files(record, kind);
        let key = &outcome.stages.iter().find(|s| s.kind == kind).expect("every stage ran").key;
        let recorded_key = record.stage(kind.name()).and_then(|s| s.get("key")).and_then(|k| k.as_str());
        if recorded_key != Some(key.as_str()) {
            differences.push(format!(
                "stage key {} differs from the record's {} (pipe's stage format or parameters changed)",
                short(key),
                recorded_key.map_or("(none)", short)
            ));
        }
        let Lookup::Hit(out) = scratch.lookup(kind.name(), key)? else {
            differences.push("the re-executed stage did not verify".into());
            stages.push(StageVerdict { kind, differences });
            continue;
        };
        for (path, digest) in &recorded {
            match out.manifest.files.get(path) {
                Some(e) if &e.sha256 == digest => {}
                Some(e) => differences.push(format!(
                    "{path}: sha256 {} now, {} in the record",
                    short(&e.sha256),
                    short(digest)
                )),
                None => differences.push(format!("{path}: not produced now")),
            }
        }
        for path in out.manifest.files.keys().filter(|p| !recorded.contains_key(*p)) {
            differences.push(format!("{path}: produced now, not in the record"));
        }
        stages.push(StageVerdict { kind, differences });
    }
    Ok(Reproduction { changed_inputs, stages, stored_copies, remote_matches, environment })
}

/// The stage's input digests as recorded.
fn recorded_inputs(record: &Record, kind: StageKind) -> BTreeMap<String, String> {
    string_map(record.stage(kind.name()).and_then(|s| s.get("inputs")))
}

/// The stage's output file digests as recorded.
fn recorded_files(record: &Record, kind: StageKind) -> BTreeMap<String, String> {
    string_map(record.stage(kind.name()).and_then(|s| s.get("files")))
}

fn string_map(value: Option<&toml::Value>) -> BTreeMap<String, String> {
    value
        .and_then(toml::Value::as_table)
        .map(|t| t.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// Stage outputs kept in the record's store (and its remote) that no longer match the record,
/// and how many of the remote's copies match it.
fn check_stored_copies(store: &Store, record: &Record) -> Result<(Vec<String>, usize), EngineError> {
    let mut problems = Vec::new();
    let mut remote_matches = 0;
    for kind in StageKind::ALL {
        let Some(key) = record.stage(kind.name()).and_then(|s| s.get("key")).and_then(|k| k.as_str()) else {
            continue;
        };
        match store.lookup(kind.name(), key)? {
            Lookup::Miss => {}
            Lookup::Corrupt(why) => {
                problems.push(format!("{kind}: the stored copy in {}: {why}", store.root().display()))
            }
            Lookup::Hit(out) => {
                for (path, digest) in recorded_files(record, kind) {
                    if out.manifest.files.get(&path).map(|e| &e.sha256) != Some(&digest) {
                        problems.push(format!("{kind}: the stored {path} differs from the record"));
                    }
                }
            }
        }
        let Some(remote) = store.remote() else { continue };
        match remote.manifest(kind.name(), key)? {
            Ok(manifest) => {
                let files: BTreeMap<String, String> =
                    manifest.files.into_iter().map(|(path, e)| (path, e.sha256)).collect();
                if files == recorded_files(record, kind) {
                    remote_matches += 1;
                } else {
                    problems.push(format!(
                        "{kind}: the copy in the remote {} differs from the record",
                        remote.url()
                    ));
                }
            }
            Err(crate::store::remote::Download::Invalid(why)) => {
                problems.push(format!("{kind}: the copy in the remote {}: {why}", remote.url()))
            }
            Err(_) => {}
        }
    }
    Ok((problems, remote_matches))
}

/// Environment facts that differ between the record and this process, as `field: then -> now`
/// (nested tables by dotted field, e.g. `stage_versions.train`).
fn environment_differences(record: &Record, target: &Target, pipeline: &Pipeline) -> Vec<String> {
    let now = crate::environment::current(target, pipeline.dtype);
    let now: toml::Value = toml::Value::try_from(&now).unwrap_or(toml::Value::Table(Default::default()));
    let empty = toml::Table::new();
    let then = record.table.get("environment").and_then(toml::Value::as_table).unwrap_or(&empty);
    let (now, then) = (environment_fields(now.as_table().unwrap_or(&empty)), environment_fields(then));
    now.iter()
        .filter(|(field, value)| then.get(*field) != Some(value))
        .map(|(field, value)| {
            format!("{field}: {} -> {value}", then.get(field).map_or("(unrecorded)", String::as_str))
        })
        .collect()
}

/// `dotted.field -> text` for every leaf (strings as they are, other values as TOML).
fn environment_fields(table: &toml::Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (key, value) in table {
            let field = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(t) => walk(&field, t, out),
                toml::Value::String(s) => drop(out.insert(field, s.clone())),
                other => drop(out.insert(field, other.to_string())),
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}
