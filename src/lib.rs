//! pipe: fine-tune transformer language models from declarative TOML pipelines.
//!
//! The library is laid out by phase:
//!
//! - [`data`]: CSV datasets and tokenization into ragged token ids.
//! - [`evaluate`]: accuracy, per-class precision/recall/F1 and the confusion matrix, as
//!   scikit-learn computes them.
//! - [`model`]: a training-grade BERT (encoder, pooler, classification head) on candle, loading and
//!   saving Hugging Face checkpoints.
//! - [`ops`]: fused kernels with forward *and* backward (layer norm, masked softmax, GELU, loss),
//!   because candle's fast versions cut the gradient.
//! - [`optim`]: the fused AdamW, schedules, clipping.
//! - [`train`]: batching, the training loop, evaluations during training, early stopping and the
//!   training curves.
//! - [`predict`]: a recorded run's model on new texts (`pipe predict`).
//! - [`rng`]: the one seeded source of randomness (candle's CPU RNG cannot be seeded).

pub mod config;
pub mod data;
pub mod digest;
pub mod engine;
pub mod evaluate;
pub mod interrupt;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod predict;
pub mod records;
pub mod reproduce;
pub mod rng;
pub mod runtime;
pub mod stages;
pub mod store;
pub mod train;
