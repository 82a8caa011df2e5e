//! Scaled, masked softmax over attention scores, fused, with a backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, with_real};

/// `softmax(scale * scores)` over the last (key) dimension, where keys whose `mask` is 0 get
/// probability exactly 0.
///
/// `scores` is `(batch, heads, queries, keys)`, `mask` is `(batch, keys)` of 1 (attend) and 0
/// (padding), in the scores' dtype. Unlike the additive `-inf` bias of the reference, masked keys
/// are skipped, so a padded key can never leak probability mass, and their gradient is exactly 0.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })
}

struct MaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, keys) = sl.shape().dims4()?;
        if ml.shape().dims() != [batch, keys] {
            candle_core::bail!("masked-softmax: mask {:?} does not fit scores {:?}", ml.shape(), sl.shape());
        }
        with_real!("masked-softmax", ss, T => {
            let s = slice::<T>("masked-softmax", ss, sl)?;
            let mask = slice::<T>("masked-softmax", ms, ml)?;
            let scale = T::from_f64(self.scale);
            let mut out = vec![T::zero(); s.len()];
            out.par_chunks_mut(keys).zip(s.par_chunks(keys)).enumerate().for_each(|(row, (y, s))| {
                let m = &mask[(row / (heads * queries)) * keys..][..keys];
                let mut max = T::neg_infinity();
                for k in 0..keys {
                    if m[k] != T::zero() {
                        max = max.max(s[k] * scale);
                    }
                }
                let mut sum = T::zero();
                for k in 0..keys {
                    y[k] = if m[k] != T::zero() { (s[k] * scale - max).exp() } else { T::zero() };
                    sum += y[k];
                }
                if sum > T::zero() {
                    let inv = sum.recip();
                    y.iter_mut().for_each(|v| *v *= inv);
                }
            });
            Ok((T::to_cpu_storage_owned(out), sl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = probs.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `d scores = scale * p * (dp - sum(dp * p))`, row by row.
struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let keys = *pl.shape().dims().last().unwrap_or(&1);
        with_real!("masked-softmax-backward", ps, T => {
            let p = slice::<T>("masked-softmax-backward", ps, pl)?;
            let g = slice::<T>("masked-softmax-backward", gs, gl)?;
            let scale = T::from_f64(self.scale);
            let mut out = vec![T::zero(); p.len()];
            out.par_chunks_mut(keys).zip(p.par_chunks(keys).zip(g.par_chunks(keys))).for_each(
                |(ds, (p, g))| {
                    let dot = p.iter().zip(g).map(|(&p, &g)| p * g).sum::<T>();
                    for k in 0..keys {
                        ds[k] = scale * p[k] * (g[k] - dot);
                    }
                },
            );
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};
    use candle_core::Device;

    fn mask() -> Tensor {
        Tensor::new(&[[1f64, 1., 1., 0.], [1., 0., 0., 0.]], &Device::Cpu).unwrap()
    }

    #[test]
    fn masked_keys_get_zero_and_rows_sum_to_one() -> Result<()> {
        let p = masked_softmax(&input(&[2, 3, 2, 4], 1), &mask(), 0.5)?;
        let rows = p.sum(3)?.flatten_all()?.to_vec1::<f64>()?;
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-12), "{rows:?}");
        let batch1 = p.get(1)?.flatten_all()?.to_vec1::<f64>()?;
        for (i, v) in batch1.iter().enumerate() {
            assert_eq!(*v, if i % 4 == 0 { 1.0 } else { 0.0 });
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_grad(&input(&[2, 3, 2, 4], 1), |s| masked_softmax(s, &mask(), 0.5).unwrap());
    }
}
