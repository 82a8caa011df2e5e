//! The parts of a Hugging Face encoder's `config.json` that the model needs, for every family.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;
use super::family::Family;
use crate::ops::Activation;

/// Architecture hyper-parameters from `config.json`, under BERT's names (DistilBERT's own names,
/// such as `dim` and `n_layers`, are read as their aliases). The whole JSON object is kept too, so
/// that a saved model carries every field it was loaded with.
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderConfig {
    /// The architecture, from `model_type` (a config without one is BERT's, as old ones are).
    #[serde(skip, default = "default_family")]
    pub family: Family,
    pub vocab_size: usize,
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    #[serde(default = "default_act", alias = "activation")]
    pub hidden_act: String,
    #[serde(default = "default_dropout", alias = "dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout", alias = "attention_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default, alias = "seq_classif_dropout")]
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: usize,
    /// Token types (segments); 0 for a family without them (DistilBERT).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// The width of the embeddings, when it differs from `hidden_size` (ELECTRA projects them).
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// The label names by class index (`id2label`), when the checkpoint has them.
    #[serde(default, skip)]
    pub id2label: Vec<String>,
    /// The config file's whole JSON object.
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn default_family() -> Family {
    Family::Bert
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

impl EncoderConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|source| ModelError::Config { path: path.into(), source })?;
        let unsupported = |message: String| ModelError::Unsupported { path: path.into(), message };
        let family = match raw.get("model_type") {
            None => Family::Bert,
            Some(serde_json::Value::String(name)) => Family::from_model_type(name).ok_or_else(|| {
                unsupported(format!(
                    "model_type `{name}` is not supported (supported: {})",
                    Family::supported_list()
                ))
            })?,
            Some(other) => return Err(unsupported(format!("model_type {other} is not a string"))),
        };
        let mut config: Self = serde_json::from_value(serde_json::Value::Object(raw.clone()))
            .map_err(|source| ModelError::Config { path: path.into(), source })?;
        config.family = family;
        if family == Family::DistilBert {
            // DistilBERT has no token types, and a fixed LayerNorm epsilon.
            config.type_vocab_size = 0;
            config.layer_norm_eps = 1e-12;
        }
        if config.activation().is_none() {
            return Err(unsupported(format!("hidden_act `{}` is not supported", config.hidden_act)));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if let Some(map) = raw.get("id2label").and_then(|v| v.as_object()) {
            let mut labels: Vec<(usize, String)> =
                map.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect();
            labels.sort();
            if labels.iter().enumerate().all(|(i, (k, _))| i == *k) {
                config.id2label = labels.into_iter().map(|(_, v)| v).collect();
            }
        }
        config.raw = raw;
        Ok(config)
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Option<Activation> {
        Activation::from_hf(&self.hidden_act)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the embeddings (the hidden size, unless the family projects them).
    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// The token id used for padding (`pad_token_id`, else 0).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }
}
