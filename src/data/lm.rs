//! Language-model data: a decoder's tokenizer with its end-of-sequence id and chat template, and
//! the two ways rows become training sequences: documents packed one after another into blocks
//! (plain language modelling: every token is predicted), or prompt/completion pairs (supervised
//! fine-tuning: only the completion's tokens are).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::TokenizeError;

/// A decoder's tokenizer: from a GGUF file, or a `tokenizer.json` with the `tokenizer_config.json`
/// (and `chat_template.jinja`, transformers 5's place for it) beside it.
pub struct LmTokenizer {
    tokenizer: Tokenizer,
    /// Ends every document and completion.
    eos: u32,
    eos_token: String,
    bos_token: Option<String>,
    chat_template: Option<String>,
    path: PathBuf,
}

/// Token ids per sequence, and in each the first position whose token the loss predicts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequences {
    pub ids: Vec<Vec<u32>>,
    pub loss_from: Vec<u32>,
}

impl LmTokenizer {
    /// Loads the tokenizer of a GGUF file (`*.gguf`) or a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, TokenizeError> {
        let load = |message: String| TokenizeError::Load { path: path.into(), message };
        if path.extension().is_some_and(|e| e == "gguf") {
            let gguf = crate::model::GgufFile::open(path).map_err(|e| load(e.to_string()))?;
            let tokenizer = super::gguf_tokenizer(&gguf, path)?;
            let id = |key: &str| gguf.uint(key).map(|id| id as u32);
            let eos =
                id("tokenizer.ggml.eos_token_id").ok_or_else(|| load("no end-of-sequence id".into()))?;
            let token = |id: u32| tokenizer.id_to_token(id);
            return Ok(Self {
                eos_token: token(eos)
                    .ok_or_else(|| load(format!("end-of-sequence id {eos} is not a token")))?,
                bos_token: id("tokenizer.ggml.bos_token_id").and_then(token),
                chat_template: gguf.string("tokenizer.chat_template").map(str::to_string),
                eos,
                tokenizer,
                path: path.into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| load(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| TokenizeError::Load {
                path: config_path.clone(),
                message: format!("not JSON: {e}"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        // A special token is written as its text or as an AddedToken object with `content`.
        let special = |name: &str| {
            let value = config.get(name)?;
            value.as_str().or_else(|| value.get("content")?.as_str()).map(str::to_string)
        };
        let eos_token = special("eos_token").ok_or_else(|| TokenizeError::Load {
            path: config_path.clone(),
            message: "no `eos_token`: a causal LM needs an end-of-sequence token".into(),
        })?;
        let eos = tokenizer.token_to_id(&eos_token).ok_or_else(|| TokenizeError::Load {
            path: config_path.clone(),
            message: format!("eos_token `{eos_token}` is not in the vocabulary"),
        })?;
        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(template) => Some(template),
            Err(_) => config.get("chat_template").and_then(|t| t.as_str()).map(str::to_string),
        };
        Ok(Self {
            tokenizer,
            eos,
            eos_token,
            bos_token: special("bos_token"),
            chat_template,
            path: path.into(),
        })
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The end-of-sequence id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The chat template, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The ids of `text`; `special` adds the tokenizer's own special tokens around it (a BOS,
    /// where its post-processor adds one). Special tokens written in the text are matched whole.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer.encode_fast(text, special).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }

    /// `prompt` as a user's message through the chat template, ready for the assistant's answer
    /// (`add_generation_prompt`).
    pub fn chat_prompt(&self, prompt: &str) -> Result<String, TokenizeError> {
        let chat = self.chat_environment()?;
        self.render(&chat, prompt).map_err(|message| TokenizeError::Load { path: self.path.clone(), message })
    }

    /// The chat template in an environment set up as transformers renders templates: blocks trim
    /// their newline and leading blanks, Python's string and dict methods (`.strip()`,
    /// `.startswith()`, `.items()`...), loop controls, and `raise_exception`.
    fn chat_environment(&self) -> Result<minijinja::Environment<'_>, TokenizeError> {
        let load = |message: String| TokenizeError::Load { path: self.path.clone(), message };
        let template =
            self.chat_template.as_deref().ok_or_else(|| load("the tokenizer has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| load(e.to_string()))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", template)
            .map_err(|e| load(format!("its chat template does not parse: {e}")))?;
        Ok(env)
    }

    /// `prompt` as a user's message through the template of `chat`.
    fn render(&self, chat: &minijinja::Environment<'_>, prompt: &str) -> Result<String, String> {
        let context = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => prompt }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone(),
        };
        let template = chat.get_template("chat").map_err(|e| e.to_string())?;
        template.render(context).map_err(|e| format!("the chat template fails: {e}"))
    }

    /// `tokenizer_config.json` for an exported model: the special tokens and chat template, so
    /// that transformers' `AutoTokenizer` and `apply_chat_template` work on the directory.
    pub fn tokenizer_config(&self) -> serde_json::Value {
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_000_000_000u64,
        });
        if let Some(bos) = &self.bos_token {
            config["bos_token"] = bos.clone().into();
        }
        if let Some(template) = &self.chat_template {
            config["chat_template"] = template.clone().into();
        }
        config
    }

    /// Each document's ids followed by the end-of-sequence id, all of them one after another, cut
    /// into blocks of `block` tokens (the last may be shorter; one of a single token predicts
    /// nothing and is left out). Every token of a block but its first is predicted.
    pub fn pack(&self, documents: &[String], block: usize) -> Result<Sequences, TokenizeError> {
        let encoded = self.encode_all(documents, true)?;
        let stream: Vec<u32> = encoded
            .into_iter()
            .flat_map(|mut ids| {
                ids.push(self.eos);
                ids
            })
            .collect();
        let ids: Vec<Vec<u32>> =
            stream.chunks(block.max(2)).filter(|b| b.len() > 1).map(<[u32]>::to_vec).collect();
        Ok(Sequences { loss_from: vec![0; ids.len()], ids })
    }

    /// Prompt/completion pairs: the prompt's ids (through the chat template when `chat`), the
    /// completion's and the end-of-sequence id, the loss from the completion's first token. A pair
    /// longer than `max_length` loses the end of its completion (and its end-of-sequence id); a
    /// row whose template fails, whose prompt leaves no room for one token of completion, or that
    /// predicts nothing (no prompt, no completion) is an error naming its line (`lines[row]` of
    /// `path`).
    pub fn prompt_completion(
        &self,
        prompts: &[String],
        completions: &[String],
        chat: bool,
        max_length: usize,
        path: &Path,
        lines: &[u64],
    ) -> Result<(Sequences, usize), TokenizeError> {
        let bad_row = |row: usize, message: String| TokenizeError::BadRow {
            path: path.into(),
            line: lines.get(row).copied().unwrap_or(0),
            message,
        };
        let prompts = match chat {
            true => {
                let env = self.chat_environment()?;
                prompts
                    .iter()
                    .enumerate()
                    .map(|(row, p)| self.render(&env, p).map_err(|message| bad_row(row, message)))
                    .collect::<Result<Vec<_>, _>>()?
            }
            false => prompts.to_vec(),
        };
        // A chat template writes any BOS itself (transformers tokenizes its output without adding
        // special tokens); a plain prompt gets the tokenizer's own.
        let prompt_ids = self.encode_all(&prompts, !chat)?;
        let completion_ids = self.encode_all(completions, false)?;
        let mut sequences = Sequences::default();
        let mut truncated = 0;
        for (row, (prompt, completion)) in prompt_ids.into_iter().zip(completion_ids).enumerate() {
            if prompt.len() + 1 > max_length {
                return Err(bad_row(
                    row,
                    format!(
                        "the prompt is {} tokens, which leaves no room for its completion within tokenizer.max_length = {max_length}",
                        prompt.len()
                    ),
                ));
            }
            let start = prompt.len();
            let mut ids = prompt;
            ids.extend(completion);
            ids.push(self.eos);
            if ids.len() > max_length {
                ids.truncate(max_length);
                truncated += 1;
            }
            if crate::model::predicted_tokens(ids.len(), start) == 0 {
                return Err(bad_row(
                    row,
                    "an empty prompt and an empty completion leave nothing to predict".into(),
                ));
            }
            sequences.ids.push(ids);
            sequences.loss_from.push(start as u32);
        }
        Ok((sequences, truncated))
    }

    fn encode_all(&self, texts: &[String], special: bool) -> Result<Vec<Vec<u32>>, TokenizeError> {
        texts
            .par_iter()
            .enumerate()
            .map(|(row, text)| {
                self.encode(text, special).map_err(|message| TokenizeError::Encode { row, message })
            })
            .collect()
    }
}
