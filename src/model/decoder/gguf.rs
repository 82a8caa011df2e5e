//! Decoders from llama.cpp's GGUF files (SmolLM2 ships as one): the architecture from the file's
//! metadata, each tensor dequantised to f32 and renamed to transformers' names. llama.cpp stores
//! Llama's query and key rows permuted for its rotary layout (pairs interleaved within each head);
//! they are put back in Hugging Face's order (halves), as transformers' own GGUF loader does.
//! The dequantised weights are what the file holds: a 4-bit file gives 4-bit approximations of the
//! released weights, trained from then on in f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::{CausalLm, DecoderConfig};
use crate::model::ModelError;

/// A GGUF file's header: metadata and tensor directory (no tensor data).
pub struct GgufFile {
    content: Content,
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut file =
            std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Unsupported {
            path: path.into(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self { content })
    }

    /// The metadata value `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The string metadata value `key`, if present and a string.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.get(key)?.to_string().ok().map(String::as_str)
    }

    /// An unsigned integer metadata value, whatever its width.
    pub fn uint(&self, key: &str) -> Option<u64> {
        let value = self.get(key)?;
        value.to_u64().or_else(|_| value.to_u32().map(u64::from)).ok()
    }

    /// A float metadata value, whatever its width.
    pub fn float(&self, key: &str) -> Option<f64> {
        let value = self.get(key)?;
        value.to_f64().or_else(|_| value.to_f32().map(f64::from)).ok()
    }

    /// Whether the file has a tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// The decoder architectures GGUF files name (`general.architecture`), which pipe runs.
const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

impl CausalLm {
    /// Loads a decoder from a GGUF file, its parameters dequantised and converted to `dtype`.
    pub fn from_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let gguf = GgufFile::open(path)?;
        let config = DecoderConfig::from_json(gguf_config(&gguf, path)?, path)?;
        let arch = gguf.string("general.architecture").unwrap_or_default().to_string();
        let mut file =
            std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = gguf.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let Some(hf) = hf_name(name) else { continue };
            let tensor = gguf
                .content
                .tensor(&mut file, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .map_err(|e| ModelError::Unsupported {
                    path: path.into(),
                    message: format!("tensor `{name}`: {e}"),
                })?;
            let heads = match name.rsplit('.').nth(1) {
                Some("attn_q") => Some(config.num_attention_heads),
                Some("attn_k") => Some(config.kv_heads()),
                _ => None,
            };
            let tensor = match heads {
                Some(heads) if arch == "llama" => unpermute_rows(&tensor, heads)?,
                _ => tensor,
            };
            tensors.insert(hf, tensor);
        }
        Self::from_tensors(config, tensors, path, dtype, device)
    }
}

/// A transformers `config.json` object for the model a GGUF file describes.
pub fn gguf_config(
    gguf: &GgufFile,
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, ModelError> {
    let unsupported = |message: String| ModelError::Unsupported { path: path.into(), message };
    let arch =
        gguf.string("general.architecture").ok_or_else(|| unsupported("no general.architecture".into()))?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(unsupported(format!(
            "GGUF architecture `{arch}` is not supported (supported: {})",
            ARCHITECTURES.join(", ")
        )));
    }
    let key = |name: &str| format!("{arch}.{name}");
    let need = |name: &str| {
        gguf.uint(&key(name)).ok_or_else(|| unsupported(format!("no `{}` in the file's metadata", key(name))))
    };
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let vocab = match gguf.uint(&key("vocab_size")) {
        Some(n) => n,
        None => gguf.get("tokenizer.ggml.tokens").and_then(|t| t.to_vec().ok()).map_or(0, |t| t.len() as u64),
    };
    let mut config = serde_json::json!({
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": gguf.uint(&key("attention.head_count_kv")).unwrap_or(heads),
        "head_dim": gguf.uint(&key("attention.key_length")).unwrap_or(hidden / heads.max(1)),
        "max_position_embeddings": need("context_length")?,
        "rms_norm_eps": gguf.float(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": gguf.float(&key("rope.freq_base")).unwrap_or(10_000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": !gguf.has_tensor("output.weight"),
    });
    for (field, meta) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = gguf.uint(meta) {
            config[field] = id.into();
        }
    }
    // Llama 3.1+ files carry their rotary scaling as a `rope_freqs` tensor, others as metadata.
    if gguf.get(&key("rope.scaling.type")).is_some() || gguf.has_tensor("rope_freqs.weight") {
        return Err(unsupported(
            "scaled rotary positions (`rope.scaling.type`, `rope_freqs`) are not supported".into(),
        ));
    }
    match config {
        serde_json::Value::Object(map) => Ok(map),
        _ => unreachable!("a JSON object literal"),
    }
}

/// transformers' name for a GGUF tensor (`None` for one the model does not use, such as
/// precomputed rotary tables).
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = simple {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let part = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.{kind}"))
}

/// Undoes llama.cpp's rotary permutation of a query or key projection (weight `(out, in)` or bias
/// `(out,)`): within each head, llama.cpp interleaves the rows of the two halves (`x0 y0 x1 y1
/// ...`); transformers keeps the halves apart (`x0 x1 ... y0 y1 ...`).
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = out / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}
