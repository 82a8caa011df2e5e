//! The stages of a causal LM (`model.task = "causal-lm"`) where they differ from a classifier's:
//! tokenizing text or prompt/completion pairs, and scoring loss, perplexity and exact match. The
//! train stage is shared (see `crate::model::Model`).

mod evaluate;
mod tokenize;

pub use evaluate::{GENERATIONS_FILE, LmEvaluateStage};
pub use tokenize::{DATA_FILE, LmTokenizeStage};
