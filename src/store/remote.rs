//! The store's second tier: a bucket on S3 (or any S3-compatible service) or a directory on a
//! shared file system, that a team's machines share behind each one's local `runs/`.
//!
//! ```text
//! <prefix>/cas/sha256/<digest>                 every output file, by the SHA-256 of its content
//! <prefix>/stages/<kind>/<key>/MANIFEST.json   a finished stage (the local manifest, verbatim)
//! <prefix>/records/<run>.toml                  run records
//! <prefix>/sweeps/<sweep>.toml                 sweep records
//! ```
//!
//! **Blobs first, the manifest last, create-only.** A push uploads the stage's files as blobs
//! (each with its SHA-256 sent as the S3 checksum, so the server rejects a damaged transfer;
//! large ones as multipart uploads that are aborted on error, never streamed to their final
//! key), then writes the manifest with `If-None-Match: *`. The first writer wins; a second sees
//! 412 and keeps nothing of its own, since its blobs are the same bytes under the same names.
//! A writer killed at any point leaves no manifest, so nothing half-pushed is ever visible. There
//! are no locks in the remote.
//!
//! **Nothing is trusted on the way in.** A pull re-hashes every blob as it downloads it: one that
//! does not match its digest, or is missing, makes the stage a miss (and is reported), never a
//! corrupt local copy.
//!
//! **The remote never changes a key or a result**: it is configured outside the pipeline
//! (`--remote`, `PIPE_REMOTE`) and holds byte-identical copies of what the local store holds.
//!
//! **Misconfiguration is loud.** [`Remote::open`] lists the prefix once: an unknown bucket, bad
//! credentials or an endpoint that does not answer are errors naming the endpoint, the bucket and
//! the server's words, not a stream of silent cache misses. Requests time out and are retried with
//! backoff; what fails after that is the caller's to report (the engine warns and computes the
//! stage itself, unless the remote is required).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use sha2::{Digest, Sha256};

use super::{MANIFEST, Manifest, StageOutput, short};

/// Files at least this large are uploaded in parts (`PIPE_MULTIPART_THRESHOLD`, in bytes, as the
/// AWS CLI's `multipart_threshold`).
const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// The variable that sets [`MULTIPART_THRESHOLD`].
pub const MULTIPART_THRESHOLD_ENV: &str = "PIPE_MULTIPART_THRESHOLD";
/// The variable that sets [`PART_BYTES`].
pub const MULTIPART_CHUNKSIZE_ENV: &str = "PIPE_MULTIPART_CHUNKSIZE";
/// The size of one part of a multipart upload (`PIPE_MULTIPART_CHUNKSIZE`, in bytes; S3 wants at
/// least 5 MiB for every part but the last).
const PART_BYTES: usize = 8 << 20;
/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 8;
/// Files transferred at once.
const FILES_IN_FLIGHT: usize = 4;

/// Errors from the remote.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote's address or the environment describing it is wrong (the user's to fix).
    #[error("remote `{url}`: {message}")]
    Config { url: String, message: String },
    /// The remote does not answer, or refuses: unknown bucket, bad credentials, closed port.
    #[error("remote `{url}` ({location}) is not usable: {message}")]
    Unusable { url: String, location: String, message: String },
    /// A transfer failed after its retries.
    #[error("remote `{url}`: {action}: {message}")]
    Transfer { url: String, action: String, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl RemoteError {
    /// Exit code for the CLI: 2 for a misconfigured remote, 1 for a failed transfer.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config { .. } | Self::Unusable { .. } => 2,
            Self::Transfer { .. } | Self::Io { .. } => 1,
        }
    }
}

/// How a remote is used, beside where it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoteOptions {
    /// Push every stage a run finishes (or finds locally) and its record.
    pub push: bool,
    /// A failed transfer fails the command instead of being a warning.
    pub required: bool,
}

/// What a remote holds of a stage, after [`Remote::download`].
#[derive(Debug)]
pub enum Download {
    /// Every file is downloaded and matches the manifest, which comes back for the commit, with
    /// its text as stored (kept verbatim: a parse and print could change how a fact's number is
    /// written).
    Hit(Manifest, Vec<u8>),
    /// The remote has no manifest for the stage.
    Miss,
    /// The remote's copy is unusable (a blob missing or corrupt, a bad manifest): why. Nothing
    /// of it is kept.
    Invalid(String),
}

/// The outcome of pushing one stage or record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// This process wrote the manifest (or record).
    Written,
    /// The remote already had it.
    Present,
    /// Another writer's create-only put won (the server answered 412); its copy is identical.
    Raced,
}

impl Pushed {
    pub fn name(self) -> &'static str {
        match self {
            Self::Written => "pushed",
            Self::Present => "present",
            Self::Raced => "raced",
        }
    }
}

/// Progress of a transfer: bytes done so far and in all; called at the start, a few times a
/// second, and at the end, the only call where done can equal all.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// What `pipe verify --remote` found wrong with one stage in the remote.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteProblem {
    /// `<kind>/<key>`.
    pub stage: String,
    pub problem: String,
    /// The blob at fault, if one is (missing or corrupt).
    pub blob: Option<String>,
}

/// The result of [`Remote::verify`].
#[derive(Debug, Clone, Default)]
pub struct RemoteVerification {
    /// Stages whose manifest and blobs are all good.
    pub good: usize,
    pub problems: Vec<RemoteProblem>,
    /// Blobs uploaded again from a good local copy (with `--repair`).
    pub repaired: Vec<String>,
}

/// A remote store.
pub struct Remote {
    url: String,
    /// Where it is, for messages: the endpoint and bucket, or the directory.
    location: String,
    objects: Arc<dyn ObjectStore>,
    /// The path under the bucket or directory, without slashes at its ends.
    prefix: String,
    options: RemoteOptions,
    /// Files at least this large go up in parts of `part_bytes`.
    multipart_threshold: u64,
    part_bytes: usize,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).field("location", &self.location).finish()
    }
}

impl Remote {
    /// Connects to the remote at `url` (`s3://BUCKET[/PREFIX]` or `file:///DIRECTORY`) and
    /// checks that it answers, with the credentials, region and endpoint from the standard AWS
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, `AWS_PROFILE`) and profile files (`~/.aws/credentials`, `~/.aws/config`).
    pub fn open(url: &str, options: RemoteOptions) -> Result<Self, RemoteError> {
        let config = |message: String| RemoteError::Config { url: url.into(), message };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pipe-remote")
            .enable_all()
            .build()
            .map_err(|e| config(format!("cannot start the transfer runtime: {e}")))?;
        let (objects, location, prefix) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let (objects, location) = s3(url, bucket)?;
            (objects, location, prefix)
        } else if let Some(dir) = url.strip_prefix("file://") {
            let dir = Path::new(dir);
            if !dir.is_absolute() {
                return Err(config("a file:// remote needs an absolute path (file:///shared/pipe)".into()));
            }
            let location = format!("directory {}", dir.display());
            if !dir.is_dir() {
                return Err(RemoteError::Unusable {
                    url: url.into(),
                    location,
                    message: "no such directory".into(),
                });
            }
            let objects = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| config(e.to_string()))?
                .with_automatic_cleanup(true);
            (Arc::new(objects) as Arc<dyn ObjectStore>, location, "")
        } else {
            return Err(config("expected s3://BUCKET[/PREFIX] or file:///DIRECTORY".into()));
        };
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(config("the prefix may not contain `.` or `..`".into()));
        }
        let size = |name: &str, default: u64| match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| config(format!("{name}={v}: expected a positive number of bytes"))),
        };
        let multipart_threshold = size(MULTIPART_THRESHOLD_ENV, MULTIPART_THRESHOLD)?;
        let part_bytes = size(MULTIPART_CHUNKSIZE_ENV, PART_BYTES as u64)? as usize;
        let remote = Self {
            url: url.into(),
            location,
            objects,
            prefix,
            options,
            multipart_threshold,
            part_bytes,
            runtime,
        };
        remote.probe()?;
        Ok(remote)
    }

    /// The remote's address as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether runs push what they finish.
    pub fn push(&self) -> bool {
        self.options.push
    }

    /// Whether a failed transfer fails the command.
    pub fn required(&self) -> bool {
        self.options.required
    }

    /// Lists the prefix once, so that a wrong bucket, credentials or endpoint fail here, loudly.
    fn probe(&self) -> Result<(), RemoteError> {
        let stages = self.path("stages");
        self.runtime.block_on(self.objects.list_with_delimiter(Some(&stages))).map(drop).map_err(|e| {
            RemoteError::Unusable {
                url: self.url.clone(),
                location: self.location.clone(),
                message: message(&e),
            }
        })
    }

    fn path(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn blob_path(&self, sha256: &str) -> ObjectPath {
        self.path(&format!("cas/sha256/{sha256}"))
    }

    fn manifest_path(&self, kind: &str, key: &str) -> ObjectPath {
        self.path(&format!("stages/{kind}/{key}/{MANIFEST}"))
    }

    fn transfer(&self, action: impl Into<String>) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        let action = action.into();
        move |e| RemoteError::Transfer { url: self.url.clone(), action, message: message(&e) }
    }

    /// Runs `work` to completion, reporting the bytes `done` (of `total`) as it goes.
    fn drive<T>(
        &self,
        work: impl Future<Output = T>,
        done: &AtomicU64,
        total: u64,
        progress: Progress<'_>,
    ) -> T {
        // One call at the start, ticks while bytes remain, and one at the end: the only one that
        // can say everything is done, so that a renderer can time the transfer and close it once.
        if total > 0 {
            progress(0, total);
        }
        self.runtime.block_on(async {
            let mut work = std::pin::pin!(work);
            loop {
                let tick = std::pin::pin!(tokio::time::sleep(Duration::from_millis(200)));
                match futures::future::select(work.as_mut(), tick).await {
                    futures::future::Either::Left((out, _)) => {
                        progress(done.load(Ordering::Relaxed), total);
                        return out;
                    }
                    futures::future::Either::Right(_) => {
                        progress(done.load(Ordering::Relaxed).min(total.saturating_sub(1)), total)
                    }
                }
            }
        })
    }

    /// The remote's manifest of a stage, if it has one (checked, but its blobs are not).
    pub fn manifest(&self, kind: &str, key: &str) -> Result<Result<Manifest, Download>, RemoteError> {
        Ok(self.manifest_text(kind, key)?.map(|(manifest, _)| manifest))
    }

    /// [`Remote::manifest`], with its text as stored.
    fn manifest_text(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Result<(Manifest, Vec<u8>), Download>, RemoteError> {
        let path = self.manifest_path(kind, key);
        let text = match self.runtime.block_on(async { self.objects.get(&path).await?.bytes().await }) {
            Ok(text) => text,
            Err(object_store::Error::NotFound { .. }) => return Ok(Err(Download::Miss)),
            Err(e) => return Err(self.transfer(format!("reading {path}"))(e)),
        };
        let manifest: Manifest = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => return Ok(Err(Download::Invalid(format!("unreadable manifest: {e}")))),
        };
        Ok(manifest.check(kind, key).map(|()| (manifest, text.to_vec())).map_err(Download::Invalid))
    }

    /// Downloads stage `kind`/`key` into the empty directory `dir`, re-hashing every file. On
    /// anything but a hit, `dir` is left empty again.
    pub fn download(
        &self,
        kind: &str,
        key: &str,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<Download, RemoteError> {
        let (manifest, text) = match self.manifest_text(kind, key)? {
            Ok(found) => found,
            Err(miss) => return Ok(miss),
        };
        let total = manifest.files.values().map(|e| e.bytes).sum();
        let done = AtomicU64::new(0);
        let work = futures::stream::iter(&manifest.files)
            .map(|(rel, entry)| self.fetch_blob(&entry.sha256, entry.bytes, Some(dir.join(rel)), &done))
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<Vec<Option<String>>>();
        let outcome = match self.drive(work, &done, total, progress) {
            Ok(faults) => match faults.into_iter().flatten().next() {
                None => return Ok(Download::Hit(manifest, text)),
                Some(why) => Ok(Download::Invalid(why)),
            },
            Err(e) => Err(e),
        };
        empty(dir)?;
        outcome
    }

    /// Downloads one blob, hashing it on the way, into `dest` (or nowhere, only to check it):
    /// `Some(why)` when it is missing or its content does not match `sha256` and `bytes`.
    async fn fetch_blob(
        &self,
        sha256: &str,
        bytes: u64,
        dest: Option<PathBuf>,
        done: &AtomicU64,
    ) -> Result<Option<String>, RemoteError> {
        let path = self.blob_path(sha256);
        let got = match self.objects.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Some(format!("blob {} is missing (incomplete stage)", short(sha256))));
            }
            Err(e) => return Err(self.transfer(format!("downloading {path}"))(e)),
        };
        let mut file = match &dest {
            Some(dest) => {
                let io = |source| RemoteError::Io { path: dest.clone(), source };
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
                Some((File::create(dest).map_err(io)?, dest))
            }
            None => None,
        };
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.transfer(format!("downloading {path}")))?;
            hasher.update(&chunk);
            if let Some((file, dest)) = &mut file {
                file.write_all(&chunk)
                    .map_err(|source| RemoteError::Io { path: dest.to_path_buf(), source })?;
            }
            received += chunk.len() as u64;
            done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if let Some((file, dest)) = file {
            file.sync_all().map_err(|source| RemoteError::Io { path: dest.to_path_buf(), source })?;
        }
        let actual = hex(&hasher.finalize());
        Ok(if actual != sha256 {
            Some(format!("blob {} is corrupt (its content hashes to {})", short(sha256), short(&actual)))
        } else if received != bytes {
            Some(format!("blob {} has {received} bytes, the manifest says {bytes}", short(sha256)))
        } else {
            None
        })
    }

    /// Pushes a stage: its blobs the remote lacks, then its manifest, create-only.
    pub fn push_stage(&self, out: &StageOutput, progress: Progress<'_>) -> Result<Pushed, RemoteError> {
        let manifest = &out.manifest;
        let manifest_path = self.manifest_path(&manifest.kind, &manifest.key);
        if self.exists(&manifest_path)? {
            return Ok(Pushed::Present);
        }
        // Each distinct content once.
        let blobs: BTreeMap<&str, (PathBuf, u64)> =
            manifest.files.iter().map(|(rel, e)| (e.sha256.as_str(), (out.file(rel), e.bytes))).collect();
        let total = blobs.values().map(|(_, bytes)| bytes).sum();
        let done = AtomicU64::new(0);
        let work = futures::stream::iter(&blobs)
            .map(|(sha256, (file, bytes))| self.push_blob(sha256, file, *bytes, false, &done))
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<Vec<()>>();
        self.drive(work, &done, total, progress)?;
        crate::fault::point_in("remote.blobs-pushed", &manifest.kind);
        // The local manifest's own bytes (a parse and print could write a fact's number otherwise),
        // if they still list the files that were verified.
        let path = out.file(MANIFEST);
        let text = fs::read(&path).map_err(|source| RemoteError::Io { path: path.clone(), source })?;
        let same =
            |m: Manifest| m.kind == manifest.kind && m.key == manifest.key && m.files == manifest.files;
        if !serde_json::from_slice::<Manifest>(&text).is_ok_and(same) {
            return Err(RemoteError::Io {
                path,
                source: std::io::Error::other("changed since it was verified"),
            });
        }
        self.put_create(&manifest_path, text)
    }

    /// Uploads one file as the blob `sha256`, unless the remote has a blob of that name and size
    /// already (or `overwrite`, to replace a corrupt one).
    async fn push_blob(
        &self,
        sha256: &str,
        file: &Path,
        bytes: u64,
        overwrite: bool,
        done: &AtomicU64,
    ) -> Result<(), RemoteError> {
        let path = self.blob_path(sha256);
        let action = || format!("uploading {} as {path}", file.display());
        if !overwrite {
            match self.objects.head(&path).await {
                Ok(meta) if meta.size == bytes => {
                    done.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.transfer(action())(e)),
            }
        }
        let io = |source| RemoteError::Io { path: file.to_path_buf(), source };
        if bytes < self.multipart_threshold {
            let data = fs::read(file).map_err(io)?;
            let opts = PutOptions { mode: PutMode::Overwrite, ..Default::default() };
            self.objects
                .put_opts(&path, PutPayload::from(data), opts)
                .await
                .map_err(self.transfer(action()))?;
            done.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        }
        let upload = self.objects.put_multipart(&path).await.map_err(self.transfer(action()))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_bytes);
        let mut reader = File::open(file).map_err(io)?;
        loop {
            let mut part = vec![0u8; self.part_bytes];
            let n = match read_full(&mut reader, &mut part) {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(io(e));
                }
            };
            if n == 0 {
                break;
            }
            part.truncate(n);
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(self.transfer(action())(e));
            }
            writer.put(part.into());
            done.fetch_add(n as u64, Ordering::Relaxed);
            crate::fault::point("remote.part-pushed");
        }
        writer.finish().await.map_err(self.transfer(action()))?;
        Ok(())
    }

    /// Writes `data` at `path` only if nothing is there yet (`If-None-Match: *` on S3).
    fn put_create(&self, path: &ObjectPath, data: Vec<u8>) -> Result<Pushed, RemoteError> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.runtime.block_on(self.objects.put_opts(path, PutPayload::from(data), opts)) {
            Ok(_) => Ok(Pushed::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Pushed::Raced),
            Err(e) => Err(self.transfer(format!("writing {path}"))(e)),
        }
    }

    /// Writes `data` at `rel` (under the prefix) create-only: the raw operation manifests and
    /// records are written with, for tests of the server's conditional puts.
    pub fn put_if_absent(&self, rel: &str, data: Vec<u8>) -> Result<Pushed, RemoteError> {
        self.put_create(&self.path(rel), data)
    }

    async fn exists_async(&self, path: &ObjectPath) -> Result<bool, RemoteError> {
        match self.objects.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.transfer(format!("looking for {path}"))(e)),
        }
    }

    fn exists(&self, path: &ObjectPath) -> Result<bool, RemoteError> {
        self.runtime.block_on(self.exists_async(path))
    }

    /// Pushes a run record (create-only: records are immutable).
    pub fn push_record(&self, id: &str, text: &str) -> Result<Pushed, RemoteError> {
        let path = self.path(&format!("records/{id}.toml"));
        if self.exists(&path)? {
            return Ok(Pushed::Present);
        }
        self.put_create(&path, text.as_bytes().to_vec())
    }

    /// Pushes a finished sweep's record (create-only).
    pub fn push_sweep_record(&self, id: &str, text: &str) -> Result<Pushed, RemoteError> {
        let path = self.path(&format!("sweeps/{id}.toml"));
        if self.exists(&path)? {
            return Ok(Pushed::Present);
        }
        self.put_create(&path, text.as_bytes().to_vec())
    }

    /// The ids of the run records in the remote that start with `prefix`.
    pub fn record_ids(&self, prefix: &str) -> Result<Vec<String>, RemoteError> {
        let dir = self.path("records");
        let listed = self
            .runtime
            .block_on(self.objects.list(Some(&dir)).try_collect::<Vec<_>>())
            .map_err(self.transfer(format!("listing {dir}")))?;
        let mut ids: Vec<String> = listed
            .iter()
            .filter_map(|meta| meta.location.filename()?.strip_suffix(".toml").map(str::to_string))
            .filter(|id| id.starts_with(prefix) && crate::records::is_run_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The text of run record `id`, if the remote has it.
    pub fn record(&self, id: &str) -> Result<Option<String>, RemoteError> {
        let path = self.path(&format!("records/{id}.toml"));
        match self.runtime.block_on(async { self.objects.get(&path).await?.bytes().await }) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.transfer(format!("reading {path}"))(e)),
        }
    }

    /// Checks every stage in the remote: its manifest, and every blob it lists, downloaded and
    /// re-hashed. With `repair_from`, a missing or corrupt blob is uploaded again from a copy in
    /// that local store whose content matches its digest.
    pub fn verify(
        &self,
        repair_from: Option<&super::Store>,
        progress: Progress<'_>,
    ) -> Result<RemoteVerification, RemoteError> {
        let stages = self.path("stages");
        let listed = self
            .runtime
            .block_on(self.objects.list(Some(&stages)).try_collect::<Vec<_>>())
            .map_err(self.transfer(format!("listing {stages}")))?;
        let mut result = RemoteVerification::default();
        let mut manifests = Vec::new();
        for meta in &listed {
            let parts: Vec<String> = meta.location.parts().map(|p| p.as_ref().to_string()).collect();
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            let [.., "stages", kind, key, name] = parts.as_slice() else { continue };
            if *name != MANIFEST {
                continue;
            }
            let stage = format!("{kind}/{key}");
            if !super::is_digest(key) {
                result.problems.push(RemoteProblem { stage, problem: "not a stage key".into(), blob: None });
                continue;
            }
            match self.manifest(kind, key)? {
                Ok(m) => manifests.push((stage, m)),
                Err(Download::Invalid(why)) => {
                    result.problems.push(RemoteProblem { stage, problem: why, blob: None })
                }
                Err(_) => {} // deleted since the listing
            }
        }
        // Each blob is checked once, however many stages share it.
        let blobs: BTreeMap<&str, u64> = manifests
            .iter()
            .flat_map(|(_, m)| m.files.values().map(|e| (e.sha256.as_str(), e.bytes)))
            .collect();
        let total = blobs.values().sum();
        let done = AtomicU64::new(0);
        let check = futures::stream::iter(&blobs)
            .map(|(sha256, bytes)| async {
                Ok::<_, RemoteError>((*sha256, self.fetch_blob(sha256, *bytes, None, &done).await?))
            })
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<BTreeMap<&str, Option<String>>>();
        let verdicts = self.drive(check, &done, total, progress)?;
        let mut bad = BTreeSet::new();
        for (stage, manifest) in &manifests {
            let mut faults = manifest.files.values().filter_map(|e| {
                verdicts[e.sha256.as_str()].as_ref().map(|why| (e.sha256.clone(), why.clone()))
            });
            match faults.next() {
                None => result.good += 1,
                Some((blob, why)) => {
                    bad.insert(blob.clone());
                    result.problems.push(RemoteProblem {
                        stage: stage.clone(),
                        problem: why,
                        blob: Some(blob),
                    });
                    for (blob, why) in faults {
                        bad.insert(blob.clone());
                        result.problems.push(RemoteProblem {
                            stage: stage.clone(),
                            problem: why,
                            blob: Some(blob),
                        });
                    }
                }
            }
        }
        if let Some(store) = repair_from {
            let copies = good_local_copies(store, &bad)?;
            for (sha256, (file, bytes)) in copies {
                let counter = AtomicU64::new(0);
                self.runtime.block_on(self.push_blob(&sha256, &file, bytes, true, &counter))?;
                result.repaired.push(sha256);
            }
        }
        Ok(result)
    }
}

/// For each digest in `wanted`, a file in `store`'s verified stages with that content.
fn good_local_copies(
    store: &super::Store,
    wanted: &BTreeSet<String>,
) -> Result<BTreeMap<String, (PathBuf, u64)>, RemoteError> {
    let mut found = BTreeMap::new();
    for (kind, key) in store.stage_keys().map_err(|e| RemoteError::Io {
        path: store.root().to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })? {
        let Ok(super::Lookup::Hit(out)) = store.lookup(&kind, &key) else { continue };
        for (rel, entry) in &out.manifest.files {
            if wanted.contains(&entry.sha256) {
                found.entry(entry.sha256.clone()).or_insert_with(|| (out.file(rel), entry.bytes));
            }
        }
    }
    Ok(found)
}

/// An object store error in one line, with the server's own words when it sent some.
fn message(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    // An S3 error body is XML: its code and message say it, the rest is noise.
    let tag = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(text[start..end].to_string())
    };
    if let (Some(code), Some(said), Some(xml)) = (tag("Code"), tag("Message"), text.find("<?xml")) {
        text.truncate(xml);
        text.push_str(&format!("{code}: {said}"));
    }
    text.replace('\n', " ")
}

/// Empties `dir` (after a download that is not kept).
fn empty(dir: &Path) -> Result<(), RemoteError> {
    let io = |source| RemoteError::Io { path: dir.to_path_buf(), source };
    fs::remove_dir_all(dir).map_err(io)?;
    fs::create_dir_all(dir).map_err(io)
}

/// Reads until `buf` is full or the file ends; the number of bytes read.
fn read_full(reader: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An S3 client for `bucket` from the standard AWS environment and profile files, and a
/// description of where it points.
fn s3(url: &str, bucket: &str) -> Result<(Arc<dyn ObjectStore>, String), RemoteError> {
    let config = |message: String| RemoteError::Config { url: url.into(), message };
    if bucket.is_empty() {
        return Err(config("no bucket (expected s3://BUCKET[/PREFIX])".into()));
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let home = var("HOME").map(PathBuf::from).unwrap_or_default();
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let credentials_file =
        var("AWS_SHARED_CREDENTIALS_FILE").map_or(home.join(".aws/credentials"), PathBuf::from);
    let config_file = var("AWS_CONFIG_FILE").map_or(home.join(".aws/config"), PathBuf::from);
    let credentials = ini_section(&credentials_file, &profile);
    let config_section = if profile == "default" { profile.clone() } else { format!("profile {profile}") };
    let settings = ini_section(&config_file, &config_section);

    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut credentials_from = "";
    if var("AWS_ACCESS_KEY_ID").is_none() {
        match (credentials.get("aws_access_key_id"), credentials.get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(token) = credentials.get("aws_session_token") {
                    builder = builder.with_token(token);
                }
            }
            _ if var("AWS_PROFILE").is_some() => {
                return Err(config(format!(
                    "AWS_PROFILE={profile}, but {} has no aws_access_key_id and aws_secret_access_key for it",
                    credentials_file.display()
                )));
            }
            // Instance or container credentials, as the SDKs fall back to; said in messages, since
            // a missing variable is the likelier cause of a failure.
            _ => {
                credentials_from =
                    ", no credentials in AWS_ACCESS_KEY_ID or the profile files (instance credentials tried)"
            }
        }
    }
    let region =
        var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).or_else(|| settings.get("region").cloned());
    let region = region.unwrap_or_else(|| "us-east-1".into());
    builder = builder.with_region(&region);
    let endpoint = var("AWS_ENDPOINT_URL_S3")
        .or_else(|| var("AWS_ENDPOINT_URL"))
        .or_else(|| settings.get("endpoint_url").cloned());
    let mut client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120));
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint);
        // Plain http only where nothing can listen in (the loopback address), or when asked for
        // as the SDKs' AWS_ALLOW_HTTP does.
        if is_loopback_http(endpoint) || var("AWS_ALLOW_HTTP").is_some_and(|v| v == "true" || v == "1") {
            client = client.with_allow_http(true);
        }
    }
    let retry = RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(60),
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(4),
            base: 2.0,
        },
    };
    let objects = builder
        .with_checksum_algorithm(Checksum::SHA256)
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| config(message(&e)))?;
    let endpoint = endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    Ok((Arc::new(objects), format!("endpoint {endpoint}, bucket `{bucket}`{credentials_from}")))
}

/// Whether `endpoint` is `http://` to a loopback host.
fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else { return false };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The `key = value` pairs of `[section]` in an AWS-style INI file (empty if there is none).
fn ini_section(path: &Path, section: &str) -> BTreeMap<String, String> {
    let Ok(text) = fs::read_to_string(path) else { return BTreeMap::new() };
    let mut inside = false;
    let mut pairs = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if inside && let Some((key, value)) = line.split_once('=') {
            pairs.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_may_be_plain_http() {
        assert!(is_loopback_http("http://127.0.0.1:8333"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(is_loopback_http("http://[::1]:9000"));
        assert!(!is_loopback_http("http://10.0.0.5:8333"));
        assert!(!is_loopback_http("https://127.0.0.1:8333"));
        assert!(!is_loopback_http("http://s3.example.com"));
    }

    #[test]
    fn profile_files_are_read_by_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        fs::write(
            &path,
            "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n# team\n[team]\nAWS_ACCESS_KEY_ID = C\n",
        )
        .unwrap();
        assert_eq!(ini_section(&path, "default").get("aws_secret_access_key").map(String::as_str), Some("B"));
        assert_eq!(ini_section(&path, "team").get("aws_access_key_id").map(String::as_str), Some("C"));
        assert!(ini_section(&path, "other").is_empty());
        assert!(ini_section(&dir.path().join("absent"), "default").is_empty());
    }

    #[test]
    fn a_file_remote_round_trips_a_stage_and_rejects_a_corrupt_blob() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        let remote = Remote::open(&format!("file://{}", shared.display()), RemoteOptions::default()).unwrap();
        let store = super::super::Store::new(dir.path().join("a"));
        let key = "ab".repeat(32);
        let super::super::Begin::Work(work) = store.begin("tokenize", &key, &key, || {}).unwrap() else {
            panic!("expected work")
        };
        fs::write(work.out().join("tokens.bin"), b"tokens").unwrap();
        let out = work.commit(serde_json::json!({"seconds": 1})).unwrap();
        assert_eq!(remote.push_stage(&out, &mut |_, _| {}).unwrap(), Pushed::Written);
        assert_eq!(remote.push_stage(&out, &mut |_, _| {}).unwrap(), Pushed::Present);

        let into = dir.path().join("into");
        fs::create_dir(&into).unwrap();
        let Download::Hit(manifest, _) = remote.download("tokenize", &key, &into, &mut |_, _| {}).unwrap()
        else {
            panic!("expected a hit")
        };
        assert_eq!(manifest, out.manifest);
        assert_eq!(fs::read(into.join("tokens.bin")).unwrap(), b"tokens");

        let sha = &out.manifest.files["tokens.bin"].sha256;
        fs::write(shared.join("cas/sha256").join(sha), b"tokenz").unwrap();
        empty(&into).unwrap();
        let Download::Invalid(why) = remote.download("tokenize", &key, &into, &mut |_, _| {}).unwrap() else {
            panic!("expected the corrupt blob to be rejected")
        };
        assert!(why.contains("corrupt"), "{why}");
        assert_eq!(fs::read_dir(&into).unwrap().count(), 0, "nothing of a bad download is kept");
        let verdict = remote.verify(Some(&store), &mut |_, _| {}).unwrap();
        assert_eq!(verdict.problems.len(), 1);
        assert_eq!(verdict.repaired, vec![sha.clone()]);
        assert_eq!(remote.verify(None, &mut |_, _| {}).unwrap().good, 1);
        assert!(matches!(
            remote.download("tokenize", &"cd".repeat(32), &into, &mut |_, _| {}).unwrap(),
            Download::Miss
        ));
    }
}
