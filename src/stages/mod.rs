//! The stages of a pipeline, `tokenize -> train -> evaluate`, behind one small trait (a causal
//! LM's tokenize and evaluate stages are in `causal_lm`).
//!
//! A stage declares what its key is made of ([`Stage::key_fields`]), checks its inputs before
//! anything is written ([`Stage::preflight`], so bad input leaves the store untouched), and writes
//! its outputs into a work directory ([`Stage::run`]); the engine does the rest (lookup, locking,
//! committing, records).

mod causal_lm;
mod evaluate;
mod tokenize;
mod train;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use causal_lm::{DATA_FILE, GENERATIONS_FILE, LmEvaluateStage, LmTokenizeStage};
pub use evaluate::{EvaluateStage, METRICS_FILE, PREDICTIONS_FILE, TEST_METRICS_FILE};
pub use tokenize::{LABELS_FILE, TOKENS_FILE, TokenizeStage, TokenizerFile};
pub use train::{
    CURVES_PNG, CURVES_SVG, METRICS_LOG, MODEL_DIR, TRAIN_LOG, TrainStage, VALIDATION_LOSS, is_gguf,
};

use crate::data::{DataError, TokenizeError, TokensError};
use crate::model::ModelError;
use crate::plan::{KeyFields, StageKind};
use crate::plot::PlotError;
use crate::store::{StageOutput, StoreError, WorkDir};
use crate::train::{Evaluation, StepReport};

/// The finished upstream stages a stage reads, by kind.
pub type Upstream = BTreeMap<StageKind, StageOutput>;

/// Something worth showing while a pipeline runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// A stage is about to run (`cached: false`) or is reused (`cached: true`).
    StageStart { kind: StageKind, key: &'a str, cached: bool },
    /// Another run holds the stage's lock; this one waits for it.
    Waiting { kind: StageKind },
    /// A stage continues from a checkpoint at `step` of `total`.
    Resumed { kind: StageKind, step: u64, total: u64 },
    /// One optimizer step of the train stage.
    Step(&'a StepReport),
    /// The train stage scored the model on the validation split.
    Evaluated(&'a Evaluation),
    /// A stage finished; `summary` is one line for people.
    StageEnd { kind: StageKind, seconds: f64, summary: String },
    /// Something the user should know (a stored stage failed verification, data leakage, ...).
    Warning(String),
    /// Bytes of a stage moving to or from the remote: `done` of `total` so far.
    Transfer { kind: StageKind, direction: crate::share::Direction, done: u64, total: u64 },
}

/// Where events go.
pub type Observer<'a> = &'a mut dyn FnMut(Event<'_>);

/// Errors from running a stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Tokens(#[from] TokensError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("interrupted; checkpoint saved at step {step}, the next run resumes from it")]
    Interrupted { step: u64 },
}

impl StageError {
    /// Whether the error is the user's input (exit code 2) rather than a failure of the stage.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Data(_)
                | Self::Tokenize(TokenizeError::Load { .. } | TokenizeError::BadRow { .. })
                | Self::Invalid(_)
        ) || matches!(self, Self::Model(m) if !matches!(m, ModelError::Candle(_)))
    }
}

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StageError {
    let path = path.into();
    move |source| StageError::Io { path, source }
}

/// One stage of a pipeline.
pub trait Stage {
    /// Which stage this is.
    fn kind(&self) -> StageKind;

    /// The fields its key is computed from, given the finished upstream stages.
    fn key_fields(&self, upstream: &Upstream) -> KeyFields;

    /// The key of the complete computation this stage is a prefix of (see [`Store::begin`]):
    /// its own key, except for a train stage that stops after an epoch.
    ///
    /// [`Store::begin`]: crate::store::Store::begin
    fn lineage(&self, upstream: &Upstream) -> String {
        self.key_fields(upstream).key()
    }

    /// Checks inputs that can be checked before anything is written. Called only when the stage
    /// must run.
    fn preflight(&mut self) -> Result<(), StageError> {
        Ok(())
    }

    /// Does the work, writing outputs under `work.out()`; returns facts for the manifest (timings
    /// and the like, which are not part of the digest).
    fn run(
        &mut self,
        work: &WorkDir,
        upstream: &Upstream,
        observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError>;
}

/// The output digest of an upstream stage, for key fields.
pub(crate) fn upstream_digest(upstream: &Upstream, kind: StageKind) -> String {
    upstream.get(&kind).map(|o| o.manifest.digest.clone()).unwrap_or_default()
}

/// A file the pipeline reads, with its content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    pub sha256: String,
}

impl Input {
    /// Hashes `path`; `what` names the input in the error when it cannot be read.
    pub fn hash(path: PathBuf, what: &str) -> Result<Self, StageError> {
        match crate::digest::file(&path) {
            Ok(sha256) => Ok(Self { path, sha256 }),
            Err(e) => Err(StageError::Invalid(format!("{what}: cannot read {}: {e}", path.display()))),
        }
    }
}
