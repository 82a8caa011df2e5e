//! Tokenization with the Hugging Face `tokenizers` crate, in parallel, without padding.
//!
//! Rows are stored ragged (no padding): the train stage pads each batch to its longest row, which
//! is where most of pipe's speed over the pad-to-max_length recipe comes from.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::{Tokenizer, TruncationParams};

/// Errors from loading a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("cannot tokenize row {row}: {message}")]
    Encode { row: usize, message: String },
}

/// A tokenizer configured for classification inputs: special tokens added, truncated to
/// `max_length`, never padded.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Loads `tokenizer.json` and sets truncation to `max_length` tokens (special tokens included).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, TokenizeError> {
        let load_err = |message: String| TokenizeError::Load { path: path.into(), message };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| load_err(e.to_string()))?;
        Ok(Self { tokenizer })
    }

    /// Token ids of every text, in order; rows are encoded in parallel.
    pub fn encode_all<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, TokenizeError> {
        texts
            .par_iter()
            .enumerate()
            .map(|(row, text)| {
                self.tokenizer
                    .encode_fast(text.as_ref(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| TokenizeError::Encode { row, message: e.to_string() })
            })
            .collect()
    }
}
