//! Datasets: labelled CSV files, class labels, validation splits, and tokenization of texts into
//! ragged token ids.

mod dataset;
mod gguf;
mod lm;
mod tokenize;
mod tokens;

pub use dataset::{
    Columns, DataError, LabelMap, LabeledTexts, TextsToPredict, leaked_validation_rows, read_columns,
    read_csv, read_csv_to_predict, stratified_split,
};
pub use gguf::gguf_tokenizer;
pub use lm::{LmTokenizer, Sequences};
pub use tokenize::{Flavor, TextEncoder, TokenizeError};
pub use tokens::{TokenizedSplit, TokensError, load_tokens, save_tokens};
