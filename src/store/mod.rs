//! The content-addressed store of stage outputs and run records.
//!
//! ```text
//! runs/                              (--store DIR, PIPE_STORE; default ./runs)
//! ├── .gitignore                     ignores everything below except the run records
//! ├── 7d2e94c1a0b3.toml              run records: resolved config, keys, digests, metrics (in git)
//! ├── stages/<kind>/<key>/           a finished stage: its output files, and MANIFEST.json
//! ├── refs/<pipeline>/<kind>.json    the key fields of a pipeline's last run of a stage (for `plan`)
//! ├── tmp/<kind>-<key>/              work in progress: out/ (outputs) and checkpoint/ (resume state)
//! └── locks/<kind>-<key>.lock        held while a stage with that key runs
//! ```
//!
//! **A stage counts as done only through its manifest.** Outputs are written to
//! `tmp/<kind>-<key>/out/`, hashed, the manifest (every file with its SHA-256, and the stage's
//! digest over them) is written and synced last, and the directory is renamed into
//! `stages/<kind>/<key>/` in one step. A process killed at any point leaves either no directory
//! under `stages/` or a complete one; leftovers in `tmp/` are cleared (or resumed from) by the next
//! run of that key.
//!
//! **Reuse is verified.** A lookup re-hashes every file against the manifest; a mismatch (a file
//! edited, truncated or missing) is reported and treated as a miss, and the corrupt directory is
//! set aside when the stage runs again, never silently reused.
//!
//! **Concurrent runs do not collide.** Running a stage takes an exclusive file lock for its key
//! (released by the OS even when the process is killed). A second run of the same pipeline waits,
//! then finds the stage done and reuses it instead of doing the work twice.
//!
//! Nothing is written by lookups: a pipeline that fails its input checks leaves the store as it
//! was (it may not even exist yet).
//!
//! **A remote may stand behind it** ([`remote`]: a bucket or a shared directory): stages the
//! local store lacks are pulled from it, re-hashed and committed through the same [`WorkDir`]
//! as computed ones ([`crate::share`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::digest;

pub mod remote;

pub use remote::{Remote, RemoteError};

/// The manifest's file name inside a finished stage directory.
pub const MANIFEST: &str = "MANIFEST.json";

/// Errors from the store's file system work.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: unreadable manifest: {source}", path.display())]
    Manifest { path: PathBuf, source: serde_json::Error },
    /// A stage key that is not a SHA-256 digest (64 lowercase hex digits), e.g. from an edited
    /// record: it is never joined to a path.
    #[error("`{0}` is not a stage key (64 lowercase hexadecimal digits)")]
    InvalidKey(String),
}

/// Whether `s` is a SHA-256 digest as pipe writes them: 64 lowercase hexadecimal digits. Keys and
/// digests read from records, refs or manifests are checked with this before they become paths.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `rel` is a safe path for a file inside a stage directory: relative, `/`-separated,
/// with no empty, `.` or `..` component (so joining it never leaves the directory).
fn is_safe_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.contains('\\')
        && !rel.contains('\0')
        && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// One output file of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// The record of a finished stage, written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: String,
    pub key: String,
    /// SHA-256 over the sorted (path, file digest) list: the stage's output digest.
    pub digest: String,
    pub files: BTreeMap<String, FileEntry>,
    /// Facts about the run that made these outputs (seconds, throughput, environment). They vary
    /// from run to run and are deliberately not part of the digest.
    pub facts: serde_json::Value,
}

impl Manifest {
    /// Checks that the manifest belongs to stage `kind`/`key`, that its digest is the one its
    /// file list gives, and that every path stays inside the stage directory; the reason if not.
    /// (The files themselves are checked against it by whoever holds them.)
    pub fn check(&self, kind: &str, key: &str) -> Result<(), String> {
        if self.key != key || self.kind != kind {
            return Err("manifest belongs to another stage".into());
        }
        if self.files.is_empty() {
            return Err("the manifest lists no files".into());
        }
        // The digest downstream keys are made of must be the one these files give.
        if self.digest != listing_digest(&self.files) {
            return Err("the manifest's digest does not match its file list".into());
        }
        for (rel, entry) in &self.files {
            if !is_safe_relative(rel) || rel == MANIFEST {
                return Err(format!("the manifest lists an invalid path {rel:?}"));
            }
            if !is_digest(&entry.sha256) {
                return Err(format!("{rel}: `{}` is not a SHA-256 digest", entry.sha256));
            }
        }
        Ok(())
    }

    /// The manifest as pipe writes it: pretty JSON (pushed and pulled byte for byte after that).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifests serialise")
    }
}

/// A finished stage in the store.
#[derive(Debug, Clone)]
pub struct StageOutput {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl StageOutput {
    /// Path of one output file.
    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

/// The result of looking a stage key up.
#[derive(Debug)]
pub enum Lookup {
    /// Done, and every file matches its manifest.
    Hit(StageOutput),
    /// Never finished (or never started).
    Miss,
    /// A directory exists but does not match its manifest; the reason says how.
    Corrupt(String),
}

/// A store rooted at a directory (which need not exist until something is written), with an
/// optional remote behind it.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    remote: Option<Arc<Remote>>,
}

impl Store {
    /// The store at `root`. Creates nothing.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), remote: None }
    }

    /// This store with `remote` as its second tier: stages missing here are looked for there
    /// before they run (and pushed there after, when the remote says so).
    pub fn with_remote(mut self, remote: Remote) -> Self {
        self.remote = Some(Arc::new(remote));
        self
    }

    /// The remote behind this store, if any.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a finished stage lives.
    pub fn stage_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("stages").join(kind).join(key)
    }

    /// The `(kind, key)` of every stage directory named by a key, sorted (finished or corrupt:
    /// a lookup tells which).
    pub fn stage_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut keys = Vec::new();
        let stages = self.root.join("stages");
        for kind in read_dir_names(&stages)? {
            for key in read_dir_names(&stages.join(&kind))?.into_iter().filter(|k| is_digest(k)) {
                keys.push((kind.clone(), key));
            }
        }
        Ok(keys)
    }

    /// Looks a stage up and verifies its files against the manifest.
    pub fn lookup(&self, kind: &str, key: &str) -> Result<Lookup, StoreError> {
        if !is_digest(key) {
            return Err(StoreError::InvalidKey(key.into()));
        }
        let dir = self.stage_dir(kind, key);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) => return Err(io(&dir)(e)),
            Ok(meta) if !meta.is_dir() => {
                return Ok(Lookup::Corrupt("not a directory (a symbolic link or a file)".into()));
            }
            Ok(_) => {}
        }
        let manifest_path = dir.join(MANIFEST);
        let text = match fs::read(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(if dir.exists() { Lookup::Corrupt("no manifest".into()) } else { Lookup::Miss });
            }
            Err(e) => return Err(io(&manifest_path)(e)),
        };
        let manifest: Manifest = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => return Ok(Lookup::Corrupt(format!("unreadable manifest: {e}"))),
        };
        if let Err(why) = manifest.check(kind, key) {
            return Ok(Lookup::Corrupt(why));
        }
        for (rel, entry) in &manifest.files {
            let path = dir.join(rel);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => return Ok(Lookup::Corrupt(format!("{rel}: not a regular file"))),
                Err(e) => return Ok(Lookup::Corrupt(format!("{rel}: {e}"))),
            }
            match digest::file(&path) {
                Ok(d) if d == entry.sha256 => {}
                Ok(d) => {
                    return Ok(Lookup::Corrupt(format!(
                        "{rel}: content changed (sha256 {} -> {})",
                        short(&entry.sha256),
                        short(&d)
                    )));
                }
                Err(e) => return Ok(Lookup::Corrupt(format!("{rel}: {e}"))),
            }
        }
        Ok(Lookup::Hit(StageOutput { dir, manifest }))
    }

    /// Starts work on a stage: takes its lineage's lock (waiting for another run that holds it,
    /// after calling `on_wait`), then looks again in case that run finished it.
    ///
    /// A lineage is the key of the complete computation a stage is a prefix of: a train stage
    /// that stops after an epoch shares its lineage (and so its checkpoints, and its lock) with
    /// the run that trains to the end, which then resumes where the shorter one stopped. A stage
    /// whose key is its lineage removes its checkpoints when it commits; a prefix keeps them.
    pub fn begin(
        &self,
        kind: &str,
        key: &str,
        lineage: &str,
        on_wait: impl FnOnce(),
    ) -> Result<Begin, StoreError> {
        for key in [key, lineage] {
            if !is_digest(key) {
                return Err(StoreError::InvalidKey(key.into()));
            }
        }
        let (lock, lock_path) = self.lock_file(kind, lineage)?;
        self.write_gitignore()?;
        if lock.try_lock().is_err() {
            on_wait();
            lock.lock().map_err(io(&lock_path))?;
        }
        match self.lookup(kind, key)? {
            Lookup::Hit(out) => return Ok(Begin::Done(out)),
            Lookup::Miss => {}
            Lookup::Corrupt(_) => self.set_aside(&self.stage_dir(kind, key))?,
        }
        let dir = self.work_dir(kind, lineage);
        let out = dir.join("out");
        // A previous attempt's partial outputs are never trusted; its checkpoints may be.
        if out.exists() {
            fs::remove_dir_all(&out).map_err(io(&out))?;
        }
        fs::create_dir_all(&out).map_err(io(&out))?;
        Ok(Begin::Work(WorkDir {
            store: self.clone(),
            kind: kind.into(),
            key: key.into(),
            prefix: key != lineage,
            dir,
            out,
            _lock: lock,
        }))
    }

    /// The lock file of a lineage (or key), opened (not yet locked), and its path.
    fn lock_file(&self, kind: &str, lineage: &str) -> Result<(File, PathBuf), StoreError> {
        let locks = self.root.join("locks");
        fs::create_dir_all(&locks).map_err(io(&locks))?;
        let lock_path = locks.join(format!("{kind}-{lineage}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        Ok((lock, lock_path))
    }

    /// Where work on a lineage happens (its partial outputs and checkpoints).
    fn work_dir(&self, kind: &str, lineage: &str) -> PathBuf {
        self.root.join("tmp").join(format!("{kind}-{lineage}"))
    }

    /// Drops the checkpoints a prefix of `lineage` kept (a pruned sweep trial that will not be
    /// continued), unless a run is working on the lineage now.
    pub fn discard_checkpoints(&self, kind: &str, lineage: &str) -> Result<(), StoreError> {
        let lock_path = self.root.join("locks").join(format!("{kind}-{lineage}.lock"));
        let Ok(lock) = File::options().write(true).open(&lock_path) else { return Ok(()) };
        if lock.try_lock().is_err() {
            return Ok(());
        }
        let dir = self.work_dir(kind, lineage);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Deletes a finished stage, unless a run holds its lock: whether it was deleted. It leaves
    /// `stages/` in one rename, so a reader never sees half of it.
    pub fn remove_stage(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        if !is_digest(key) {
            return Err(StoreError::InvalidKey(key.into()));
        }
        let (lock, _) = self.lock_file(kind, key)?;
        if lock.try_lock().is_err() {
            return Ok(false);
        }
        self.set_aside(&self.stage_dir(kind, key))?;
        Ok(true)
    }

    /// Moves a corrupt stage directory out of the way (into `tmp/`, then deletes it).
    fn set_aside(&self, dir: &Path) -> Result<(), StoreError> {
        let trash = self.root.join("tmp").join(format!("corrupt-{}", std::process::id()));
        fs::create_dir_all(self.root.join("tmp")).map_err(io(dir))?;
        fs::rename(dir, &trash).map_err(io(dir))?;
        fs::remove_dir_all(&trash).map_err(io(&trash))
    }

    fn write_gitignore(&self) -> Result<(), StoreError> {
        let path = self.root.join(".gitignore");
        if !path.exists() {
            write_atomic(
                &path,
                b"# Artifacts stay local; run and sweep records (*.toml) are meant for git.\n*\n!*.toml\n!.gitignore\n!sweeps/\n",
            )?;
        }
        Ok(())
    }

    /// Writes a run record `<id>.toml` atomically.
    pub fn write_record(&self, id: &str, text: &str) -> Result<PathBuf, StoreError> {
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        self.write_gitignore()?;
        let path = self.record_path(id);
        let tmp = temporary(&path);
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
        crate::fault::point("record.written");
        fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Writes a sweep record `sweeps/<id>.toml` atomically (for git, like run records).
    pub fn write_sweep_record(&self, id: &str, text: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("sweeps");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        self.write_gitignore()?;
        let path = dir.join(format!("{id}.toml"));
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Where the record of run `id` lives.
    pub fn record_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.toml"))
    }

    /// Ids of every run record, sorted.
    pub fn record_ids(&self) -> Result<Vec<String>, StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.root)(e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only files named like records: a stray `notes.toml` is not a run.
            if let Some(id) = name.strip_suffix(".toml").filter(|id| crate::records::is_run_id(id)) {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Remembers the key fields of `pipeline`'s latest run of a stage (to explain `plan`).
    pub fn write_ref(
        &self,
        pipeline: &str,
        kind: &str,
        fields: &serde_json::Value,
    ) -> Result<(), StoreError> {
        if self.read_ref(pipeline, kind).as_ref() == Some(fields) {
            return Ok(()); // a cached re-run writes nothing
        }
        let dir = self.root.join("refs").join(pipeline);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let text = serde_json::to_string_pretty(fields).expect("JSON values serialise");
        write_atomic(&dir.join(format!("{kind}.json")), text.as_bytes())
    }

    /// The key fields remembered by [`Store::write_ref`], if any.
    pub fn read_ref(&self, pipeline: &str, kind: &str) -> Option<serde_json::Value> {
        let path = self.root.join("refs").join(pipeline).join(format!("{kind}.json"));
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }
}

/// The outcome of [`Store::begin`].
pub enum Begin {
    /// Another run finished the stage while this one waited for the lock.
    Done(StageOutput),
    /// The lock is held: do the work in the directory, then commit.
    Work(WorkDir),
}

/// A stage being worked on, holding its lock until committed or dropped.
pub struct WorkDir {
    store: Store,
    kind: String,
    key: String,
    /// A prefix of its lineage: checkpoints outlive the commit, for the run that continues.
    prefix: bool,
    dir: PathBuf,
    out: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// The key of the stage being worked on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where the stage writes its outputs.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Where the stage may keep state that survives an interruption (checkpoints).
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    /// Hashes the outputs, writes the manifest last, and moves the directory into place.
    pub fn commit(self, facts: serde_json::Value) -> Result<StageOutput, StoreError> {
        let mut files = BTreeMap::new();
        for entry in walkdir::WalkDir::new(&self.out).sort_by_file_name() {
            let entry = entry.map_err(|e| StoreError::Io { path: self.out.clone(), source: e.into() })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path();
            let rel = path.strip_prefix(&self.out).expect("walkdir stays below its root");
            let rel = rel.to_string_lossy().replace('\\', "/");
            File::open(path).and_then(|f| f.sync_all()).map_err(io(path))?;
            let sha256 = digest::file(path).map_err(io(path))?;
            let bytes =
                entry.metadata().map_err(|e| StoreError::Io { path: path.into(), source: e.into() })?.len();
            files.insert(rel, FileEntry { sha256, bytes });
        }
        crate::fault::point_in("store.outputs-hashed", &self.kind);
        let manifest = Manifest {
            kind: self.kind.clone(),
            key: self.key.clone(),
            digest: listing_digest(&files),
            files,
            facts,
        };
        let text = manifest.to_json();
        self.install(manifest, text.as_bytes())
    }

    /// Commits outputs that were downloaded into [`WorkDir::out`] and checked, file by file,
    /// against `manifest` (a remote's copy of the stage): writes that manifest last and moves the
    /// directory into place, as [`WorkDir::commit`] does.
    /// `text` is the manifest as the remote stores it, written as it is.
    pub fn commit_checked(self, manifest: Manifest, text: &[u8]) -> Result<StageOutput, StoreError> {
        debug_assert!(manifest.check(&self.kind, &self.key).is_ok());
        self.install(manifest, text)
    }

    fn install(self, manifest: Manifest, text: &[u8]) -> Result<StageOutput, StoreError> {
        write_atomic(&self.out.join(MANIFEST), text)?;
        crate::fault::point_in("store.manifest-written", &self.kind);
        let dest = self.store.stage_dir(&self.kind, &self.key);
        let parent = dest.parent().expect("stage dirs have a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        fs::rename(&self.out, &dest).map_err(io(&dest))?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
        crate::fault::point_in("store.renamed", &self.kind);
        if !self.prefix {
            fs::remove_dir_all(&self.dir).map_err(io(&self.dir))?;
        }
        Ok(StageOutput { dir: dest, manifest })
    }
}

/// The names in a directory, sorted (none if it does not exist).
fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry.map_err(io(dir))?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Writes a file through a temporary sibling and a rename, synced, so readers never see half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = temporary(path);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    crate::fault::point("atomic.before-rename");
    fs::rename(&tmp, path).map_err(io(path))
}

/// A temporary sibling of `path` that no other write uses: the process id and a counter, since
/// a sweep's parallel trials write the same files (refs, `.gitignore`) from one process.
fn temporary(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_extension(format!("tmp-{}-{n}", std::process::id()))
}

/// A stage's output digest: SHA-256 over its sorted `(path, file digest)` list.
fn listing_digest(files: &BTreeMap<String, FileEntry>) -> String {
    let listing: String = files.iter().map(|(p, e)| format!("{p}\0{}\n", e.sha256)).collect();
    digest::bytes(listing.as_bytes())
}

/// The first 12 characters of a digest, for messages (whole if shorter; never splits a character,
/// whatever an edited record holds).
pub fn short(digest: &str) -> &str {
    digest.char_indices().nth(12).map_or(digest, |(at, _)| &digest[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid stage key (64 hex digits) made from a small number.
    fn key(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn finish(store: &Store, key: &str, content: &[u8]) -> StageOutput {
        let Begin::Work(work) = store.begin("tokenize", key, key, || {}).unwrap() else {
            panic!("expected work")
        };
        fs::write(work.out().join("a.bin"), content).unwrap();
        fs::create_dir_all(work.out().join("sub")).unwrap();
        fs::write(work.out().join("sub/b.txt"), b"b").unwrap();
        work.commit(serde_json::json!({"seconds": 1.0})).unwrap()
    }

    #[test]
    fn a_committed_stage_is_found_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("runs"));
        assert!(matches!(store.lookup("tokenize", &key(1)).unwrap(), Lookup::Miss));
        assert!(!store.root().exists(), "a lookup must not create the store");
        let out = finish(&store, &key(1), b"hello");
        assert_eq!(out.manifest.files.len(), 2);
        let Lookup::Hit(hit) = store.lookup("tokenize", &key(1)).unwrap() else { panic!("expected a hit") };
        assert_eq!(hit.manifest, out.manifest);
        assert!(!tmp.path().join(format!("runs/tmp/tokenize-{}", key(1))).exists());
    }

    #[test]
    fn the_digest_depends_on_content_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let da = finish(&Store::new(a.path()), &key(0), b"same").manifest.digest;
        let db = finish(&Store::new(b.path()), &key(0), b"same").manifest.digest;
        assert_eq!(da, db);
        let c = tempfile::tempdir().unwrap();
        assert_ne!(da, finish(&Store::new(c.path()), &key(0), b"other").manifest.digest);
    }

    #[test]
    fn an_edited_output_is_corrupt_and_gets_redone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let out = finish(&store, &key(1), b"hello");
        fs::write(out.file("a.bin"), b"hellO").unwrap();
        let Lookup::Corrupt(why) = store.lookup("tokenize", &key(1)).unwrap() else {
            panic!("expected corrupt")
        };
        assert!(why.contains("a.bin"), "{why}");
        finish(&store, &key(1), b"hello");
        assert!(matches!(store.lookup("tokenize", &key(1)).unwrap(), Lookup::Hit(_)));
    }

    #[test]
    fn an_unfinished_stage_is_a_miss_and_partial_outputs_are_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let Begin::Work(work) = store.begin("train", &key(0), &key(0), || {}).unwrap() else { panic!() };
        fs::write(work.out().join("partial"), b"x").unwrap();
        fs::create_dir_all(work.checkpoint_dir()).unwrap();
        drop(work); // as if killed: no commit
        assert!(matches!(store.lookup("train", &key(0)).unwrap(), Lookup::Miss));
        let Begin::Work(work) = store.begin("train", &key(0), &key(0), || {}).unwrap() else { panic!() };
        assert!(!work.out().join("partial").exists());
        assert!(work.checkpoint_dir().exists(), "checkpoints survive for resuming");
    }

    #[test]
    fn a_second_runner_waits_and_then_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let Begin::Work(work) = store.begin("train", &key(0), &key(0), || {}).unwrap() else { panic!() };
        let other = store.clone();
        let waiter = std::thread::spawn(move || {
            let mut waited = false;
            let r = other.begin("train", &key(0), &key(0), || waited = true).unwrap();
            (waited, matches!(r, Begin::Done(_)))
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        fs::write(work.out().join("model"), b"m").unwrap();
        work.commit(serde_json::Value::Null).unwrap();
        assert_eq!(waiter.join().unwrap(), (true, true));
    }

    #[test]
    fn keys_and_manifest_paths_from_disk_are_validated_before_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        for bad in ["../../etc", "", "k1", &"A".repeat(64), &format!("{}/x", "a".repeat(62))] {
            assert!(matches!(store.lookup("train", bad), Err(StoreError::InvalidKey(_))), "{bad}");
            assert!(matches!(store.begin("train", bad, bad, || {}), Err(StoreError::InvalidKey(_))), "{bad}");
        }
        let out = finish(&store, &key(2), b"hello");
        let manifest_path = out.file(MANIFEST);
        let original = fs::read_to_string(&manifest_path).unwrap();
        let edit = |f: &dyn Fn(&mut Manifest)| {
            let mut m: Manifest = serde_json::from_str(&original).unwrap();
            f(&mut m);
            fs::write(&manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
            match store.lookup("tokenize", &key(2)).unwrap() {
                Lookup::Corrupt(why) => why,
                other => panic!("expected corrupt, got {other:?}"),
            }
        };
        assert!(edit(&|m| m.files.clear()).contains("no files"));
        assert!(edit(&|m| m.digest = key(9)).contains("digest"));
        let escape = |m: &mut Manifest| {
            let entry = m.files.values().next().unwrap().clone();
            m.files.insert("../../outside".into(), entry);
            m.digest = listing_digest(&m.files);
        };
        assert!(edit(&escape).contains("invalid path"));
        fs::write(&manifest_path, &original).unwrap();
        assert!(matches!(store.lookup("tokenize", &key(2)).unwrap(), Lookup::Hit(_)));
    }

    #[cfg(unix)]
    #[test]
    fn a_stage_directory_replaced_by_a_symlink_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let out = finish(&store, &key(3), b"x");
        let elsewhere = tmp.path().join("elsewhere");
        fs::rename(&out.dir, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &out.dir).unwrap();
        let Lookup::Corrupt(why) = store.lookup("tokenize", &key(3)).unwrap() else {
            panic!("expected corrupt")
        };
        assert!(why.contains("symbolic link"), "{why}");
    }

    #[test]
    fn removing_a_stage_skips_one_a_run_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        finish(&store, &key(4), b"x");
        let Begin::Work(work) = store.begin("tokenize", &key(5), &key(5), || {}).unwrap() else { panic!() };
        fs::write(work.out().join("a.bin"), b"y").unwrap();
        // Finished, then locked again by a run working on that key.
        let out = work.commit(serde_json::Value::Null).unwrap();
        let lock_path = store.root().join("locks").join(format!("tokenize-{}.lock", key(5)));
        let lock = File::options().write(true).open(lock_path).unwrap();
        lock.lock().unwrap();
        assert!(!store.remove_stage("tokenize", &key(5)).unwrap(), "a locked stage stays");
        assert!(out.dir.exists());
        drop(lock);
        assert!(store.remove_stage("tokenize", &key(5)).unwrap());
        assert!(!out.dir.exists());
        assert!(store.remove_stage("tokenize", &key(4)).unwrap());
        assert!(matches!(store.lookup("tokenize", &key(4)).unwrap(), Lookup::Miss));
    }

    #[test]
    fn short_never_splits_a_character() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("ééééééééééééé"), "éééééééééééé");
        assert_eq!(short("abc"), "abc");
    }
}
