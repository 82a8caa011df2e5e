//! Training-grade transformer models on candle, loaded from and saved as Hugging Face checkpoints.
//!
//! candle-transformers' BERT is built for inference (its LayerNorm cuts the gradient, its dropout
//! is a no-op), so pipe has its own: the same architecture and tensor names as `transformers`'
//! `BertForSequenceClassification`, every op differentiable (see [`crate::ops`]), dropout drawn
//! from the seeded [`crate::rng`].

mod bert;
mod checkpoint;
mod config;

pub use bert::{Batch, BertClassifier, Dropout, Mode};
pub use config::BertConfig;

use std::path::PathBuf;

/// Errors from loading, building or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a valid model config: {source}", path.display())]
    Config { path: PathBuf, source: serde_json::Error },
    #[error("{}: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    #[error("{}: the checkpoint has no tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, the config implies {want:?}", path.display())]
    Shape { path: PathBuf, name: String, got: Vec<usize>, want: Vec<usize> },
    #[error("{}: {source}", path.display())]
    Safetensors { path: PathBuf, source: safetensors::SafeTensorError },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
