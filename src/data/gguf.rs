//! The tokenizer inside a GGUF file, rebuilt as the model's own `tokenizer.json` describes it.
//!
//! A GGUF stores a byte-level BPE tokenizer as its vocabulary (already spelled in GPT-2's byte
//! alphabet), its merges, each token's type and a pre-tokenizer name (`tokenizer.ggml.pre`). The
//! pre-tokenizer decides how text is cut before the merges apply, and it differs between models:
//! SmolLM2's (`smollm`) splits every digit apart before GPT-2's byte-level split. Candle's generic
//! conversion and transformers 5's GGUF loader apply GPT-2's split alone, which gives other ids
//! for text such as two spaces before a number. Control tokens (`<|im_start|>`...) are special
//! tokens, matched whole.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::TokenizeError;
use crate::model::GgufFile;

/// The pre-tokenizers pipe rebuilds, by their llama.cpp names.
const PRE_TOKENIZERS: [&str; 3] = ["smollm", "gpt2", "default"];

/// llama.cpp's token type for control tokens.
const CONTROL: i32 = 3;

/// The tokenizer of the GGUF file at `path` (its header read as `gguf`): no special tokens added
/// around a text (SmolLM2 adds none: `tokenizer.ggml.add_bos_token` is false; a file that asks
/// for a BOS is refused rather than silently mis-tokenized).
pub fn gguf_tokenizer(gguf: &GgufFile, path: &Path) -> Result<Tokenizer, TokenizeError> {
    let load = |message: String| TokenizeError::Load { path: path.into(), message };
    let model = gguf.string("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(load(format!("tokenizer model `{model}`: only byte-level BPE (`gpt2`) is supported")));
    }
    let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
    if !PRE_TOKENIZERS.contains(&pre) {
        return Err(load(format!(
            "pre-tokenizer `{pre}` is not supported (supported: {})",
            PRE_TOKENIZERS.join(", ")
        )));
    }
    if gguf.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()) == Some(true) {
        return Err(load("the file asks for a BOS token before every text, which pipe does not add".into()));
    }
    let strings = |key: &str| -> Result<Vec<String>, TokenizeError> {
        let values =
            gguf.get(key).and_then(|v| v.to_vec().ok()).ok_or_else(|| load(format!("no `{key}`")))?;
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| load(format!("`{key}` holds a value that is not a string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Merges = strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').ok_or_else(|| load(format!("merge `{m}` is not two tokens")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_, TokenizeError>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| load(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = match pre {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        _ => PreTokenizerWrapper::ByteLevel(byte_level),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let types = gguf.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok());
    if let Some(types) = types {
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| t.to_i32().is_ok_and(|t| t == CONTROL))
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer.add_special_tokens(control).map_err(|e| load(e.to_string()))?;
    }
    Ok(tokenizer)
}
