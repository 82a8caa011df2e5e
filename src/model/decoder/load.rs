//! Decoder checkpoints: a Hugging Face directory (`config.json` + `model.safetensors`) in, the
//! same out, under transformers' tensor names (`model.embed_tokens`, `model.layers.N.self_attn.
//! q_proj`, ..., `model.norm`, `lm_head`; no `lm_head` when the embeddings are tied).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{CausalLm, DecoderConfig, DecoderLayer, RmsNorm};
use crate::model::ModelError;
use crate::model::checkpoint::{CONFIG_FILE, Loader, WEIGHTS_FILE, save_weights};

impl CausalLm {
    /// Loads a GGUF file (`*.gguf`) or a checkpoint directory, its parameters converted to `dtype`.
    pub fn from_source(source: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        match source.extension().is_some_and(|e| e == "gguf") && source.is_file() {
            true => Self::from_gguf(source, dtype, device),
            false => Self::from_pretrained(source, dtype, device),
        }
    }

    /// Loads a checkpoint directory, its parameters converted to `dtype`.
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = DecoderConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(ModelError::Io {
                path: weights_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors"),
            });
        }
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?;
        Self::from_tensors(config, tensors, &weights_path, dtype, device)
    }

    /// Builds the model of `config` from `tensors` (named as transformers names them; `path`
    /// names their file in errors).
    pub(super) fn from_tensors(
        config: DecoderConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut loader = Loader { path, tensors, dtype, device, params: Vec::new() };
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (q_width, kv_width) = (c.num_attention_heads * d, c.kv_heads() * d);
        let embed = loader.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let norm = |loader: &mut Loader<'_>, name: &str, width: usize| {
            Ok::<_, ModelError>(RmsNorm { weight: loader.take(&format!("{name}.weight"), &[width])? })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let at = |part: &str| format!("model.layers.{n}.{part}");
            let input_norm = norm(&mut loader, &at("input_layernorm"), h)?;
            let query = loader.linear(&at("self_attn.q_proj"), q_width, h, c.qkv_bias())?;
            let key = loader.linear(&at("self_attn.k_proj"), kv_width, h, c.qkv_bias())?;
            let value = loader.linear(&at("self_attn.v_proj"), kv_width, h, c.qkv_bias())?;
            let qk_norms = match c.qk_norm() {
                true => Some((
                    norm(&mut loader, &at("self_attn.q_norm"), d)?,
                    norm(&mut loader, &at("self_attn.k_norm"), d)?,
                )),
                false => None,
            };
            let output = loader.linear(&at("self_attn.o_proj"), h, q_width, c.output_bias())?;
            let post_attention_norm = norm(&mut loader, &at("post_attention_layernorm"), h)?;
            let gate = loader.linear(&at("mlp.gate_proj"), i, h, c.mlp_bias)?;
            let up = loader.linear(&at("mlp.up_proj"), i, h, c.mlp_bias)?;
            let down = loader.linear(&at("mlp.down_proj"), h, i, c.mlp_bias)?;
            layers.push(DecoderLayer {
                input_norm,
                query,
                key,
                value,
                qk_norms,
                output,
                post_attention_norm,
                gate,
                up,
                down,
            });
        }
        let final_norm = norm(&mut loader, "model.norm", h)?;
        let lm_head = match c.tie_word_embeddings {
            true => embed.clone(),
            false => loader.take("lm_head.weight", &[c.vocab_size, h])?,
        };
        Ok(Self {
            attention_dropout: config.attention_dropout,
            config,
            params: loader.params,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            compute: dtype,
            products: crate::ops::Products::Full,
        })
    }

    /// Writes a Hugging Face directory (`config.json`, `generation_config.json`,
    /// `model.safetensors`) that `AutoModelForCausalLM.from_pretrained` loads as it is; tensors
    /// as f32 whatever the training dtype, tied embeddings once.
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), ModelError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let c = &self.config;
        let mut config = c.raw.clone();
        config.insert("architectures".into(), serde_json::json!([c.variant.architecture()]));
        config.insert("model_type".into(), c.variant.model_type().into());
        config.insert("tie_word_embeddings".into(), c.tie_word_embeddings.into());
        config.insert("dtype".into(), "float32".into());
        config.remove("torch_dtype");
        let write_json = |name: &str, value: &serde_json::Value| {
            let path = dir.join(name);
            let json = serde_json::to_string_pretty(value).expect("JSON serialises") + "\n";
            std::fs::write(&path, json).map_err(io(&path))
        };
        write_json(CONFIG_FILE, &serde_json::Value::Object(config))?;
        let mut generation = serde_json::Map::new();
        if let Some(bos) = c.bos_token_id {
            generation.insert("bos_token_id".into(), bos.into());
        }
        match &c.eos_token_id {
            Some(super::TokenIds::One(id)) => generation.insert("eos_token_id".into(), (*id).into()),
            Some(super::TokenIds::Many(ids)) => generation.insert("eos_token_id".into(), ids.clone().into()),
            None => None,
        };
        if let Some(pad) = c.pad_token_id {
            generation.insert("pad_token_id".into(), pad.into());
        }
        // pipe generates greedily unless asked otherwise: say so, so that `generate()` agrees.
        generation.insert("do_sample".into(), false.into());
        write_json("generation_config.json", &serde_json::Value::Object(generation))?;

        save_weights(&self.params, dir)
    }
}
