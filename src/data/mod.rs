//! Datasets: labelled data files (CSV, JSON Lines, Parquet), class labels, validation splits, and
//! tokenization of texts into ragged token ids.

mod dataset;
mod formats;
mod gguf;
mod lm;
mod tokenize;
mod tokens;

pub use dataset::{
    DataError, LabelMap, LabeledTexts, TextsToPredict, leaked_validation_rows, read_labeled, read_to_predict,
    stratified_split,
};
pub use formats::{Columns, Format, read_columns};
pub use gguf::gguf_tokenizer;
pub use lm::{LmTokenizer, Sequences};
pub use tokenize::{Flavor, TextEncoder, TokenizeError};
pub use tokens::{TokenizedSplit, TokensError, load_tokens, save_tokens};
