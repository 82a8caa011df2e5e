//! The classifier shared by every family (see `family` for what differs): embeddings, the encoder
//! (BERT's post-norm layers here, ModernBERT's pre-norm ones in `modernbert`), and a head on the
//! first token (or on each row's mean).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng as _;

use super::EncoderConfig;
use super::family::Family;
use super::modernbert::{self, ModernLayer, Rotary};
use crate::device::Precision;
use crate::ops::{self, Activation};
use crate::rng::Rng;

/// Dropout probabilities used in training (evaluation never drops).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// After embeddings, attention output and feed-forward output (`hidden_dropout_prob`).
    pub hidden: f64,
    /// On attention probabilities (`attention_probs_dropout_prob`).
    pub attention: f64,
    /// Before the classifier (`classifier_dropout`, else `hidden_dropout_prob`).
    pub classifier: f64,
}

impl Dropout {
    /// The probabilities a config declares.
    pub fn from_config(c: &EncoderConfig) -> Self {
        Self {
            hidden: c.hidden_dropout_prob,
            attention: c.attention_probs_dropout_prob,
            classifier: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
        }
    }
}

/// Whether a forward pass trains (dropout on, masks from the given generator), evaluates (no
/// dropout, still differentiable) or only predicts.
pub enum Mode<'a> {
    Eval,
    /// [`Mode::Eval`] for predictions only: the result has no usable gradient, and on the CPU the
    /// last layer computes just the rows the head reads (the same bits).
    Infer,
    Train(&'a mut Rng),
}

/// One padded batch of token ids ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(rows, len)` u32 token ids, right-padded.
    pub input_ids: Tensor,
    /// `(rows, len)` 1 for real tokens, 0 for padding, in the model's dtype.
    pub attention_mask: Tensor,
    /// `(rows, len)` u32 segment ids.
    pub token_type_ids: Tensor,
    /// Real (non-pad) tokens in the batch.
    pub real_tokens: usize,
}

impl Batch {
    /// Pads `rows` of token ids to the longest one with `pad_id`.
    pub fn pad(rows: &[&[u32]], pad_id: u32, dtype: DType, device: &Device) -> Result<Self> {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; rows.len() * len];
        let mut mask = vec![0f32; rows.len() * len];
        for (i, row) in rows.iter().enumerate() {
            ids[i * len..i * len + row.len()].copy_from_slice(row);
            mask[i * len..i * len + row.len()].fill(1.0);
        }
        let shape = (rows.len(), len);
        Ok(Self {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)?,
            token_type_ids: Tensor::zeros(shape, DType::U32, device)?,
            real_tokens: rows.iter().map(|r| r.len()).sum(),
        })
    }
}

/// The real tokens of a batch, row after row: what the model computes on.
struct Packed {
    ids: Vec<u32>,
    types: Vec<u32>,
    /// Each token's position id (as the family computes it from the padded layout).
    positions: Vec<u32>,
    /// Each row's `(start, len)` in the packed order.
    segments: Vec<(usize, usize)>,
    /// Each row's `[CLS]` (column 0) in the packed order.
    cls: Vec<u32>,
}

impl Packed {
    /// The real tokens of `batch`, with `family`'s position ids (`pad` the padding id).
    fn new(batch: &Batch, family: Family, pad: u32) -> Result<Self> {
        let ids = batch.input_ids.to_vec2::<u32>()?;
        let types = batch.token_type_ids.to_vec2::<u32>()?;
        let mask = batch.attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut packed = Self {
            ids: Vec::new(),
            types: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
            cls: Vec::new(),
        };
        for (row, keep) in mask.iter().enumerate() {
            if keep.first().is_none_or(|&m| m == 0.0) {
                // The head reads column 0: it must be a real token (right padding).
                candle_core::bail!("row {row}: the first token is padding; batches must be right-padded");
            }
            let positions = family.positions(&ids[row], pad);
            let start = packed.ids.len();
            packed.cls.push(start as u32);
            for (col, &m) in keep.iter().enumerate() {
                if m != 0.0 {
                    packed.ids.push(ids[row][col]);
                    packed.types.push(types[row][col]);
                    packed.positions.push(positions[col]);
                }
            }
            packed.segments.push((start, packed.ids.len() - start));
        }
        Ok(packed)
    }
}

/// A dense layer `x W^T + b` with torch's weight layout `(out, in)`.
#[derive(Clone)]
pub(super) struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// `x W^T + b` in `x`'s dtype (the parameters are cast to it for mixed precision).
    pub(super) fn forward(&self, x: &Tensor, products: ops::Products) -> Result<Tensor> {
        ops::linear(x, &cast(&self.weight, x.dtype())?, &cast(&self.bias, x.dtype())?, products)
    }

    /// `forward(activation(z))`, keeping only `z` for the backward.
    fn activated(&self, z: &Tensor, activation: Activation, products: ops::Products) -> Result<Tensor> {
        let (weight, bias) = (cast(&self.weight, z.dtype())?, cast(&self.bias, z.dtype())?);
        ops::activated_linear(z, activation, &weight, &bias, products)
    }

    /// Several layers on one input as one product, their outputs side by side (each element is
    /// computed as by its own layer; the input's gradient comes from one product, and reaches
    /// the graph as one edge).
    pub(super) fn side_by_side(layers: &[&Self], x: &Tensor, products: ops::Products) -> Result<Tensor> {
        let stack = |part: fn(&Self) -> &Tensor| {
            let parts = layers.iter().map(|l| cast(part(l), x.dtype())).collect::<Result<Vec<_>>>()?;
            ops::tape::cat(&parts, 0)
        };
        ops::linear(x, &stack(|l| &l.weight)?, &stack(|l| &l.bias)?, products)
    }
}

impl Norm {
    pub(super) fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        ops::layer_norm(x, &cast(&self.weight, x.dtype())?, &cast(&self.bias, x.dtype())?, eps)
    }

    /// `forward(dropout(h) + x)`, a block's residual connection as one op; dropout with
    /// probability `p` in training only, its mask key drawn from the generator here (where the
    /// separate dropout drew it).
    fn residual(&self, h: &Tensor, x: &Tensor, eps: f64, p: f64, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (p, key) = match mode {
            Mode::Train(rng) if p > 0.0 => (p, rng.random::<u64>()),
            _ => (0.0, 0),
        };
        let (weight, bias) = (cast(&self.weight, x.dtype())?, cast(&self.bias, x.dtype())?);
        ops::residual_layer_norm(h, x, &weight, &bias, eps, p, key)
    }
}

/// The activations' dtype and the CPU products' operands of a model whose parameters are `dtype`
/// on `device`, computing in `precision` (see [`Classifier::set_precision`]).
pub(super) fn compute_in(precision: Precision, device: &Device, dtype: DType) -> (DType, ops::Products) {
    let bf16 = precision == Precision::Bf16;
    match (device.is_cpu(), bf16) {
        (true, true) => (dtype, ops::Products::Bf16),
        (false, true) => (DType::BF16, ops::Products::Full),
        (_, false) => (dtype, ops::Products::Full),
    }
}

/// `t` in `dtype`: itself when it already is, else a differentiable cast (its gradient comes back
/// in `t`'s dtype, so f32 master weights get f32 gradients).
pub(super) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype { Ok(t.clone()) } else { t.to_dtype(dtype) }
}

#[derive(Clone)]
pub(super) struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
}

#[derive(Clone)]
pub(super) struct Embeddings {
    pub word: Tensor,
    /// None where positions rotate instead (ModernBERT).
    pub position: Option<Tensor>,
    /// None in a family without token types.
    pub token_type: Option<Tensor>,
    pub norm: Norm,
    /// From the embedding width to the hidden size, where they differ (ELECTRA).
    pub projection: Option<Linear>,
}

/// The classification head's layers (see `Family::head_dropout_first` and
/// `EncoderConfig::head_activation` for how it runs).
#[derive(Clone)]
pub(super) struct HeadLayers {
    pub dense: Linear,
    /// After the activation (ModernBERT).
    pub norm: Option<Norm>,
    pub out: Linear,
}

/// The layers between the embeddings and the head.
pub(super) enum Encoder {
    /// BERT's post-norm layers (BERT, DistilBERT, RoBERTa, XLM-RoBERTa, ELECTRA).
    PostNorm(Vec<Layer>),
    /// ModernBERT's pre-norm layers and final norm.
    PreNorm { layers: Vec<ModernLayer>, final_norm: Norm },
}

#[derive(Clone)]
pub(super) struct Layer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_out: Linear,
    pub attention_norm: Norm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: Norm,
}

/// A family's `...ForSequenceClassification`: parameters (as candle `Var`s, named as in
/// transformers) and the forward pass.
pub struct Classifier {
    pub(super) config: EncoderConfig,
    pub(super) labels: Vec<String>,
    pub(super) params: Vec<(String, Var)>,
    pub(super) embeddings: Embeddings,
    pub(super) encoder: Encoder,
    pub(super) head: HeadLayers,
    pub(super) activation: Activation,
    pub(super) dropout: Dropout,
    /// The dtype of activations and matrix products: the parameters' own, or bf16 for mixed
    /// precision on a GPU (parameters stay f32 and are cast as they are used).
    pub(super) compute: DType,
    /// The operand precision of the CPU's matrix products: bf16 for mixed precision on the CPU,
    /// whose activations stay f32.
    pub(super) products: ops::Products,
}

impl Classifier {
    /// Every trainable parameter with its Hugging Face name, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The architecture config.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Class names by index.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.embeddings.word.dtype()
    }

    /// Computes in `precision` from now on. bf16 is mixed precision: on a GPU, activations and
    /// products in bf16; on the CPU, products with bf16 operands and f32 accumulation, everything
    /// else f32 (see `ops::gemm`). Parameters, their gradients and the logits stay in the
    /// parameters' dtype.
    pub fn set_precision(&mut self, precision: Precision) {
        (self.compute, self.products) = compute_in(precision, self.device(), self.dtype());
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.embeddings.word.device()
    }

    /// The token id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.config.pad_id()
    }

    /// Training dropout probabilities.
    pub fn dropout(&self) -> Dropout {
        self.dropout
    }

    /// Replaces the training dropout probabilities.
    pub fn set_dropout(&mut self, dropout: Dropout) {
        self.dropout = dropout;
    }

    /// Total number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Class logits `(rows, classes)` for a batch.
    ///
    /// Only real tokens are computed. Padding never influences a real token (attention masks it
    /// out as a key) nor the result (the head reads each row's first token, or the mean of its
    /// real tokens), so the real tokens of all rows are
    /// packed one row after another and padding costs nothing: the reference's pad-to-max_length
    /// batches run as fast as their real length. Every per-token op is unchanged; attention keeps
    /// to each row's segment.
    pub fn forward(&self, batch: &Batch, mut mode: Mode<'_>) -> Result<Tensor> {
        let (rows, len) = batch.input_ids.dims2()?;
        let c = &self.config;
        if len > c.max_length() {
            candle_core::bail!(
                "sequence length {len} exceeds the model's longest input, {} tokens (max_position_embeddings {})",
                c.max_length(),
                c.max_position_embeddings
            );
        }
        // Batches may live anywhere: they are read back to pack them, and the packed indices are
        // host data that the gathers take to the parameters' device.
        let family = c.family;
        let Packed { ids, types, positions, segments, cls } = Packed::new(batch, family, c.pad_id())?;
        let e = &self.embeddings;
        let mut x = ops::embedding(&e.word, Arc::new(ids))?;
        if let Some(token_type) = &e.token_type {
            x = ops::tape::add(&x, &ops::embedding(token_type, Arc::new(types))?)?;
        }
        if let Some(position) = &e.position {
            x = ops::tape::add(&x, &ops::embedding(position, Arc::new(positions.clone()))?)?;
        }
        let x = e.norm.forward(&cast(&x, self.compute)?, c.layer_norm_eps)?;
        let mut x = dropout(&x, self.dropout.hidden, &mut mode)?;
        if let Some(projection) = &e.projection {
            x = projection.forward(&x, self.products)?;
        }
        let segments = Arc::new(segments);
        let cls = Arc::new(cls);
        let pooled = match &self.encoder {
            Encoder::PostNorm(layers) => {
                // In inference on the CPU, the last layer computes only what the head reads: each
                // row's first token (the same bits as computing every token; see
                // `ops::first_token_attention`).
                let first_tokens_only = matches!(mode, Mode::Infer) && self.device().is_cpu();
                let (last, rest) = match layers.split_last() {
                    Some((last, rest)) if first_tokens_only => (Some(last), rest),
                    _ => (None, &layers[..]),
                };
                for layer in rest {
                    x = self.layer_forward(layer, &x, &segments, &mut mode)?;
                }
                match last {
                    Some(layer) => self.last_layer_first_tokens(layer, &x, &segments, &cls)?,
                    None => ops::embedding(&x, cls)?,
                }
            }
            Encoder::PreNorm { layers, final_norm } => {
                let rotary = Rotary::new(c, &positions, &x)?;
                let (activation, rates) = (self.activation, self.dropout);
                let x = modernbert::encode(
                    c,
                    layers,
                    final_norm,
                    x,
                    &rotary,
                    &segments,
                    activation,
                    rates,
                    self.products,
                    &mut mode,
                )?;
                match c.pooling() {
                    "mean" => modernbert::mean_rows(&x, &segments)?,
                    _ => ops::embedding(&x, cls)?,
                }
            }
        };
        let p = self.dropout.classifier;
        let pooled = if family.head_dropout_first() { dropout(&pooled, p, &mut mode)? } else { pooled };
        let mut hidden =
            ops::activation(&self.head.dense.forward(&pooled, self.products)?, c.head_activation())?;
        if let Some(norm) = &self.head.norm {
            hidden = norm.forward(&hidden, c.layer_norm_eps)?;
        }
        let hidden = dropout(&hidden, p, &mut mode)?;
        debug_assert_eq!(hidden.dim(0)?, rows);
        // The loss and predictions read logits in the parameters' dtype (f32 under bf16).
        cast(&self.head.out.forward(&hidden, self.products)?, self.dtype())
    }

    /// BERT-style layers attend with every head over whole rows.
    fn attention_shape(&self) -> ops::AttentionShape {
        ops::AttentionShape::full(self.config.num_attention_heads)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        segments: &Arc<Vec<(usize, usize)>>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let products = self.products;
        let qkv = Linear::side_by_side(&[&layer.query, &layer.key, &layer.value], x, products)?;
        let p = if matches!(mode, Mode::Train(_)) { self.dropout.attention } else { 0.0 };
        let key = match mode {
            Mode::Train(rng) if p > 0.0 => rng.random::<u64>(),
            _ => 0,
        };
        let context = ops::attention(&qkv, Arc::clone(segments), self.attention_shape(), p, key, products)?;
        let (eps, p) = (c.layer_norm_eps, self.dropout.hidden);
        let p_attended = if c.family.attention_output_dropout() { p } else { 0.0 };
        let attended = layer.attention_out.forward(&context, products)?;
        let x = layer.attention_norm.residual(&attended, x, eps, p_attended, mode)?;
        let inner = layer.intermediate.forward(&x, products)?;
        let out = layer.output.activated(&inner, self.activation, products)?;
        layer.output_norm.residual(&out, &x, eps, p, mode)
    }

    /// [`Self::layer_forward`] in inference for the first token of each row only: queries, the
    /// attention output, the feed-forward block and the norms on those rows; keys and values on
    /// every token. Returns `(rows, hidden)`.
    fn last_layer_first_tokens(
        &self,
        layer: &Layer,
        x: &Tensor,
        segments: &Arc<Vec<(usize, usize)>>,
        cls: &Arc<Vec<u32>>,
    ) -> Result<Tensor> {
        let (c, products) = (&self.config, self.products);
        let first = ops::embedding(x, Arc::clone(cls))?;
        let q = layer.query.forward(&first, products)?;
        let kv = Linear::side_by_side(&[&layer.key, &layer.value], x, products)?;
        let context =
            ops::first_token_attention(&q, &kv, Arc::clone(segments), self.attention_shape(), products)?;
        let (eps, mode) = (c.layer_norm_eps, &mut Mode::Infer);
        let attended = layer.attention_out.forward(&context, products)?;
        let x = layer.attention_norm.residual(&attended, &first, eps, 0.0, mode)?;
        let inner = layer.intermediate.forward(&x, products)?;
        let out = layer.output.activated(&inner, self.activation, products)?;
        layer.output_norm.residual(&out, &x, eps, 0.0, mode)
    }
}

/// Dropout in training, identity in evaluation. Each call draws the key of its mask from the
/// training generator, so the same seed and step give the same masks.
pub(super) fn dropout(x: &Tensor, p: f64, mode: &mut Mode<'_>) -> Result<Tensor> {
    match mode {
        Mode::Train(rng) if p > 0.0 => ops::dropout(x, p, rng.random::<u64>()),
        _ => Ok(x.clone()),
    }
}
