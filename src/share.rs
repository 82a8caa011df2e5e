//! Sharing stages and runs through the store's remote: the engine's pull-before-run and
//! push-after-commit, and `pipe push` / `pipe pull` of whole runs (record and stage outputs).
//!
//! A stage is pulled under its local lock, into the directory it would have been computed in,
//! and committed like a computed one: a concurrent local run waits and then reuses it. What
//! fails in the remote after it answered at start (a timeout, a dropped connection) is a warning
//! and the stage is computed here, unless the remote is required; what the remote holds that does
//! not verify is reported and treated as a miss.

use crate::engine::EngineError;
use crate::plan::StageKind;
use crate::records::Record;
use crate::stages::{Event, Observer};
use crate::store::remote::{Download, Pushed};
use crate::store::{Begin, Lookup, Remote, RemoteError, StageOutput, Store, WorkDir, short};

/// Which way bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

impl Direction {
    pub fn past(self) -> &'static str {
        match self {
            Self::Pull => "pulled",
            Self::Push => "pushed",
        }
    }
}

/// What [`pull_stage`] did.
pub enum Pulled {
    /// Downloaded, verified and committed.
    Done(StageOutput),
    /// Not usable from the remote: compute it here, in this work directory.
    Compute(WorkDir),
}

/// Looks for the stage of `work` in the remote (the local store lacks it and its lock is held).
pub fn pull_stage(
    store: &Store,
    kind: StageKind,
    work: WorkDir,
    observe: Observer<'_>,
) -> Result<Pulled, EngineError> {
    let Some(remote) = store.remote() else { return Ok(Pulled::Compute(work)) };
    let key = work.key().to_string();
    let mut progress =
        |done, total| observe(Event::Transfer { kind, direction: Direction::Pull, done, total });
    match remote.download(kind.name(), &key, work.out(), &mut progress) {
        Ok(Download::Hit(manifest, text)) => Ok(Pulled::Done(work.commit_checked(manifest, &text)?)),
        Ok(Download::Miss) => Ok(Pulled::Compute(work)),
        Ok(Download::Invalid(why)) => {
            observe(Event::Warning(format!(
                "{kind} {}: the remote's copy does not verify ({why}); it is not used",
                short(&key)
            )));
            Ok(Pulled::Compute(work))
        }
        Err(e) => degrade(remote, e, &format!("{kind} runs here"), observe).map(|()| Pulled::Compute(work)),
    }
}

/// Pushes a finished stage when the remote is set to push: what happened, or `None` when nothing
/// was tried or a failure was only warned about.
pub fn push_stage(
    store: &Store,
    kind: StageKind,
    output: &StageOutput,
    observe: Observer<'_>,
) -> Result<Option<Pushed>, EngineError> {
    let Some(remote) = store.remote().filter(|r| r.push()) else { return Ok(None) };
    let mut progress =
        |done, total| observe(Event::Transfer { kind, direction: Direction::Push, done, total });
    match remote.push_stage(output, &mut progress) {
        Ok(pushed) => Ok(Some(pushed)),
        Err(e) => degrade(remote, e, &format!("{kind} stays local only"), observe).map(|()| None),
    }
}

/// Pushes run record `id` when the remote is set to push.
pub fn push_record(store: &Store, id: &str, observe: Observer<'_>) -> Result<Option<Pushed>, EngineError> {
    let Some(remote) = store.remote().filter(|r| r.push()) else { return Ok(None) };
    let path = store.record_path(id);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| crate::store::StoreError::Io { path: path.clone(), source })?;
    match remote.push_record(id, &text) {
        Ok(pushed) => Ok(Some(pushed)),
        Err(e) => degrade(remote, e, "the run record stays local only", observe).map(|()| None),
    }
}

/// A remote failure: an error when the remote is required, otherwise a warning saying what
/// happens instead.
fn degrade(remote: &Remote, e: RemoteError, instead: &str, observe: Observer<'_>) -> Result<(), EngineError> {
    if remote.required() {
        return Err(EngineError::Remote(e));
    }
    observe(Event::Warning(format!("{e}; {instead}")));
    Ok(())
}

/// What `pipe push` or `pipe pull` did with one run.
#[derive(Debug, Clone)]
pub struct RunTransfer {
    pub run: String,
    /// Per stage: `pulled`, `cached` (already local), or a [`Pushed`] name.
    pub stages: Vec<(StageKind, String)>,
    /// The record: `pulled`, `cached`, or a [`Pushed`] name.
    pub record: String,
}

/// The remote of `store`, for commands that cannot work without one.
fn remote_of(store: &Store) -> Result<&Remote, EngineError> {
    store.remote().ok_or_else(|| {
        EngineError::Input(
            "no remote: give --remote s3://BUCKET/PREFIX (or file:///DIR) or set PIPE_REMOTE".into(),
        )
    })
}

/// `pipe push RUN`: the record's stages (verified locally first), then the record.
pub fn push_run(store: &Store, record: &Record, observe: Observer<'_>) -> Result<RunTransfer, EngineError> {
    let remote = remote_of(store)?;
    let mut stages = Vec::new();
    for (kind, key) in record_stages(record)? {
        let output = match store.lookup(kind.name(), &key)? {
            Lookup::Hit(out) => out,
            Lookup::Miss => {
                return Err(EngineError::Input(format!(
                    "run {}: its {kind} stage {} is not in {} (pull or run it first)",
                    record.id,
                    short(&key),
                    store.root().display()
                )));
            }
            Lookup::Corrupt(why) => {
                return Err(EngineError::Input(format!(
                    "run {}: the local {kind} stage {} does not verify ({why}); it is not pushed",
                    record.id,
                    short(&key)
                )));
            }
        };
        let mut progress =
            |done, total| observe(Event::Transfer { kind, direction: Direction::Push, done, total });
        let pushed = remote.push_stage(&output, &mut progress).map_err(EngineError::Remote)?;
        stages.push((kind, pushed.name().to_string()));
    }
    let text = std::fs::read_to_string(store.record_path(&record.id))
        .map_err(|source| crate::store::StoreError::Io { path: store.record_path(&record.id), source })?;
    let pushed = remote.push_record(&record.id, &text).map_err(EngineError::Remote)?;
    Ok(RunTransfer { run: record.id.clone(), stages, record: pushed.name().into() })
}

/// `pipe pull RUN`: the record (from the remote when the local store lacks it) and every stage
/// it names that the local store lacks. Fails when the remote has no verified copy of one.
pub fn pull_run(store: &Store, prefix: &str, observe: Observer<'_>) -> Result<RunTransfer, EngineError> {
    remote_of(store)?;
    let local = store.record_ids()?.into_iter().any(|id| id.starts_with(prefix));
    let record = Record::find(store, prefix)?;
    let stages = pull_stages(store, &record, &StageKind::ALL, observe)?;
    Ok(RunTransfer { run: record.id.clone(), stages, record: if local { "cached" } else { "pulled" }.into() })
}

/// Makes sure the local store holds `kinds` of `record`'s stages, pulling those it lacks.
pub fn pull_stages(
    store: &Store,
    record: &Record,
    kinds: &[StageKind],
    observe: Observer<'_>,
) -> Result<Vec<(StageKind, String)>, EngineError> {
    let mut stages = Vec::new();
    for (kind, key) in record_stages(record)?.into_iter().filter(|(kind, _)| kinds.contains(kind)) {
        if let Lookup::Hit(_) = store.lookup(kind.name(), &key)? {
            stages.push((kind, "cached".to_string()));
            continue;
        }
        let work = match store.begin(kind.name(), &key, &key, || observe(Event::Waiting { kind }))? {
            Begin::Done(_) => {
                stages.push((kind, "cached".to_string()));
                continue;
            }
            Begin::Work(work) => work,
        };
        // Unlike a run's pull, nothing can be computed instead: every failure is an error.
        let remote = remote_of(store)?;
        let mut progress =
            |done, total| observe(Event::Transfer { kind, direction: Direction::Pull, done, total });
        let why = match remote.download(kind.name(), &key, work.out(), &mut progress)? {
            Download::Hit(manifest, text) => {
                work.commit_checked(manifest, &text)?;
                stages.push((kind, "pulled".to_string()));
                continue;
            }
            Download::Miss => "the remote has no copy of it".to_string(),
            Download::Invalid(why) => format!("the remote's copy does not verify: {why}"),
        };
        return Err(EngineError::Remote(RemoteError::Transfer {
            url: remote.url().to_string(),
            action: format!("pulling the {kind} stage {} of run {}", short(&key), record.id),
            message: why,
        }));
    }
    Ok(stages)
}

/// The `(kind, key)` of each stage a record names.
fn record_stages(record: &Record) -> Result<Vec<(StageKind, String)>, EngineError> {
    StageKind::ALL
        .iter()
        .map(|&kind| {
            let key = record.stage(kind.name()).and_then(|s| s.get("key")).and_then(|k| k.as_str());
            match key {
                Some(key) if crate::store::is_digest(key) => Ok((kind, key.to_string())),
                _ => {
                    Err(EngineError::Input(format!("run {}: the record has no {kind} stage key", record.id)))
                }
            }
        })
        .collect()
}
