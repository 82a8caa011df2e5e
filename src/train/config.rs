//! `[train]`: how the train stage walks the data.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[train]`: epochs, batching and the step loop. Defaults follow the reference recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed (and averaged) before each optimizer step.
    pub grad_accum_steps: usize,
    /// Clip the global gradient L2 norm to this value before each step (`clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Stop after this many optimizer steps, even mid-epoch (the schedule is sized to it).
    pub max_steps: Option<u64>,
    /// Shuffle the training rows every epoch (seeded).
    pub shuffle: bool,
    /// Group rows of similar length into the same batch (less padding, faster); batches are still
    /// visited in a seeded random order.
    pub length_bucketing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 16,
            grad_accum_steps: 1,
            max_grad_norm: None,
            max_steps: None,
            shuffle: true,
            length_bucketing: false,
        }
    }
}
