//! pipe: fine-tune transformer language models from declarative TOML pipelines.
//!
//! A pipeline file becomes a typed [`config::Pipeline`]; the [`engine`] resolves it into the
//! [`stages`] `tokenize -> train -> evaluate`, keys each by content ([`plan`]), reuses what the
//! content-addressed [`store`] already holds and runs the rest, then writes a run record
//! ([`records`]) that [`reproduce`] can re-execute bit for bit.
//!
//! Pipeline and bookkeeping:
//!
//! - [`config`]: pipeline files, layered (defaults < file < `PIPE_*` < `--set`), with exact error
//!   positions; JSON Schema; hub ids through the Hugging Face cache.
//! - [`plan`]: stage keys (what is hashed and why) and why a stage is dirty.
//! - [`store`]: outputs committed by a manifest written last, verified on reuse, locked per key;
//!   its remote tier (S3 or a shared directory) and [`share`]: pulling stages before they would
//!   run, pushing them after, `pipe push`/`pipe pull` of whole runs.
//! - [`engine`]: plan and run a pipeline; [`stages`]: tokenize, train, evaluate behind one trait.
//! - [`records`], [`reproduce`], [`predict`], [`verify`]: run records, `pipe diff`/`reproduce`/
//!   `predict`, and `pipe verify` (re-hash the whole store, set aside what is corrupt).
//! - [`executor`]: where stages run: here, or as Slurm batch jobs (`pipe run --executor slurm`).
//! - [`gc`]: `pipe gc`, deleting stage outputs no recent run record refers to.
//! - [`mlflow`]: logging runs and sweeps to an MLflow tracking server (`--mlflow URI`).
//! - [`environment`]: the machine and binary facts that run records keep (never part of a key).
//! - [`sweep`]: hyperparameter search (`pipe sweep`): sweep files, grid/random/TPE, median and
//!   ASHA pruning, trials as ordinary runs, sweep records and plots.
//! - [`plot`]: PNG and SVG figures with the same bytes on every machine.
//! - [`fault`]: `PIPE_FAULT`, aborting at named points of the commit protocols (failure tests).
//! - [`digest`]: SHA-256 of files and canonical JSON; [`interrupt`]: Ctrl-C at safe points;
//!   [`runtime`]: process settings (allocator, thread pools) measured to matter for training.
//!
//! Training core:
//!
//! - [`data`]: datasets (CSV, JSON Lines, Parquet), labels, splits, tokenization into ragged token
//!   ids, tokens on disk.
//! - [`model`]: a training-grade BERT (encoder, pooler, classification head) on candle, computing
//!   only real tokens, loading and saving Hugging Face checkpoints.
//! - [`ops`]: fused kernels with forward *and* backward (linear, attention, layer norm, GELU,
//!   dropout, loss), because candle's fast versions cut the gradient.
//! - [`optim`]: the fused AdamW, schedules, clipping.
//! - [`train`]: batching, the training loop, checkpoints, evaluations during training, early
//!   stopping, the training curves and TensorBoard's event file.
//! - [`evaluate`]: metrics as scikit-learn computes them, and batched prediction.
//! - [`rng`]: the one seeded source of randomness (candle's CPU RNG cannot be seeded).

pub mod config;
pub mod data;
pub mod device;
pub mod digest;
pub mod engine;
pub mod environment;
pub mod evaluate;
pub mod executor;
pub mod fault;
pub mod gc;
pub mod interrupt;
pub mod mlflow;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod records;
pub mod reproduce;
pub mod rng;
pub mod runtime;
pub mod share;
pub mod stages;
pub mod store;
pub mod sweep;
pub mod train;
pub mod verify;
