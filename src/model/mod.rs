//! Training-grade transformer models on candle, loaded from and saved as Hugging Face checkpoints.
//!
//! candle-transformers' encoders are built for inference (their LayerNorm cuts the gradient, their
//! dropout is a no-op), so pipe has its own: the architectures and tensor names of `transformers`'
//! `...ForSequenceClassification` for each supported family (see [`Family`]), one shared encoder,
//! every op differentiable (see [`crate::ops`]), dropout drawn from the seeded [`crate::rng`].

mod any;
mod checkpoint;
mod config;
mod decoder;
mod encoder;
mod family;
mod modernbert;

pub use any::Model;
pub use config::EncoderConfig;
pub use decoder::{
    CausalLm, DecoderConfig, GgufFile, KvCache, TokenIds, Variant, gguf_config, predicted_tokens,
};
pub use encoder::{Batch, Classifier, Dropout, Mode};
pub use family::Family;

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
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    InvalidWeights { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Checks a safetensors file's framing without loading it: the header length fits the file, the
/// header is JSON, and the tensors' byte ranges end exactly at the end of the file. Run before a
/// stage starts, so that a truncated or forged file is bad input (exit 2), found before any work.
pub fn check_safetensors(path: &std::path::Path) -> Result<(), ModelError> {
    use std::io::Read;
    /// Larger headers are refused before being read (safetensors' own limit is 100 MB).
    const MAX_HEADER: u64 = 100 << 20;
    let invalid = |message: String| ModelError::InvalidWeights { path: path.into(), message };
    let io = |source| ModelError::Io { path: path.into(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| invalid(format!("{len} bytes, too short for a header")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER || header_len > len - 8 {
        return Err(invalid(format!("its header claims {header_len} bytes; the file has {len}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("its header is not a JSON object: {e}")))?;
    let mut end = 0u64;
    for (name, info) in header.iter().filter(|(name, _)| name.as_str() != "__metadata__") {
        let offsets =
            info["data_offsets"].as_array().and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let Some((_, stop)) = offsets.filter(|(a, b)| a <= b) else {
            return Err(invalid(format!("tensor `{name}` has no valid data_offsets")));
        };
        end = end.max(stop);
    }
    if 8 + header_len + end != len {
        return Err(invalid(format!(
            "its tensors end at byte {}, the file has {len} bytes (truncated or padded?)",
            8 + header_len + end
        )));
    }
    Ok(())
}
