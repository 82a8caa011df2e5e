//! [`Model`]: the model a pipeline trains, whatever its task, as the training loop, checkpoints
//! and the stages see it.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{Batch, CausalLm, Classifier, Mode, ModelError};
use crate::device::Precision;
use crate::ops;

/// A classifier (`model.task = "sequence-classification"`) or a causal LM (`"causal-lm"`).
pub enum Model {
    Classifier(Classifier),
    CausalLm(CausalLm),
}

impl Model {
    /// Every trainable parameter with its Hugging Face name, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Self::Classifier(m) => m.params(),
            Self::CausalLm(m) => m.params(),
        }
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Classifier(m) => m.dtype(),
            Self::CausalLm(m) => m.dtype(),
        }
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Classifier(m) => m.device(),
            Self::CausalLm(m) => m.device(),
        }
    }

    /// Total number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Computes in `precision` from now on.
    pub fn set_precision(&mut self, precision: Precision) {
        match self {
            Self::Classifier(m) => m.set_precision(precision),
            Self::CausalLm(m) => m.set_precision(precision),
        }
    }

    /// Writes the Hugging Face directory of the model.
    pub fn save_pretrained(&self, dir: &Path) -> std::result::Result<(), ModelError> {
        match self {
            Self::Classifier(m) => m.save_pretrained(dir),
            Self::CausalLm(m) => m.save_pretrained(dir),
        }
    }

    /// The classifier, if this is one.
    pub fn as_classifier(&self) -> Option<&Classifier> {
        match self {
            Self::Classifier(m) => Some(m),
            Self::CausalLm(_) => None,
        }
    }

    /// How many items the loss of `rows` averages over: the rows for a classifier, the predicted
    /// tokens for a causal LM (`targets[r]` is row `r`'s first predicted position).
    pub fn loss_items(&self, rows: &[&[u32]], targets: &[u32]) -> usize {
        match self {
            Self::Classifier(_) => rows.len(),
            Self::CausalLm(_) => rows
                .iter()
                .zip(targets)
                .map(|(row, &from)| super::predicted_tokens(row.len(), from as usize))
                .sum(),
        }
    }

    /// The mean loss of `rows`: cross-entropy of each row's class `targets[r]` (weighted by
    /// `class_weights` when given), or of each predicted token from position `targets[r]` on.
    pub fn loss(
        &self,
        rows: &[&[u32]],
        targets: &[u32],
        class_weights: Option<&[f64]>,
        mode: Mode<'_>,
    ) -> Result<Tensor> {
        match self {
            Self::Classifier(m) => {
                // On the CPU: the model reads it back to pack the real tokens (see `Classifier::forward`).
                let batch = Batch::pad(rows, m.pad_id(), m.dtype(), &Device::Cpu)?;
                ops::cross_entropy(&m.forward(&batch, mode)?, targets, class_weights)
            }
            Self::CausalLm(m) => {
                let from: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
                Ok(m.loss(rows, &from, mode)?.0)
            }
        }
    }
}
