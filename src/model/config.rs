//! The parts of a Hugging Face BERT `config.json` that the model needs.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;
use crate::ops::Activation;

/// Architecture hyper-parameters from `config.json`. The whole JSON object is kept too, so that a
/// saved model carries every field it was loaded with.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
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

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|source| ModelError::Config { path: path.into(), source })?;
        let mut config: Self = serde_json::from_value(serde_json::Value::Object(raw.clone()))
            .map_err(|source| ModelError::Config { path: path.into(), source })?;
        let unsupported = |message: String| ModelError::Unsupported { path: path.into(), message };
        match raw.get("model_type").and_then(|v| v.as_str()) {
            None | Some("bert") => {}
            Some(other) => {
                return Err(unsupported(format!("model_type `{other}` is not supported (only `bert`)")));
            }
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
}
