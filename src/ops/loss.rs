//! Cross-entropy loss over class logits.

use candle_core::{D, Result, Tensor};

/// Mean cross-entropy of `logits` `(rows, classes)` against class indices `labels`, as
/// `torch.nn.functional.cross_entropy`. With `class_weights`, each row counts with its class's
/// weight and the mean is divided by the sum of those weights (torch's `weight=` semantics).
///
/// Built from candle ops that all have a backward; the row maximum is a constant shift and is
/// detached.
pub fn cross_entropy(logits: &Tensor, labels: &[u32], class_weights: Option<&[f64]>) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if labels.len() != rows {
        candle_core::bail!("cross_entropy: {} labels for {rows} rows", labels.len());
    }
    let mut picks = vec![0f64; rows * classes];
    let mut total_weight = 0f64;
    for (row, &label) in labels.iter().enumerate() {
        let label = label as usize;
        if label >= classes {
            candle_core::bail!("cross_entropy: label {label} out of range for {classes} classes");
        }
        let w = class_weights.map_or(1.0, |w| w[label]);
        picks[row * classes + label] = w;
        total_weight += w;
    }
    let picks = Tensor::from_vec(picks, (rows, classes), logits.device())?.to_dtype(logits.dtype())?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum_exp)?;
    (log_probs * picks)?.sum_all()?.affine(-1.0 / total_weight, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn uniform_logits_give_log_classes() -> Result<()> {
        let logits = Tensor::zeros((4, 3), candle_core::DType::F64, &candle_core::Device::Cpu)?;
        let loss = cross_entropy(&logits, &[0, 1, 2, 0], None)?.to_scalar::<f64>()?;
        assert!((loss - 3f64.ln()).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = input(&[4, 3], 5);
        check_grad(&x, |x| cross_entropy(x, &[2, 0, 1, 1], Some(&[1.0, 2.0, 0.5])).unwrap());
    }
}
