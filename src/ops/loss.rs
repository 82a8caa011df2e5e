//! Cross-entropy loss over class logits, as one op with its backward.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{Real, slice, with_real};

/// The label of a row that does not count ([`cross_entropy`]'s `ignore_index`): prompt tokens and
/// padding in language modelling.
pub const IGNORE: u32 = u32::MAX;

/// Mean cross-entropy of `logits` `(rows, classes)` against class indices `labels`, as
/// `torch.nn.functional.cross_entropy`. With `class_weights`, each row counts with its class's
/// weight and the mean is divided by the sum of those weights (torch's `weight=` semantics). Rows
/// labelled [`IGNORE`] count for nothing, in the loss, its mean and the gradient (torch's
/// `ignore_index`).
///
/// One op rather than candle's `exp`/`log`/`sum` so that the exponentials are pipe's own (same
/// bits on every machine, see [`super::math`]) and rows are summed in order.
pub fn cross_entropy(logits: &Tensor, labels: &[u32], class_weights: Option<&[f64]>) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if labels.len() != rows {
        candle_core::bail!("cross_entropy: {} labels for {rows} rows", labels.len());
    }
    let mut weights = Vec::with_capacity(rows);
    let mut kept = Vec::with_capacity(rows);
    for &label in labels {
        if label == IGNORE {
            // Weight 0 and any valid class: the row adds exactly 0 to the loss, its weight sum
            // and the gradient, on every device, with the kernels as they are.
            weights.push(0.0);
            kept.push(0);
            continue;
        }
        kept.push(label);
        let label = label as usize;
        if label >= classes {
            candle_core::bail!("cross_entropy: label {label} out of range for {classes} classes");
        }
        weights.push(match class_weights {
            Some(w) if w.len() != classes => {
                candle_core::bail!("cross_entropy: {} class weights for {classes} classes", w.len())
            }
            Some(w) => w[label],
            None => 1.0,
        });
    }
    let total_weight: f64 = weights.iter().sum();
    let op = CrossEntropy { labels: Arc::new(kept), weights: Arc::new(weights), total_weight };
    tape::apply1(logits, op)
}

#[derive(Clone)]
pub(super) struct CrossEntropy {
    labels: Arc<Vec<u32>>,
    /// Each row's weight (its class's weight, or 1).
    weights: Arc<Vec<f64>>,
    total_weight: f64,
}

impl CrossEntropy {
    /// Softmax of one row of logits into `p`, and `log(sum(exp(x - max)))` with the max.
    pub(super) fn softmax<T: Real>(row: &[T], p: &mut [T]) -> (T, T) {
        let max = row.iter().fold(T::neg_infinity(), |m, &x| num_traits::Float::max(m, x));
        let mut sum = T::zero();
        for (p, &x) in p.iter_mut().zip(row) {
            *p = (x - max).portable_exp();
            sum += *p;
        }
        let inv = sum.recip();
        p.iter_mut().for_each(|v| *v *= inv);
        (max, sum.portable_ln())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, classes) = xl.shape().dims2()?;
        with_real!("cross-entropy", xs, T => {
            let x = slice::<T>("cross-entropy", xs, xl)?;
            let mut p = vec![T::zero(); classes];
            let mut total = T::zero();
            for ((row, &label), &w) in x.chunks(classes).zip(self.labels.iter()).zip(self.weights.iter()) {
                let (max, log_sum) = Self::softmax(row, &mut p);
                // -log softmax(x)[label] = log(sum exp(x - max)) - (x[label] - max)
                total += T::from_f64(w) * (log_sum - (row[label as usize] - max));
            }
            let loss = total / T::from_f64(self.total_weight);
            Ok((T::to_cpu_storage_owned(vec![loss]), Shape::from(())))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, classes) = xl.shape().dims2()?;
        let dev = cuda::device(xs);
        let x = cuda::input::<f32>("cross-entropy (f32 logits on CUDA)", xs, xl)?;
        let (labels, weights) = self.upload(dev)?;
        let mut row_loss = cuda::alloc::<f32>(dev, rows)?;
        let mut out = cuda::alloc::<f32>(dev, 1)?;
        let kernel = cuda::Kernel::plain(dev, "cross_entropy_fwd")?;
        let mut args = kernel.args();
        let (r, c, total) = (rows as i32, classes as i32, self.total_weight as f32);
        args.arg(&x).arg(&labels).arg(&weights).arg(&mut row_loss).arg(&mut out).arg(&r).arg(&c).arg(&total);
        let one_block =
            cuda::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        cuda::launch(args, one_block)?;
        Ok((cuda::storage(dev, out), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(logits.apply_op2_no_bwd(grad, &CrossEntropyBackward(self.clone()))?))
    }
}

/// `d logits = grad * w_row / total_weight * (softmax - onehot(label))`.
#[cfg(feature = "cuda")]
impl CrossEntropy {
    /// Labels and per-row weights as device buffers.
    fn upload(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<(cuda::CudaSlice<u32>, cuda::CudaSlice<f32>)> {
        let weights: Vec<f32> = self.weights.iter().map(|&w| w as f32).collect();
        Ok((cuda::upload(dev, &self.labels)?, cuda::upload(dev, &weights)?))
    }
}

struct CrossEntropyBackward(CrossEntropy);

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, classes) = xl.shape().dims2()?;
        with_real!("cross-entropy-backward", xs, T => {
            let x = slice::<T>("cross-entropy-backward", xs, xl)?;
            let g = slice::<T>("cross-entropy-backward", gs, gl)?[0];
            let op = &self.0;
            let mut out = vec![T::zero(); x.len()];
            for (((row, d), &label), &w) in x.chunks(classes).zip(out.chunks_mut(classes)).zip(op.labels.iter()).zip(op.weights.iter()) {
                CrossEntropy::softmax(row, d);
                d[label as usize] -= T::one();
                let scale = g * T::from_f64(w / op.total_weight);
                d.iter_mut().for_each(|v| *v *= scale);
            }
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, classes) = xl.shape().dims2()?;
        let dev = cuda::device(xs);
        let x = cuda::input::<f32>("cross-entropy-backward (f32 logits on CUDA)", xs, xl)?;
        let g = cuda::input::<f32>("cross-entropy-backward", gs, gl)?;
        let (labels, weights) = self.0.upload(dev)?;
        let mut dx = cuda::alloc::<f32>(dev, rows * classes)?;
        let kernel = cuda::Kernel::plain(dev, "cross_entropy_bwd")?;
        let mut args = kernel.args();
        let (r, c, total) = (rows as i32, classes as i32, self.0.total_weight as f32);
        args.arg(&x).arg(&labels).arg(&weights).arg(&g).arg(&mut dx).arg(&r).arg(&c).arg(&total);
        cuda::launch(args, cuda::elementwise(rows))?;
        Ok((cuda::storage(dev, dx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn uniform_logits_give_log_classes() -> Result<()> {
        let logits = Tensor::zeros((4, 3), candle_core::DType::F64, &candle_core::Device::Cpu)?;
        let loss = cross_entropy(&logits, &[0, 1, 2, 0], None)?.to_scalar::<f64>()?;
        assert!((loss - libm::log(3.0)).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn matches_the_definition() -> Result<()> {
        // torch.nn.functional.cross_entropy(x, y, weight=w) for these values, computed in f64.
        let x = input(&[4, 3], 5);
        let (labels, w) = ([2u32, 0, 1, 1], [1.0, 2.0, 0.5]);
        let rows = x.to_vec2::<f64>()?;
        let mut want = 0.0;
        for (row, &l) in rows.iter().zip(&labels) {
            let lse = libm::log(row.iter().map(|&v| libm::exp(v)).sum::<f64>());
            want += w[l as usize] * (lse - row[l as usize]);
        }
        want /= labels.iter().map(|&l| w[l as usize]).sum::<f64>();
        let got = cross_entropy(&x, &labels, Some(&w))?.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }

    /// Ignored rows are as if they were not there: the loss of the others, and no gradient.
    #[test]
    fn ignored_rows_count_for_nothing() -> Result<()> {
        let x = candle_core::Var::from_tensor(&input(&[4, 3], 5))?;
        let kept = Tensor::cat(&[x.get(0)?, x.get(2)?], 0)?.reshape((2, 3))?;
        let want = cross_entropy(&kept, &[2, 1], None)?.to_scalar::<f64>()?;
        let loss = cross_entropy(&x, &[2, IGNORE, 1, IGNORE], None)?;
        assert_eq!(loss.to_scalar::<f64>()?, want);
        let grad = loss.backward()?.get(&x).unwrap().to_vec2::<f64>()?;
        assert!(grad[1].iter().chain(&grad[3]).all(|&g| g == 0.0), "{grad:?}");
        assert!(grad[0].iter().any(|&g| g != 0.0));
        check_grad(&x, |x| cross_entropy(x, &[2, IGNORE, 1, 0], None).unwrap());
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = input(&[4, 3], 5);
        check_grad(&x, |x| cross_entropy(x, &[2, 0, 1, 1], Some(&[1.0, 2.0, 0.5])).unwrap());
    }
}
