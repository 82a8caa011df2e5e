//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` in, the same out.
//!
//! Tensor names follow `transformers`' `...ForSequenceClassification` of the config's family (see
//! `family`), such as `bert.embeddings...`, `bert.encoder.layer.N...`, `bert.pooler...`,
//! `classifier...`. Checkpoints of a bare base model (all-MiniLM-L6-v2 is a `BertModel`) lack the
//! base prefix, and old ones name LayerNorm parameters `gamma`/`beta`; both load. A head that the
//! checkpoint lacks (or that has another number of classes) is initialised as transformers does:
//! normal with std `initializer_range`, zero bias, drawn from the seeded RNG.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::encoder::{Embeddings, Encoder, HeadLayers, Layer, Linear, Norm};
use super::family::Family;
use super::modernbert::{FINAL_NORM, HEAD_NORM, ModernLayer};
use super::{Classifier, Dropout, EncoderConfig, ModelError};
use crate::rng;

/// Weights file name inside a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Architecture file name inside a model directory.
pub const CONFIG_FILE: &str = "config.json";

impl Classifier {
    /// Loads a checkpoint directory for classification into `labels` (class names by index).
    ///
    /// With `labels` = `None` the checkpoint's own `id2label` is used (a fine-tuned model).
    /// Parameters are converted to `dtype`; a missing or mis-sized head is initialised from `seed`.
    pub fn from_pretrained(
        dir: &Path,
        labels: Option<Vec<String>>,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let config_path = dir.join(CONFIG_FILE);
        let config = EncoderConfig::from_file(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(ModelError::Io {
                path: weights_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors"),
            });
        }
        let names = config.family.names();
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?
            .into_iter()
            .map(|(name, t)| (names.canonical(&name), t))
            .collect();
        let labels = match labels {
            Some(l) => l,
            None if !config.id2label.is_empty() => config.id2label.clone(),
            None => {
                return Err(ModelError::Unsupported {
                    path: config_path,
                    message: "the config has no id2label and no labels were given".into(),
                });
            }
        };
        let mut loader = Loader { path: &weights_path, tensors, dtype, device, params: Vec::new() };
        let mut init = Init { rng: rng::stream(seed, "init", 0), std: config.initializer_range };
        let (h, i, e) = (config.hidden_size, config.intermediate_size, config.embedding_width());
        let at = |name: &str, n: usize| names.encoder(name, n);
        let modern = config.family == Family::ModernBert;
        let bias = |flag: Option<bool>| config.has_bias(flag);
        let embeddings = Embeddings {
            word: loader.take(&(at(names.word, 0) + ".weight"), &[config.vocab_size, e])?,
            position: match modern {
                true => None,
                false => Some(
                    loader
                        .take(&(at(names.position, 0) + ".weight"), &[config.max_position_embeddings, e])?,
                ),
            },
            token_type: match config.type_vocab_size {
                0 => None,
                types => Some(loader.take(&(at(names.token_type, 0) + ".weight"), &[types, e])?),
            },
            norm: loader.norm(&at(names.embeddings_norm, 0), e, bias(config.norm_bias))?,
            projection: match e == h {
                true => None,
                false => Some(loader.linear(&at(names.projection, 0), h, e, true)?),
            },
        };
        let encoder = if modern {
            let (norms, mlp) = (bias(config.norm_bias), bias(config.mlp_bias));
            let attention = bias(config.attention_bias);
            let mut layers = Vec::with_capacity(config.num_hidden_layers);
            for n in 0..config.num_hidden_layers {
                layers.push(ModernLayer {
                    attention_norm: match n {
                        0 => None,
                        _ => Some(loader.norm(&at(names.attention_norm, n), h, norms)?),
                    },
                    qkv: loader.linear(&at(names.query, n), 3 * h, h, attention)?,
                    attention_out: loader.linear(&at(names.attention_out, n), h, h, attention)?,
                    mlp_norm: loader.norm(&at(names.output_norm, n), h, norms)?,
                    mlp_in: loader.linear(&at(names.intermediate, n), 2 * i, h, mlp)?,
                    mlp_out: loader.linear(&at(names.output, n), h, i, mlp)?,
                    window: config.window(n),
                });
            }
            Encoder::PreNorm { layers, final_norm: loader.norm(FINAL_NORM, h, norms)? }
        } else {
            let mut layers = Vec::with_capacity(config.num_hidden_layers);
            for n in 0..config.num_hidden_layers {
                layers.push(Layer {
                    query: loader.linear(&at(names.query, n), h, h, true)?,
                    key: loader.linear(&at(names.key, n), h, h, true)?,
                    value: loader.linear(&at(names.value, n), h, h, true)?,
                    attention_out: loader.linear(&at(names.attention_out, n), h, h, true)?,
                    attention_norm: loader.norm(&at(names.attention_norm, n), h, true)?,
                    intermediate: loader.linear(&at(names.intermediate, n), i, h, true)?,
                    output: loader.linear(&at(names.output, n), h, i, true)?,
                    output_norm: loader.norm(&at(names.output_norm, n), h, true)?,
                });
            }
            Encoder::PostNorm(layers)
        };
        let head = HeadLayers {
            dense: loader.linear_or_init(names.head_dense, h, h, bias(config.classifier_bias), &mut init)?,
            norm: match modern {
                true => Some(loader.norm_or_init(HEAD_NORM, h, bias(config.norm_bias))?),
                false => None,
            },
            out: loader.linear_or_init(names.head_out, labels.len(), h, true, &mut init)?,
        };
        Ok(Self {
            activation: config.activation().expect("checked when the config was read"),
            dropout: Dropout::from_config(&config),
            config,
            labels,
            params: loader.params,
            embeddings,
            encoder,
            head,
            compute: dtype,
            products: crate::ops::Products::Full,
        })
    }

    /// Writes a Hugging Face directory (`config.json`, `model.safetensors` with `{"format": "pt"}`
    /// metadata) that `AutoModelForSequenceClassification.from_pretrained` loads as it is.
    /// Tensors are written as f32 whatever the training dtype.
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.into(), source })?;
        let mut config = self.config.raw.clone();
        let id2label: serde_json::Map<_, _> =
            self.labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone().into())).collect();
        let label2id: serde_json::Map<_, _> =
            self.labels.iter().enumerate().map(|(i, l)| (l.clone(), i.into())).collect();
        let family = self.config.family;
        config.insert("architectures".into(), serde_json::json!([family.architecture()]));
        config.insert("model_type".into(), family.model_type().into());
        config.insert("num_labels".into(), self.labels.len().into());
        config.insert("id2label".into(), id2label.into());
        config.insert("label2id".into(), label2id.into());
        config.insert("problem_type".into(), "single_label_classification".into());
        config.insert("dtype".into(), "float32".into());
        config.remove("torch_dtype");
        let config_path = dir.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(&config).expect("a JSON map serialises") + "\n";
        std::fs::write(&config_path, json).map_err(|source| ModelError::Io { path: config_path, source })?;

        save_weights(&self.params, dir)
    }
}

/// Writes `params` to `dir/model.safetensors` as f32 on the CPU, with the `{"format": "pt"}`
/// metadata transformers expects.
pub(super) fn save_weights(params: &[(String, Var)], dir: &Path) -> Result<(), ModelError> {
    let tensors = params
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights_path = dir.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(tensors, Some(metadata), &weights_path)
        .map_err(|source| ModelError::Safetensors { path: weights_path, source })
}

/// Takes tensors out of a checkpoint into `Var`s, recording each parameter's name in order.
pub(super) struct Loader<'a> {
    pub path: &'a Path,
    pub tensors: HashMap<String, Tensor>,
    pub dtype: DType,
    pub device: &'a Device,
    pub params: Vec<(String, Var)>,
}

struct Init {
    rng: rng::Rng,
    std: f64,
}

impl Loader<'_> {
    pub(super) fn register(&mut self, name: &str, tensor: Tensor) -> Result<Tensor, ModelError> {
        let var = Var::from_tensor(&tensor.to_dtype(self.dtype)?.to_device(self.device)?)?;
        let t = var.as_tensor().clone();
        self.params.push((name.to_string(), var));
        Ok(t)
    }

    pub(super) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = self.remove(name, shape)?;
        self.register(name, tensor)
    }

    /// The checkpoint's tensor `name`, checked against `shape`.
    pub(super) fn remove(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.path.into(), name: name.into() })?;
        if tensor.dims() != shape {
            return Err(ModelError::Shape {
                path: self.path.into(),
                name: name.into(),
                got: tensor.dims().to_vec(),
                want: shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// A zero bias that is not a parameter: for layers without one (it adds exactly nothing).
    pub(super) fn no_bias(&self, width: usize) -> Result<Tensor, ModelError> {
        Ok(Tensor::zeros(width, self.dtype, self.device)?)
    }

    pub(super) fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        Ok(Linear {
            weight: self.take(&format!("{prefix}.weight"), &[out, inp])?,
            bias: match bias {
                true => self.take(&format!("{prefix}.bias"), &[out])?,
                false => self.no_bias(out)?,
            },
        })
    }

    pub(super) fn norm(&mut self, prefix: &str, width: usize, bias: bool) -> Result<Norm, ModelError> {
        Ok(Norm {
            weight: self.take(&format!("{prefix}.weight"), &[width])?,
            bias: match bias {
                true => self.take(&format!("{prefix}.bias"), &[width])?,
                false => self.no_bias(width)?,
            },
        })
    }

    /// A LayerNorm from the checkpoint, else a fresh one (weight 1, bias 0, as transformers).
    fn norm_or_init(&mut self, prefix: &str, width: usize, bias: bool) -> Result<Norm, ModelError> {
        if self.tensors.contains_key(&format!("{prefix}.weight")) {
            return self.norm(prefix, width, bias);
        }
        let weight =
            self.register(&format!("{prefix}.weight"), Tensor::ones(width, DType::F32, &Device::Cpu)?)?;
        let bias = match bias {
            true => {
                self.register(&format!("{prefix}.bias"), Tensor::zeros(width, DType::F32, &Device::Cpu)?)?
            }
            false => self.no_bias(width)?,
        };
        Ok(Norm { weight, bias })
    }

    /// A linear layer from the checkpoint when it has one of the right shape, else a fresh one.
    fn linear_or_init(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        init: &mut Init,
    ) -> Result<Linear, ModelError> {
        let (w, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let fits = self.tensors.get(&w).is_some_and(|t| t.dims() == [out, inp])
            && (!bias || self.tensors.get(&b).is_some_and(|t| t.dims() == [out]));
        if fits {
            return self.linear(prefix, out, inp, bias);
        }
        if !(init.std.is_finite() && init.std >= 0.0) {
            return Err(ModelError::Unsupported {
                path: self.path.into(),
                message: format!("initializer_range {} must be a finite number >= 0", init.std),
            });
        }
        let weights: Vec<f32> =
            (0..out * inp).map(|_| (crate::rng::standard_normal(&mut init.rng) * init.std) as f32).collect();
        let weight = self.register(&w, Tensor::from_vec(weights, (out, inp), &Device::Cpu)?)?;
        let bias = match bias {
            true => self.register(&b, Tensor::zeros(out, DType::F32, &Device::Cpu)?)?,
            false => self.no_bias(out)?,
        };
        Ok(Linear { weight, bias })
    }
}
