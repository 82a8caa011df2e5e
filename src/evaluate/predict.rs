//! Batched inference: class probabilities for tokenized rows.

use candle_core::Result;

use super::ClassificationReport;
use crate::model::{Batch, Classifier, Mode};

/// A model's predictions on labelled rows, scored.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Class probabilities per row, in row order.
    pub probabilities: Vec<Vec<f32>>,
    /// The most probable class per row.
    pub predicted: Vec<u32>,
    /// Metrics against the true labels, the mean log loss included.
    pub report: ClassificationReport,
}

/// Predicts `rows` in batches of `batch_size` and scores them against `labels` (class indices).
///
/// The one computation behind the evaluate stage, the train stage's evaluations and `pipe
/// predict`'s accuracy, so that all three give the same numbers for the same weights and rows.
pub fn score(model: &Classifier, rows: &[Vec<u32>], labels: &[u32], batch_size: usize) -> Result<Scored> {
    let probabilities = predict_probabilities(model, rows, batch_size)?;
    Ok(Scored::new(probabilities, labels, model.labels()))
}

impl Scored {
    /// Scores `probabilities` (one row per label, from [`predict_probabilities`]) against
    /// `labels`, with `classes` the class names.
    pub fn new(probabilities: Vec<Vec<f32>>, labels: &[u32], classes: &[String]) -> Self {
        let predicted = argmax(&probabilities);
        let loss = mean_log_loss(&probabilities, labels);
        let report = ClassificationReport::from_predictions(labels, &predicted, classes, Some(loss));
        Scored { probabilities, predicted, report }
    }
}

/// Class probabilities (softmax of the logits) for every row, in row order.
///
/// Rows are batched in order of length so that batches pad little; each row's result does not
/// depend on the order given, only on `batch_size`, so evaluation and `pipe predict` agree.
pub fn predict_probabilities(
    model: &Classifier,
    rows: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| (rows[r].len(), r));
    let mut out = vec![Vec::new(); rows.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let ids: Vec<&[u32]> = chunk.iter().map(|&r| rows[r].as_slice()).collect();
        // Built on the CPU: the model reads it back to pack the real tokens, then indexes on its device.
        let batch = Batch::pad(&ids, model.pad_id(), model.dtype(), &candle_core::Device::Cpu)?;
        let logits =
            model.forward(&batch, Mode::Infer)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        for (&r, row) in chunk.iter().zip(logits) {
            out[r] = crate::ops::math::softmax(&row);
        }
    }
    Ok(out)
}

/// The most probable class of each row (the first on ties, as `argmax`).
pub fn argmax(probabilities: &[Vec<f32>]) -> Vec<u32> {
    probabilities
        .iter()
        .map(|p| {
            p.iter().enumerate().fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
                as u32
        })
        .collect()
}

/// Mean cross-entropy of the true classes under `probabilities`.
pub fn mean_log_loss(probabilities: &[Vec<f32>], labels: &[u32]) -> f64 {
    let total: f64 = probabilities
        .iter()
        .zip(labels)
        .map(|(p, &l)| -crate::ops::math::ln_f64(f64::from(p[l as usize]).max(1e-45)))
        .sum();
    total / labels.len().max(1) as f64
}
