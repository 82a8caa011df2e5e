//! The parts of a decoder's `config.json` that the model needs: Llama's names, which Qwen2 and
//! Qwen3 share; what sets those two apart is derived from `model_type` (see [`Variant`]).

use std::path::Path;

use serde::Deserialize;

use crate::model::ModelError;

/// How a Llama-architecture model departs from Llama's layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Llama (and SmolLM2): biases only where `attention_bias` / `mlp_bias` ask for them.
    Llama,
    /// Qwen2 / Qwen2.5: biases on the query, key and value projections (not the output's).
    Qwen2,
    /// Qwen3: each head's queries and keys RMS-normalised before the rotation.
    Qwen3,
}

impl Variant {
    pub const ALL: [Self; 3] = [Self::Llama, Self::Qwen2, Self::Qwen3];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// The transformers class a saved directory declares.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The variant of a `model_type`, if it is a supported decoder.
    pub fn from_model_type(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.model_type() == name)
    }

    /// The supported decoder `model_type`s, for error messages.
    pub fn supported_list() -> String {
        Self::ALL.map(Self::model_type).join(", ")
    }
}

/// `eos_token_id`: one id or several (any of them ends a generation).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// A decoder's architecture hyper-parameters, under transformers' `LlamaConfig` names. The whole
/// JSON object is kept too, so that a saved model carries every field it was loaded with.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    #[serde(skip, default = "default_variant")]
    pub variant: Variant,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `hidden_size / num_attention_heads` when absent (Qwen3: 128).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// The rotary base: transformers 5's `rope_parameters.rope_theta`, or the older `rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the output layer is the input embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Qwen2/Qwen3's sliding-window layers (not supported: refused when on).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The config file's whole JSON object.
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn default_variant() -> Variant {
    Variant::Llama
}
fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_init_range() -> f64 {
    0.02
}

impl DecoderConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|source| ModelError::Config { path: path.into(), source })?;
        Self::from_json(raw, path)
    }

    /// Reads and checks a config's JSON object (`path` names it in errors).
    pub fn from_json(
        raw: serde_json::Map<String, serde_json::Value>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let unsupported = |message: String| ModelError::Unsupported { path: path.into(), message };
        let variant = match raw.get("model_type").and_then(|t| t.as_str()) {
            Some(name) => Variant::from_model_type(name).ok_or_else(|| {
                unsupported(format!(
                    "model_type `{name}` is not a supported decoder (supported: {})",
                    Variant::supported_list()
                ))
            })?,
            None => return Err(unsupported("the config has no model_type".into())),
        };
        let mut config: Self = serde_json::from_value(serde_json::Value::Object(raw.clone()))
            .map_err(|source| ModelError::Config { path: path.into(), source })?;
        config.variant = variant;
        if config.hidden_act != "silu" {
            return Err(unsupported(format!("hidden_act `{}`: only `silu` is supported", config.hidden_act)));
        }
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(unsupported(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if config.head_dim() == 0 || !config.head_dim().is_multiple_of(2) {
            return Err(unsupported(format!("head_dim {}: rotary embeddings need pairs", config.head_dim())));
        }
        let rope_type = |v: &Option<serde_json::Value>| {
            v.as_ref().and_then(|p| p.get("rope_type").or(p.get("type"))?.as_str().map(str::to_string))
        };
        for scaling in
            [rope_type(&config.rope_parameters), rope_type(&config.rope_scaling)].into_iter().flatten()
        {
            if scaling != "default" {
                return Err(unsupported(format!(
                    "rope_type `{scaling}`: only the default rotary embedding is supported"
                )));
            }
        }
        if config.use_sliding_window {
            return Err(unsupported(
                "use_sliding_window = true: sliding-window layers are not supported".into(),
            ));
        }
        config.raw = raw;
        Ok(config)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        match (self.head_dim, self.variant) {
            (Some(d), _) => d,
            (None, Variant::Qwen3) => 128,
            (None, _) => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// The rotary base (`rope_parameters`, else `rope_theta`, else Llama's 10,000).
    pub fn rope_base(&self) -> f64 {
        let from_parameters = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")?.as_f64());
        from_parameters.or(self.rope_theta).unwrap_or(10_000.0)
    }

    /// Whether the query, key and value projections have biases.
    pub fn qkv_bias(&self) -> bool {
        self.variant == Variant::Qwen2 || self.attention_bias
    }

    /// Whether the attention's output projection has a bias.
    pub fn output_bias(&self) -> bool {
        self.variant != Variant::Qwen2 && self.attention_bias
    }

    /// Whether each head's queries and keys are RMS-normalised (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.variant == Variant::Qwen3
    }

    /// The ids that end a generation.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}
