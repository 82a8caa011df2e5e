//! Tokenization with the Hugging Face `tokenizers` crate, in parallel, without padding.
//!
//! Rows are stored ragged (no padding): the train stage pads each batch to its longest row, which
//! is where most of pipe's speed over the pad-to-max_length recipe comes from.
//!
//! transformers 5 does not always run `tokenizer.json` as it is: a tokenizer class with its own
//! constructor takes the vocabulary from the file and rebuilds the rest. For the families here
//! that changes the ids only for XLM-RoBERTa (see [`Flavor`]); pipe applies the same rebuild, so
//! that its ids are transformers'.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{Tokenizer, TruncationParams};

/// Errors from loading a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("cannot tokenize row {row}: {message}")]
    Encode { row: usize, message: String },
    #[error("{}:{line}: {message}", path.display())]
    BadRow { path: PathBuf, line: u64, message: String },
}

/// How transformers builds the tokenizer of a `tokenizer.json`, where it departs from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// The file's own pipeline: transformers rebuilds BERT's WordPiece and RoBERTa's byte-level
    /// BPE tokenizers the way their `tokenizer.json` describes them.
    #[default]
    AsFile,
    /// `XLMRobertaTokenizer`: of the file's normalizers only SentencePiece's `Precompiled` is
    /// kept; words split on whitespace, then `Metaspace` (a `▁` before each); `<s> A </s>`.
    XlmRoberta,
}

impl Flavor {
    /// The flavor of the tokenizer in `dir`, resolved as `AutoTokenizer` picks its class:
    /// `tokenizer_config.json`'s `tokenizer_class`, else `config.json`'s `model_type`.
    pub fn of_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let field = |file: &str, name: &str| -> Result<Option<String>, TokenizeError> {
            let path = dir.join(file);
            let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TokenizeError::Load { path: path.clone(), message: format!("not JSON: {e}") })?;
            Ok(json.get(name).and_then(|v| v.as_str()).map(str::to_string))
        };
        let class = field("tokenizer_config.json", "tokenizer_class")?;
        let xlm = match class {
            Some(class) => class.trim_end_matches("Fast") == "XLMRobertaTokenizer",
            None => field("config.json", "model_type")?.as_deref() == Some("xlm-roberta"),
        };
        Ok(if xlm { Self::XlmRoberta } else { Self::AsFile })
    }

    /// The name that goes into the tokenize stage's key, for a flavor that changes the ids.
    pub fn key_name(self) -> Option<&'static str> {
        match self {
            Self::AsFile => None,
            Self::XlmRoberta => Some("xlm-roberta"),
        }
    }

    /// Rebuilds `tokenizer`'s pipeline as transformers does for this flavor.
    fn apply(self, tokenizer: &mut Tokenizer) -> Result<(), String> {
        if self == Self::AsFile {
            return Ok(());
        }
        let precompiled = match tokenizer.get_normalizer() {
            Some(NormalizerWrapper::Precompiled(p)) => Some(p.clone()),
            Some(NormalizerWrapper::Sequence(seq)) => seq.as_ref().iter().find_map(|n| match n {
                NormalizerWrapper::Precompiled(p) => Some(p.clone()),
                _ => None,
            }),
            _ => None,
        };
        tokenizer
            .with_normalizer(precompiled.map(NormalizerWrapper::Precompiled))
            .map_err(|e| e.to_string())?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
            PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
        ]))));
        let id = |token: &str| tokenizer.token_to_id(token).ok_or_else(|| format!("no `{token}` token"));
        let (bos, eos) = (id("<s>")?, id("</s>")?);
        let template = TemplateProcessing::builder()
            .try_single("<s> $A </s>")
            .and_then(|b| b.try_pair("<s> $A </s> </s> $B </s>"))
            .map_err(|e| e.to_string())?
            .special_tokens(vec![("<s>", bos), ("</s>", eos)])
            .build()
            .map_err(|e| e.to_string())?;
        tokenizer.with_post_processor(Some(template));
        Ok(())
    }
}

/// A tokenizer configured for classification inputs: special tokens added, truncated to
/// `max_length`, never padded.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Loads `tokenizer.json` built as transformers builds it for `flavor`, and sets truncation
    /// to `max_length` tokens (special tokens included).
    pub fn from_file(path: &Path, max_length: usize, flavor: Flavor) -> Result<Self, TokenizeError> {
        let load_err = |message: String| TokenizeError::Load { path: path.into(), message };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        flavor.apply(&mut tokenizer).map_err(load_err)?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| load_err(e.to_string()))?;
        Ok(Self { tokenizer })
    }

    /// The number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
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
