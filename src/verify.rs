//! `pipe verify`: re-hash everything in a store, set aside what is corrupt, clear leftovers.
//!
//! Lookups already verify a stage before reusing it; `verify` does it for the whole store at once,
//! so that damage (a disk error, a hand edit, a kill at a bad moment) is found before anyone relies
//! on it:
//!
//! - every finished stage (`stages/<kind>/<key>/`) is re-hashed against its manifest; a corrupt or
//!   incomplete one is moved to `corrupt/` (kept for inspection, never reused);
//! - every run record is parsed and checked: its id is the hash of its stage keys, its keys and
//!   digests are well formed, and where its stages are stored their digests agree; a bad record is
//!   moved to `corrupt/` too;
//! - work left by a killed run (`tmp/<kind>-<key>/` whose lock nobody holds) loses its partial
//!   outputs, which are never trusted; its checkpoint is kept, with its size reported, since the
//!   next run of that key resumes from it, unless asked to drop checkpoints (a key that will not
//!   run again would keep hundreds of MB otherwise). Temporary files of interrupted atomic writes
//!   are removed.
//!
//! Work in progress (a lock held by a running process) is left alone.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::plan::{StageKind, run_id};
use crate::records::{self, Record};
use crate::store::{Lookup, Store, StoreError, is_digest, short};

/// What `verify` found and did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Verification {
    /// Finished stages that verified.
    pub stages_ok: usize,
    /// Records that verified.
    pub records_ok: usize,
    /// Corrupt or incomplete items, each with what was done with it.
    pub corrupt: Vec<String>,
    /// Leftovers of interrupted work that were cleared (not an error).
    pub cleaned: Vec<String>,
}

impl Verification {
    /// Whether nothing corrupt was found.
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Verifies the store at `store` (see the module doc); `drop_checkpoints` also removes the
/// checkpoints of interrupted work.
pub fn verify(store: &Store, drop_checkpoints: bool) -> Result<Verification, StoreError> {
    let mut v = Verification::default();
    if !store.root().exists() {
        return Ok(v);
    }
    let corrupt_dir = store.root().join("corrupt");
    let set_aside = |path: &Path, name: &str| -> Result<PathBuf, StoreError> {
        fs::create_dir_all(&corrupt_dir).map_err(io(&corrupt_dir))?;
        let mut dest = corrupt_dir.join(name);
        let mut n = 1;
        while dest.exists() {
            dest = corrupt_dir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &dest).map_err(io(path))?;
        Ok(dest)
    };

    // Finished stages.
    for kind in StageKind::ALL {
        let dir = store.root().join("stages").join(kind.name());
        for entry in read_dir(&dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let why = if !is_digest(&name) {
                Some("not named by a stage key".to_string())
            } else {
                match store.lookup(kind.name(), &name)? {
                    Lookup::Hit(_) => None,
                    Lookup::Miss => Some("vanished while verifying".into()),
                    Lookup::Corrupt(why) => Some(why),
                }
            };
            match why {
                None => v.stages_ok += 1,
                Some(why) => {
                    let dest = set_aside(&entry.path(), &format!("{kind}-{name}"))?;
                    v.corrupt.push(format!("{kind} {}: {why}; moved to {}", short(&name), dest.display()));
                }
            }
        }
    }

    // Run records.
    for entry in read_dir(store.root())? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        if name.contains(".tmp-") {
            fs::remove_file(&path).map_err(io(&path))?;
            v.cleaned.push(format!("{name}: an interrupted write, removed"));
            continue;
        }
        let Some(id) = name.strip_suffix(".toml") else { continue };
        let problem = if !records::is_run_id(id) {
            Some("not named by a run id".to_string())
        } else {
            match Record::read(store, id) {
                Err(e) => Some(e.to_string()),
                Ok(record) => record_problem(store, &record)?,
            }
        };
        match problem {
            None => v.records_ok += 1,
            Some(why) => {
                let dest = set_aside(&path, &name)?;
                v.corrupt.push(format!("record {name}: {why}; moved to {}", dest.display()));
            }
        }
    }

    // Work left by killed runs.
    let tmp = store.root().join("tmp");
    for entry in read_dir(&tmp)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        // Held until this entry is dealt with, so that a run starting on the same key meanwhile
        // waits instead of having its fresh work removed.
        let lock = store.root().join("locks").join(format!("{name}.lock"));
        let held = File::options().write(true).open(&lock).ok();
        if held.as_ref().is_some_and(|file| file.try_lock().is_err()) {
            continue; // a running process owns it
        }
        let out = dir.join("out");
        if out.exists() {
            fs::remove_dir_all(&out).map_err(io(&out))?;
            v.cleaned.push(format!("tmp/{name}: partial outputs of an interrupted run, removed"));
        }
        let checkpoint = dir.join("checkpoint");
        if checkpoint.exists() && !drop_checkpoints {
            let mib = size(&checkpoint) as f64 / (1 << 20) as f64;
            v.cleaned.push(format!(
                "tmp/{name}: checkpoint kept, {mib:.1} MiB (the next run of that stage resumes from it; \
                 --drop-checkpoints removes it)"
            ));
        } else {
            if checkpoint.exists() {
                let mib = size(&checkpoint) as f64 / (1 << 20) as f64;
                v.cleaned.push(format!("tmp/{name}: checkpoint removed, {mib:.1} MiB"));
            }
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
    }
    Ok(v)
}

/// Why a parsed record does not hold together, if it does not.
fn record_problem(store: &Store, record: &Record) -> Result<Option<String>, StoreError> {
    let mut keys = Vec::new();
    for kind in StageKind::ALL {
        let Some(stage) = record.stage(kind.name()) else {
            return Ok(Some(format!("no {kind} stage")));
        };
        let (Some(key), Some(digest)) = (
            stage.get("key").and_then(toml::Value::as_str),
            stage.get("digest").and_then(toml::Value::as_str),
        ) else {
            return Ok(Some(format!("stage {kind} has no key or digest")));
        };
        keys.push(key.to_string());
        if let Lookup::Hit(out) = store.lookup(kind.name(), key)? {
            if out.manifest.digest != digest {
                return Ok(Some(format!("stage {kind}: its digest differs from the stored stage's")));
            }
            let files = stage.get("files").and_then(toml::Value::as_table);
            let agrees = files.is_some_and(|files| {
                files.len() == out.manifest.files.len()
                    && files
                        .iter()
                        .all(|(p, d)| out.manifest.files.get(p).map(|e| e.sha256.as_str()) == d.as_str())
            });
            if !agrees {
                return Ok(Some(format!("stage {kind}: its file digests differ from the stored stage's")));
            }
        }
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    if run_id(&keys) != record.id {
        return Ok(Some("its id is not the hash of its stage keys (edited by hand?)".into()));
    }
    Ok(None)
}

/// Bytes of the files under `dir`.
fn size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The entries of `dir`, sorted by name; none when it does not exist.
fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out: Vec<fs::DirEntry> = entries.collect::<Result<_, _>>().map_err(io(dir))?;
    out.sort_by_key(|e| e.file_name());
    Ok(out)
}
