//! Decoder language models of the Llama architecture, as transformers' `LlamaForCausalLM`,
//! `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (SmolLM2 is a Llama): pre-norm layers with RMSNorm,
//! rotary positions, causal grouped-query attention, a SwiGLU feed-forward block, a final norm and
//! an output layer over the vocabulary (the input embeddings themselves when tied). The three
//! differ only in data (see [`Variant`]).
//!
//! Training runs on the same packed layout as the encoders: the tokens of a batch's rows one
//! after another, attention kept within each row and causal. The loss never holds more than a
//! block of the vocabulary's logits at once ([`ops::lm_cross_entropy`]). Generation keeps each
//! layer's keys and values ([`KvCache`]) and computes one new token at a time with the same bits
//! as a full pass over the sequence, for one sequence or many packed into each product.

mod config;
mod gguf;
mod load;

pub use config::{DecoderConfig, TokenIds, Variant};
pub use gguf::{GgufFile, gguf_config};

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng as _;

use super::encoder::{Linear, Mode, cast, compute_in};
use crate::device::Precision;
use crate::ops::{self, Activation, AttentionShape};

/// An RMSNorm's weight.
#[derive(Clone)]
pub(super) struct RmsNorm {
    pub weight: Tensor,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        ops::rms_norm(x, &cast(&self.weight, x.dtype())?, eps)
    }
}

/// One decoder layer (`LlamaDecoderLayer` and its Qwen kin).
#[derive(Clone)]
pub(super) struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    /// Qwen3's per-head norms of the queries and keys.
    pub qk_norms: Option<(RmsNorm, RmsNorm)>,
    pub output: Linear,
    pub post_attention_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A `...ForCausalLM`: parameters (as candle `Var`s, named as in transformers) and its passes.
pub struct CausalLm {
    pub(super) config: DecoderConfig,
    pub(super) params: Vec<(String, Var)>,
    pub(super) embed: Tensor,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    /// The output layer's weight `(vocab, hidden)`: the embeddings when tied.
    pub(super) lm_head: Tensor,
    /// Dropout on attention probabilities in training (`attention_dropout`).
    pub(super) attention_dropout: f64,
    /// The dtype of activations (see `Classifier::set_precision`).
    pub(super) compute: DType,
    pub(super) products: ops::Products,
}

/// The keys and values of one sequence so far, per layer: `(tokens, 2 * kv_width)`, each token's
/// keys (rotated) and values side by side, as attention reads them.
pub struct KvCache {
    layers: Vec<Option<Tensor>>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CausalLm {
    /// Every trainable parameter with its Hugging Face name, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The architecture config.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Total number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Replaces the training dropout on attention probabilities.
    pub fn set_attention_dropout(&mut self, p: f64) {
        self.attention_dropout = p;
    }

    /// Computes in `precision` from now on (see `Classifier::set_precision`).
    pub fn set_precision(&mut self, precision: Precision) {
        (self.compute, self.products) = compute_in(precision, self.device(), self.dtype());
    }

    fn attention_shape(&self) -> AttentionShape {
        let c = &self.config;
        AttentionShape { heads: c.num_attention_heads, kv_heads: c.kv_heads(), causal: true, window: None }
    }

    /// The final hidden states `(tokens, hidden)` of `rows` packed one after another (each row's
    /// positions from 0).
    pub fn hidden(&self, rows: &[&[u32]], mode: Mode<'_>) -> Result<Tensor> {
        self.norm.forward(&self.layers_out(rows, mode)?, self.config.rms_norm_eps)
    }

    /// The last layer's output for `rows` packed one after another, before the final norm.
    fn layers_out(&self, rows: &[&[u32]], mut mode: Mode<'_>) -> Result<Tensor> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(rows.len());
        for row in rows {
            if row.is_empty() {
                candle_core::bail!("an empty row: every row needs at least one token");
            }
            if row.len() > c.max_position_embeddings {
                candle_core::bail!(
                    "a row of {} tokens exceeds the model's longest input, {} (max_position_embeddings)",
                    row.len(),
                    c.max_position_embeddings
                );
            }
            if let Some(&bad) = row.iter().find(|&&id| id as usize >= c.vocab_size) {
                candle_core::bail!("token id {bad} is outside the vocabulary ({} ids)", c.vocab_size);
            }
            segments.push((ids.len(), row.len()));
            ids.extend_from_slice(row);
            positions.extend(0..row.len() as u32);
        }
        let x = cast(&ops::embedding(&self.embed, Arc::new(ids))?, self.compute)?;
        let (cos, sin) = ops::rotary_tables(&positions, c.head_dim(), c.rope_base(), x.dtype(), x.device())?;
        let segments = Arc::new(segments);
        let mut x = x;
        for layer in &self.layers {
            x = self.layer(layer, &x, &cos, &sin, Attend::Rows(&segments), &mut mode)?.0;
        }
        Ok(x)
    }

    /// Logits `(tokens, vocab)` of `rows` packed one after another, in the parameters' dtype.
    pub fn logits(&self, rows: &[&[u32]], mode: Mode<'_>) -> Result<Tensor> {
        let hidden = self.hidden(rows, mode)?;
        self.output(&hidden)
    }

    fn output(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = cast(&self.lm_head, hidden.dtype())?;
        let zero = Tensor::zeros(head.dim(0)?, hidden.dtype(), hidden.device())?;
        cast(&ops::linear(hidden, &head, &zero, self.products)?, self.dtype())
    }

    /// The mean next-token cross-entropy of `rows` over the tokens that count: in row `r`, the
    /// predictions of tokens `loss_from[r]..` (each from the tokens before it; position 0 is never
    /// predicted). Returns the loss and the number of predicted tokens (`NaN` loss when none).
    pub fn loss(&self, rows: &[&[u32]], loss_from: &[usize], mode: Mode<'_>) -> Result<(Tensor, usize)> {
        if rows.len() != loss_from.len() {
            candle_core::bail!("{} rows but {} loss starts", rows.len(), loss_from.len());
        }
        let labels = next_token_labels(rows, loss_from);
        // Only the tokens whose next token counts go through the final norm and the output layer
        // (a 49,152-word vocabulary is a fifth of SmolLM2's products per token): in supervised
        // fine-tuning that is the answer, a few tokens a row. The others would add exact zeros
        // to the loss and to both gradients.
        let (kept, labels): (Vec<u32>, Vec<u32>) =
            (0..labels.len() as u32).zip(labels).filter(|&(_, label)| label != ops::IGNORE).unzip();
        let counted = kept.len();
        if counted == 0 {
            let nan = Tensor::new(f32::NAN, self.device())?.to_dtype(self.dtype())?;
            return Ok((nan, 0));
        }
        let x = ops::embedding(&self.layers_out(rows, mode)?, Arc::new(kept))?;
        let hidden = self.norm.forward(&x, self.config.rms_norm_eps)?;
        let head = cast(&self.lm_head, hidden.dtype())?;
        let loss = ops::lm_cross_entropy(&hidden, &head, &labels, self.products)?;
        Ok((cast(&loss, self.dtype())?, counted))
    }

    /// An empty key/value cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![None; self.layers.len()], len: 0 }
    }

    /// Runs `tokens` after those already in `cache` (one sequence), adding their keys and values
    /// to it, and returns the logits `(vocab,)` of the last one: the bits of [`Self::logits`] over
    /// the whole sequence at that position. CPU only (inference).
    pub fn extend(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Tensor> {
        self.extend_many(std::slice::from_mut(cache), &[tokens])?.squeeze(0)
    }

    /// [`Self::extend`] for several sequences at once: `tokens[i]` after `caches[i]`, their rows
    /// packed into each product (so a step of many sequences reads the weights once). Returns the
    /// logits `(sequences, vocab)` of each one's last new token, each row the bits that
    /// [`Self::extend`] gives that sequence alone (a product computes each row in one order,
    /// however many rows it has).
    pub fn extend_many(&self, caches: &mut [KvCache], tokens: &[&[u32]]) -> Result<Tensor> {
        let c = &self.config;
        if tokens.is_empty() {
            candle_core::bail!("no sequences to run");
        }
        if caches.len() != tokens.len() {
            candle_core::bail!("{} caches for {} sequences", caches.len(), tokens.len());
        }
        let (mut ids, mut positions, mut last) = (Vec::new(), Vec::new(), Vec::with_capacity(tokens.len()));
        for (cache, new) in caches.iter().zip(tokens) {
            if new.is_empty() {
                candle_core::bail!("no tokens to run");
            }
            let end = cache.len + new.len();
            if end > c.max_position_embeddings {
                candle_core::bail!(
                    "the sequence reaches {end} tokens, more than the model's longest input ({})",
                    c.max_position_embeddings
                );
            }
            if let Some(&bad) = new.iter().find(|&&id| id as usize >= c.vocab_size) {
                candle_core::bail!("token id {bad} is outside the vocabulary ({} ids)", c.vocab_size);
            }
            ids.extend_from_slice(new);
            positions.extend(cache.len as u32..end as u32);
            last.push(ids.len() as u32 - 1);
        }
        let mut x = cast(&ops::embedding(&self.embed, Arc::new(ids))?, self.compute)?;
        let (cos, sin) = ops::rotary_tables(&positions, c.head_dim(), c.rope_base(), x.dtype(), x.device())?;
        let mut mode = Mode::Infer;
        for (l, layer) in self.layers.iter().enumerate() {
            let sequences: Vec<(Option<&Tensor>, usize)> =
                caches.iter().zip(tokens).map(|(cache, new)| (cache.layers[l].as_ref(), new.len())).collect();
            let (out, kvs) = self.layer(layer, &x, &cos, &sin, Attend::Cached(&sequences), &mut mode)?;
            for (cache, kv) in caches.iter_mut().zip(kvs) {
                cache.layers[l] = Some(kv);
            }
            x = out;
        }
        for (cache, new) in caches.iter_mut().zip(tokens) {
            cache.len += new.len();
        }
        let last = ops::embedding(&x, Arc::new(last))?;
        self.output(&self.norm.forward(&last, c.rms_norm_eps)?)
    }

    /// One layer over `x` `(tokens, hidden)`. Returns its output and, with caches, each
    /// sequence's keys and values so far, side by side.
    fn layer(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend<'_>,
        mode: &mut Mode<'_>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let (eps, products) = (c.rms_norm_eps, self.products);
        let (heads, kv_heads, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let tokens = x.dim(0)?;
        let normed = layer.input_norm.forward(x, eps)?;
        let qkv = Linear::side_by_side(&[&layer.query, &layer.key, &layer.value], &normed, products)?;
        // Queries and keys rotated, values as they are: `(tokens, q + k + v)`.
        let qkv = match &layer.qk_norms {
            None => ops::rope(&qkv, cos, sin, heads + kv_heads)?,
            Some((q_norm, k_norm)) => {
                let per_head = |t: &Tensor, norm: &RmsNorm, n: usize| {
                    let t = norm.forward(&t.contiguous()?.reshape((tokens * n, d))?, eps)?;
                    ops::rope(&t.reshape((tokens, n * d))?, cos, sin, n)
                };
                let q = per_head(&qkv.narrow(1, 0, heads * d)?, q_norm, heads)?;
                let k = per_head(&qkv.narrow(1, heads * d, kv_heads * d)?, k_norm, kv_heads)?;
                Tensor::cat(&[&q, &k, &qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d)?], 1)?
            }
        };
        let (context, kv) = match attend {
            Attend::Rows(segments) => {
                let p = if matches!(mode, Mode::Train(_)) { self.attention_dropout } else { 0.0 };
                let key = match mode {
                    Mode::Train(rng) if p > 0.0 => rng.random::<u64>(),
                    _ => 0,
                };
                let mut shape = self.attention_shape();
                let qkv = match x.device().is_cpu() || kv_heads == heads {
                    true => qkv,
                    // The GPU's fused attention does not share key/value heads yet: there, each
                    // group's keys and values are repeated for its query heads (transformers'
                    // `repeat_kv`), whose gradients candle sums back into the group's.
                    false => {
                        shape.kv_heads = heads;
                        let group = heads / kv_heads;
                        let (q_width, kv_width) = (heads * d, kv_heads * d);
                        let q = qkv.narrow(1, 0, q_width)?;
                        let (k, v) =
                            (qkv.narrow(1, q_width, kv_width)?, qkv.narrow(1, q_width + kv_width, kv_width)?);
                        let (k, v) =
                            (repeat_heads(&k, kv_heads, group, d)?, repeat_heads(&v, kv_heads, group, d)?);
                        Tensor::cat(&[&q, &k, &v], 1)?
                    }
                };
                let context = ops::attention(&qkv, Arc::clone(segments), shape, p, key, products)?;
                (context, Vec::new())
            }
            Attend::Cached(sequences) => {
                let q = qkv.narrow(1, 0, heads * d)?.contiguous()?;
                let new = qkv.narrow(1, heads * d, 2 * kv_heads * d)?;
                let shape = AttentionShape { causal: false, ..self.attention_shape() };
                let (mut rows, mut kvs, mut start) = (Vec::with_capacity(tokens), Vec::new(), 0);
                for &(cached, n) in sequences {
                    let new = new.narrow(0, start, n)?;
                    let kv = match cached {
                        Some(old) => Tensor::cat(&[old, &new], 0)?,
                        None => new.contiguous()?,
                    };
                    // Each new token sees every key up to its own: a "first token" query over
                    // the sequence's prefix that ends at it (the causal row's bits; see
                    // `ops::first_token_attention`).
                    let len = kv.dim(0)?;
                    for t in 0..n {
                        let seen = len - n + t + 1;
                        rows.push(ops::first_token_attention(
                            &q.narrow(0, start + t, 1)?,
                            &kv.narrow(0, 0, seen)?,
                            Arc::new(vec![(0, seen)]),
                            shape,
                            products,
                        )?);
                    }
                    kvs.push(kv);
                    start += n;
                }
                (Tensor::cat(&rows, 0)?, kvs)
            }
        };
        let x = ops::tape::add(x, &layer.output.forward(&context, products)?)?;
        let normed = layer.post_attention_norm.forward(&x, eps)?;
        let gate_up = Linear::side_by_side(&[&layer.gate, &layer.up], &normed, products)?;
        let gated = ops::gated(&gate_up, Activation::Silu)?;
        let x = ops::tape::add(&x, &layer.down.forward(&gated, products)?)?;
        Ok((x, kv))
    }
}

/// `t` `(tokens, kv_heads * d)` with each head repeated `group` times in place:
/// `(tokens, kv_heads * group * d)`.
fn repeat_heads(t: &Tensor, kv_heads: usize, group: usize, d: usize) -> Result<Tensor> {
    let tokens = t.dim(0)?;
    t.reshape((tokens, kv_heads, 1, d))?
        .broadcast_as((tokens, kv_heads, group, d))?
        .contiguous()?
        .reshape((tokens, kv_heads * group * d))
}

/// What a layer's queries attend to.
enum Attend<'a> {
    /// Their own rows, causally (training, evaluation, a full pass).
    Rows(&'a Arc<Vec<(usize, usize)>>),
    /// Cached sequences' keys and values (none yet for a new one), which their new tokens extend
    /// (generation): each sequence's cache and its number of new tokens, which lie in that order.
    Cached(&'a [(Option<&'a Tensor>, usize)]),
}

/// How many tokens of a row of `len` tokens the loss predicts when it counts from position
/// `loss_from`: every token from there on but the row's first, which nothing precedes.
pub fn predicted_tokens(len: usize, loss_from: usize) -> usize {
    len.saturating_sub(loss_from.max(1))
}

/// The label of each packed token: the next token of its row where that one counts (row `r`'s
/// tokens from `loss_from[r]` on, never position 0), else [`ops::IGNORE`].
fn next_token_labels(rows: &[&[u32]], loss_from: &[usize]) -> Vec<u32> {
    let mut labels = Vec::with_capacity(rows.iter().map(|r| r.len()).sum());
    for (row, &from) in rows.iter().zip(loss_from) {
        for t in 0..row.len() {
            let next = t + 1;
            labels.push(if next < row.len() && next >= from.max(1) { row[next] } else { ops::IGNORE });
        }
    }
    labels
}
