//! The parts of a Hugging Face encoder's `config.json` that the model needs, for every family.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;
use super::family::Family;
use crate::ops::Activation;

/// Architecture hyper-parameters from `config.json`, under BERT's names (DistilBERT's and
/// ModernBERT's own names, such as `dim`, `n_layers` or `norm_eps`, are read as their aliases).
/// The whole JSON object is kept too, so that a saved model carries every field it was loaded with.
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
    #[serde(default = "default_act", alias = "activation", alias = "hidden_activation")]
    pub hidden_act: String,
    /// Dropout after the embeddings and on the feed-forward output (ModernBERT: in its MLP, and
    /// after the embeddings too, which its `embedding_dropout` names apart).
    #[serde(default = "default_dropout", alias = "dropout", alias = "mlp_dropout")]
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
    #[serde(default = "default_eps", alias = "norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// ModernBERT: whether its LayerNorms, attention, MLP and head's dense layer have biases
    /// (its defaults: none).
    #[serde(default)]
    pub norm_bias: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub classifier_bias: Option<bool>,
    /// ModernBERT: the head's activation (default `gelu`) and pooling (`cls` or `mean`).
    #[serde(default)]
    pub classifier_activation: Option<String>,
    #[serde(default)]
    pub classifier_pooling: Option<String>,
    /// ModernBERT: which layers attend locally (`layer_types`, or every layer but each
    /// `global_attn_every_n_layers`-th), within `local_attention` positions in all.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub global_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    pub local_attention: Option<usize>,
    /// ModernBERT's rotary bases: transformers 5's `rope_parameters` per layer type, or the older
    /// `global_rope_theta` / `local_rope_theta`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
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
        match family {
            // DistilBERT has no token types, and a fixed LayerNorm epsilon.
            Family::DistilBert => {
                config.type_vocab_size = 0;
                config.layer_norm_eps = 1e-12;
            }
            // ModernBERT has neither token types nor position embeddings (its positions rotate).
            Family::ModernBert => {
                config.type_vocab_size = 0;
                if raw.get("norm_eps").is_none() {
                    config.layer_norm_eps = 1e-5;
                }
                let pooling = config.pooling();
                if pooling != "cls" && pooling != "mean" {
                    return Err(unsupported(format!(
                        "classifier_pooling `{pooling}`: expected `cls` or `mean`"
                    )));
                }
                if Activation::from_hf(config.classifier_activation()).is_none() {
                    return Err(unsupported(format!(
                        "classifier_activation `{}` is not supported",
                        config.classifier_activation()
                    )));
                }
                if !config.head_dim().is_multiple_of(2) {
                    return Err(unsupported(format!(
                        "head width {} is odd: rotary embeddings need pairs",
                        config.head_dim()
                    )));
                }
                if let Some(types) = &config.layer_types
                    && (types.len() != config.num_hidden_layers
                        || types.iter().any(|t| t != "full_attention" && t != "sliding_attention"))
                {
                    return Err(unsupported(format!(
                        "layer_types {types:?}: expected one of full_attention / sliding_attention per layer ({})",
                        config.num_hidden_layers
                    )));
                }
            }
            _ => {}
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

    /// Whether a ModernBERT part has biases (`norm_bias` and the like; none unless the config
    /// says so). BERT-style families always have them.
    pub fn has_bias(&self, flag: Option<bool>) -> bool {
        self.family != Family::ModernBert || flag.unwrap_or(false)
    }

    /// The activation of the head's dense layer.
    pub fn head_activation(&self) -> Activation {
        self.family.head_activation().unwrap_or_else(|| {
            Activation::from_hf(self.classifier_activation()).expect("checked when the config was read")
        })
    }

    /// ModernBERT's head activation, as the config names it.
    pub fn classifier_activation(&self) -> &str {
        self.classifier_activation.as_deref().unwrap_or("gelu")
    }

    /// ModernBERT's pooling: `cls` (the first token) or `mean` (of each row's tokens).
    pub fn pooling(&self) -> &str {
        self.classifier_pooling.as_deref().unwrap_or("cls")
    }

    /// The attention window of layer `n`: ModernBERT's local layers see `local_attention / 2`
    /// positions either side; every other layer sees its whole row.
    pub fn window(&self, n: usize) -> Option<usize> {
        if self.family != Family::ModernBert {
            return None;
        }
        let local = match &self.layer_types {
            Some(types) => types[n] == "sliding_attention",
            None => !n.is_multiple_of(self.global_attn_every_n_layers.unwrap_or(3).max(1)),
        };
        local.then(|| self.local_attention.unwrap_or(128) / 2)
    }

    /// The rotary base of a global (`local == false`) or local layer: transformers 5's
    /// `rope_parameters`, else `global_rope_theta` / `local_rope_theta`, else ModernBERT's
    /// defaults (160,000 and 10,000).
    pub fn rope_theta(&self, local: bool) -> f64 {
        let kind = if local { "sliding_attention" } else { "full_attention" };
        let from_parameters =
            self.rope_parameters.as_ref().and_then(|p| p.get(kind)?.get("rope_theta")?.as_f64());
        let older = if local { self.local_rope_theta } else { self.global_rope_theta };
        from_parameters.or(older).unwrap_or(if local { 10_000.0 } else { 160_000.0 })
    }

    /// The longest input, in tokens: `max_position_embeddings`, less the positions RoBERTa's ids
    /// skip (they start after the padding id: 512 of roberta-base's 514).
    pub fn max_length(&self) -> usize {
        let skipped = match self.family {
            Family::Roberta | Family::XlmRoberta => self.pad_id() as usize + 1,
            _ => 0,
        };
        self.max_position_embeddings.saturating_sub(skipped)
    }

    /// The token id used for padding (`pad_token_id`, else 0).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }
}
