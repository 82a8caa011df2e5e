//! The language model's loss over its whole vocabulary without keeping its logits.
//!
//! `cross_entropy(hidden W^T, labels)` for an output layer `W` `(vocab, hidden)` would keep a
//! `(tokens, vocab)` tensor of logits between the passes, and the backward another of their
//! gradient: 400 MB each for 2,048 tokens of SmolLM2's 49,152-token vocabulary. This op computes
//! the logits [`ROWS`] tokens at a time, reduces each chunk to its rows' losses, and in the
//! backward computes the chunk's logits again and turns them into its share of both gradients at
//! once. Its bits are those of the two ops composed (pipe's product sums each element in one
//! order, which chunking the rows does not change, see `gemm`; the rows' softmax is the loss op's).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::gemm::{Element, MatMut, MatRef, Products, Start, Threads, product, product_new};
use super::loss::{CrossEntropy, IGNORE};
use super::tape;
use super::{slice, with_real};

/// Tokens whose logits exist at once (a multiple of 8; the bits do not depend on it).
const ROWS: usize = 128;

/// Mean cross-entropy of the logits `hidden W^T` (`hidden` `(tokens, width)`, `weight`
/// `(vocab, width)`, no bias: a language model's output layer, tied to its embeddings or not)
/// against `labels`, rows labelled [`IGNORE`] not counting; the bits of
/// `cross_entropy(&linear(hidden, weight, 0), labels, None)`. On a GPU it runs as those ops.
pub fn lm_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &[u32],
    products: Products,
) -> Result<Tensor> {
    let (tokens, width) = hidden.dims2()?;
    let (vocab, weight_width) = weight.dims2()?;
    if labels.len() != tokens || weight_width != width {
        candle_core::bail!(
            "lm cross-entropy: {} labels, hidden {:?} and weight {:?} do not fit",
            labels.len(),
            hidden.dims(),
            weight.dims()
        );
    }
    if let Some(&bad) = labels.iter().find(|&&l| l != IGNORE && l as usize >= vocab) {
        candle_core::bail!("lm cross-entropy: label {bad} out of range for {vocab} tokens");
    }
    if !hidden.device().is_cpu() {
        let zero = Tensor::zeros(vocab, hidden.dtype(), hidden.device())?;
        return super::cross_entropy(&super::linear(hidden, weight, &zero, products)?, labels, None);
    }
    let counted = labels.iter().filter(|&&l| l != IGNORE).count();
    let op = LmCrossEntropy { labels: Arc::new(labels.to_vec()), counted: counted as f64, products };
    tape::apply2(hidden, weight, op)
}

/// A row's weight and class, as the loss op takes them: an ignored row weighs 0 (and adds 0 times
/// a finite row loss, for class 0).
fn weight_and_class(label: u32) -> (f64, usize) {
    if label == IGNORE { (0.0, 0) } else { (1.0, label as usize) }
}

#[derive(Clone)]
struct LmCrossEntropy {
    labels: Arc<Vec<u32>>,
    /// Rows that count (the mean's divisor).
    counted: f64,
    products: Products,
}

impl LmCrossEntropy {
    /// The logits of rows `start..` (at most [`ROWS`]) of `hidden`, `(rows, vocab)`.
    fn logits<T: Element>(&self, hidden: &[T], weight: &[T], width: usize, start: usize) -> (Vec<T>, usize) {
        let (tokens, vocab) = (hidden.len() / width, weight.len() / width);
        let rows = ROWS.min(tokens - start);
        let h = MatRef::new(hidden, start * width, rows, width, width, 1);
        let w = MatRef::row_major(weight, vocab, width).t();
        (product_new(h, w, Threads::Pool, self.products), rows)
    }
}

impl CustomOp2 for LmCrossEntropy {
    fn name(&self) -> &'static str {
        "lm-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = hl.shape().dims2()?.1;
        with_real!("lm-cross-entropy", hs, T => {
            let hidden = slice::<T>("lm-cross-entropy", hs, hl)?;
            let weight = slice::<T>("lm-cross-entropy", ws, wl)?;
            let vocab = weight.len() / width;
            let mut p = vec![T::zero(); vocab];
            let mut total = T::zero();
            for start in (0..self.labels.len()).step_by(ROWS) {
                let (logits, _) = self.logits(hidden, weight, width, start);
                for (row, &label) in logits.chunks(vocab).zip(&self.labels[start..]) {
                    let (w, label) = weight_and_class(label);
                    let (max, log_sum) = CrossEntropy::softmax(row, &mut p);
                    total += T::from_f64(w) * (log_sum - (row[label] - max));
                }
            }
            let loss = total / T::from_f64(self.counted);
            Ok((T::to_cpu_storage_owned(vec![loss]), Shape::from(())))
        })
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One op returns [d hidden rows..., d weight rows...] stacked as (tokens + vocab, width).
        let tokens = hidden.dim(0)?;
        let packed = hidden.apply_op3_no_bwd(weight, grad, &LmCrossEntropyBackward(self.clone()))?;
        let d_hidden = packed.narrow(0, 0, tokens)?;
        let d_weight = packed.narrow(0, tokens, weight.dim(0)?)?;
        Ok((Some(d_hidden), Some(d_weight)))
    }
}

struct LmCrossEntropyBackward(LmCrossEntropy);

impl CustomOp3 for LmCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "lm-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, width) = hl.shape().dims2()?;
        let op = &self.0;
        with_real!("lm-cross-entropy-backward", hs, T => {
            let hidden = slice::<T>("lm-cross-entropy-backward", hs, hl)?;
            let weight = slice::<T>("lm-cross-entropy-backward", ws, wl)?;
            let g = slice::<T>("lm-cross-entropy-backward", gs, gl)?[0];
            let vocab = weight.len() / width;
            let mut out = vec![T::zero(); (tokens + vocab) * width];
            let (d_hidden, d_weight) = out.split_at_mut(tokens * width);
            let w = MatRef::row_major(weight, vocab, width);
            let mut logits = vec![T::zero(); vocab];
            for start in (0..tokens).step_by(ROWS) {
                // The chunk's logits become their gradient in place, as the loss op's backward.
                let (mut d, rows) = op.logits(hidden, weight, width, start);
                for (row, &label) in d.chunks_mut(vocab).zip(&op.labels[start..]) {
                    let (w, label) = weight_and_class(label);
                    logits.copy_from_slice(row);
                    CrossEntropy::softmax(&logits, row);
                    row[label] -= T::one();
                    let scale = g * T::from_f64(w / op.counted);
                    row.iter_mut().for_each(|v| *v *= scale);
                }
                let d = MatRef::row_major(&d, rows, vocab);
                let h = MatRef::new(hidden, start * width, rows, width, width, 1);
                let d_h = MatMut::new(d_hidden, start * width, rows, width, width);
                product(d_h, Start::Zero, d, w, Threads::Pool, op.products);
                // The weight's gradient sums over the tokens in order, chunk after chunk.
                let d_w = MatMut::row_major(d_weight, vocab, width);
                product(d_w, Start::accumulate(start > 0), d.t(), h, Threads::Pool, op.products);
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((tokens + vocab, width))))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::ops::testing::{check_grad, input};

    /// The fused op gives the bits of the logits and the loss op composed: the loss and both
    /// gradients, with ignored rows and more tokens than one chunk (the last one partial).
    #[test]
    fn equals_the_composed_ops_bit_for_bit() -> Result<()> {
        let tokens = 2 * ROWS + 37;
        let (hidden, weight) =
            (Var::from_tensor(&input(&[tokens, 12], 1))?, Var::from_tensor(&input(&[50, 12], 2))?);
        let labels: Vec<u32> =
            (0..tokens as u32).map(|i| if i % 5 == 3 { IGNORE } else { (i * 7) % 50 }).collect();
        let zero = Tensor::zeros(50, candle_core::DType::F64, &candle_core::Device::Cpu)?;
        let fused = lm_cross_entropy(&hidden, &weight, &labels, Products::Full)?;
        let composed = crate::ops::cross_entropy(
            &crate::ops::linear(&hidden, &weight, &zero, Products::Full)?,
            &labels,
            None,
        )?;
        assert_eq!(fused.to_scalar::<f64>()?.to_bits(), composed.to_scalar::<f64>()?.to_bits());
        let (gf, gc) = (fused.backward()?, composed.backward()?);
        for (name, v) in [("hidden", &hidden), ("weight", &weight)] {
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(gf.get(v).unwrap()), bits(gc.get(v).unwrap()), "{name}'s gradient");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (hidden, weight) = (input(&[9, 4], 3), input(&[6, 4], 4));
        let labels = [0, 5, IGNORE, 2, 2, 1, IGNORE, 3, 4];
        check_grad(&hidden, |h| lm_cross_entropy(h, &weight, &labels, Products::Full).unwrap());
        check_grad(&weight, |w| lm_cross_entropy(&hidden, w, &labels, Products::Full).unwrap());
    }

    #[test]
    fn labels_out_of_range_and_mismatched_shapes_are_refused() {
        let (hidden, weight) = (input(&[3, 4], 3), input(&[6, 4], 4));
        assert!(lm_cross_entropy(&hidden, &weight, &[0, 6, 1], Products::Full).is_err(), "label 6 of 6");
        assert!(
            lm_cross_entropy(&hidden, &weight, &[0, 1], Products::Full).is_err(),
            "two labels, three rows"
        );
        assert!(lm_cross_entropy(&hidden, &input(&[6, 5], 4), &[0, 1, 2], Products::Full).is_err(), "widths");
    }
}
