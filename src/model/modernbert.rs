//! ModernBERT's encoder (`ModernBertModel`): pre-norm layers with rotary positions, a GeGLU
//! feed-forward block, local (windowed) and global attention, and a final LayerNorm; no biases
//! unless the config asks for them. It runs on the same ops as the BERT-style layer: the fused
//! attention (with its window), [`ops::rope`], the linear and LayerNorm ops (a bias-free layer
//! is given a constant zero bias, which adds exactly nothing).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use rand::Rng as _;

use super::EncoderConfig;
use super::encoder::{Dropout, Linear, Mode, Norm, cast, dropout};
use crate::ops::{self, Activation};

/// The name of the final norm, after the last layer.
pub(super) const FINAL_NORM: &str = "model.final_norm";
/// The name of the head's LayerNorm (after its dense layer and activation).
pub(super) const HEAD_NORM: &str = "head.norm";

/// One `ModernBertEncoderLayer`.
#[derive(Clone)]
pub(super) struct ModernLayer {
    /// Before attention; none in the first layer (its input is the normalised embeddings).
    pub attention_norm: Option<Norm>,
    /// Queries, keys and values as one product (`Wqkv`).
    pub qkv: Linear,
    pub attention_out: Linear,
    pub mlp_norm: Norm,
    /// The GeGLU's input and gate side by side (`Wi`, `2 * intermediate` outputs).
    pub mlp_in: Linear,
    pub mlp_out: Linear,
    /// Local layers: the most positions a key may be from its query.
    pub window: Option<usize>,
}

/// The rotary tables of a batch for the global and the local layers.
pub(super) struct Rotary {
    global: (Tensor, Tensor),
    local: (Tensor, Tensor),
}

impl Rotary {
    /// Tables for the packed tokens' `positions`, in `x`'s dtype and on its device.
    pub fn new(c: &EncoderConfig, positions: &[u32], x: &Tensor) -> Result<Self> {
        let table =
            |local| ops::rotary_tables(positions, c.head_dim(), c.rope_theta(local), x.dtype(), x.device());
        Ok(Self { global: table(false)?, local: table(true)? })
    }
}

/// The encoder's layers and final norm over the embeddings `x` (packed tokens, rows `segments`).
#[allow(clippy::too_many_arguments)]
pub(super) fn encode(
    c: &EncoderConfig,
    layers: &[ModernLayer],
    final_norm: &Norm,
    x: Tensor,
    rotary: &Rotary,
    segments: &Arc<Vec<(usize, usize)>>,
    activation: Activation,
    rates: Dropout,
    products: ops::Products,
    mode: &mut Mode<'_>,
) -> Result<Tensor> {
    let (eps, heads) = (c.layer_norm_eps, c.num_attention_heads);
    // ModernBERT drops out attention probabilities and the attention output at one rate, and the
    // GeGLU's output at another.
    let (p_attention, p_mlp) = (rates.attention, rates.hidden);
    let training = matches!(mode, Mode::Train(_));
    let mut x = x;
    for layer in layers {
        let normed = match &layer.attention_norm {
            Some(norm) => norm.forward(&x, eps)?,
            None => x.clone(),
        };
        let qkv = layer.qkv.forward(&normed, products)?;
        let (cos, sin) = if layer.window.is_some() { &rotary.local } else { &rotary.global };
        // Queries and keys rotated, values as they are.
        let qkv = ops::rope(&qkv, cos, sin, 2 * heads)?;
        let p = if training { p_attention } else { 0.0 };
        let key = match mode {
            Mode::Train(rng) if p > 0.0 => rng.random::<u64>(),
            _ => 0,
        };
        let shape = ops::AttentionShape { window: layer.window, ..ops::AttentionShape::full(heads) };
        let context = ops::attention(&qkv, Arc::clone(segments), shape, p, key, products)?;
        let attended = dropout(&layer.attention_out.forward(&context, products)?, p_attention, mode)?;
        x = ops::tape::add(&x, &attended)?;
        let z = layer.mlp_in.forward(&layer.mlp_norm.forward(&x, eps)?, products)?;
        let gated = ops::gated(&z, activation)?;
        let gated = dropout(&gated, p_mlp, mode)?;
        x = ops::tape::add(&x, &layer.mlp_out.forward(&gated, products)?)?;
    }
    final_norm.forward(&x, eps)
}

/// Each row's mean over its tokens, `(rows, hidden)`: one product with a 0/1 row-membership
/// matrix (pipe's GEMM: the same sums on every machine), divided by the row lengths, as
/// transformers' `sum / count`.
pub(super) fn mean_rows(x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    let (tokens, hidden) = x.dims2()?;
    let mut members = vec![0f32; segments.len() * tokens];
    for (row, &(start, len)) in segments.iter().enumerate() {
        members[row * tokens + start..row * tokens + start + len].fill(1.0);
    }
    let device = x.device();
    let members = Tensor::from_vec(members, (segments.len(), tokens), device)?.to_dtype(x.dtype())?;
    let zero = Tensor::zeros(hidden, x.dtype(), device)?;
    let sums = ops::linear(&members, &x.t()?.contiguous()?, &zero, ops::Products::Full)?;
    let counts: Vec<f32> = segments.iter().map(|&(_, len)| len as f32).collect();
    let counts = Tensor::from_vec(counts, (segments.len(), 1), device)?;
    sums.broadcast_div(&cast(&counts, x.dtype())?)
}
