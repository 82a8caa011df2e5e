//! Datasets: tokenization of texts into ragged token ids.

mod tokenize;

pub use tokenize::{TextEncoder, TokenizeError};
