//! Dense layers as one fused op: `x W^T + b` in a single GEMM, with a backward that computes the
//! three gradients directly.
//!
//! Composed from candle ops, a linear layer costs a transposed view, a GEMM, a broadcast add, and
//! in the backward two GEMMs on transposed views, a transpose of the weight gradient and a
//! strided reduction for the bias. Here the forward seeds the output with the bias and lets the
//! GEMM accumulate into it; the backward calls the GEMM with the strides that express the
//! transposes, and reduces the bias gradient in fixed row blocks. The GEMM ([`super::gemm`]) sums
//! every element in one fixed order, so results depend neither on the thread count nor on the CPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{MatMut, MatRef, Threads, gemm};
use super::{ROW_BLOCK, slice, with_real};

/// `x W^T + b` for `x` `(rows, in)`, `weight` `(out, in)` (torch's layout), `bias` `(out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, Linear)
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = xl.shape().dims2()?;
        let (out, w_in) = wl.shape().dims2()?;
        if w_in != inp || bl.shape().elem_count() != out {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not fit",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        with_real!("linear", xs, T => {
            let x = slice::<T>("linear", xs, xl)?;
            let w = slice::<T>("linear", ws, wl)?;
            let b = slice::<T>("linear", bs, bl)?;
            let mut y: Vec<T> = b.iter().copied().cycle().take(rows * out).collect();
            let (x, w) = (MatRef::row_major(x, rows, inp), MatRef::row_major(w, out, inp).t());
            gemm(MatMut::row_major(&mut y, rows, out), true, x, w, Threads::Pool);
            Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(weight, &GradInput)?;
        let dw = grad.apply_op2_no_bwd(x, &GradWeight)?;
        let db = grad.apply_op1_no_bwd(&GradBias)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dx = g W`: `(rows, out) x (out, in)`.
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = wl.shape().dims2()?;
        with_real!("linear-grad-input", gs, T => {
            let g = slice::<T>("linear-grad-input", gs, gl)?;
            let w = slice::<T>("linear-grad-input", ws, wl)?;
            let mut dx = vec![T::zero(); rows * inp];
            let (g, w) = (MatRef::row_major(g, rows, out), MatRef::row_major(w, out, inp));
            gemm(MatMut::row_major(&mut dx, rows, inp), false, g, w, Threads::Pool);
            Ok((T::to_cpu_storage_owned(dx), Shape::from((rows, inp))))
        })
    }
}

/// `dW = g^T x`: `(out, rows) x (rows, in)`.
struct GradWeight;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = xl.shape().dims2()?;
        with_real!("linear-grad-weight", gs, T => {
            let g = slice::<T>("linear-grad-weight", gs, gl)?;
            let x = slice::<T>("linear-grad-weight", xs, xl)?;
            let mut dw = vec![T::zero(); out * inp];
            let (g, x) = (MatRef::row_major(g, rows, out).t(), MatRef::row_major(x, rows, inp));
            gemm(MatMut::row_major(&mut dw, out, inp), false, g, x, Threads::Pool);
            Ok((T::to_cpu_storage_owned(dw), Shape::from((out, inp))))
        })
    }
}

/// `db = sum over rows of g`, in fixed row blocks.
struct GradBias;

impl CustomOp1 for GradBias {
    fn name(&self) -> &'static str {
        "linear-grad-bias"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, out) = gl.shape().dims2()?;
        with_real!("linear-grad-bias", gs, T => {
            let g = slice::<T>("linear-grad-bias", gs, gl)?;
            let partials: Vec<Vec<T>> = g
                .par_chunks(ROW_BLOCK * out)
                .map(|block| {
                    let mut acc = vec![T::zero(); out];
                    for row in block.chunks(out) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                })
                .collect();
            let mut db = vec![T::zero(); out];
            for p in &partials {
                for (a, &v) in db.iter_mut().zip(p) {
                    *a += v;
                }
            }
            Ok((T::to_cpu_storage_owned(db), Shape::from(out)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[allow(clippy::disallowed_methods)] // candle as the reference
    #[test]
    fn matches_matmul_plus_bias() -> Result<()> {
        let (x, w, b) = (input(&[70, 5], 1), input(&[3, 5], 2), input(&[3], 3));
        let got = linear(&x, &w, &b)?;
        let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (x, w, b) = (input(&[70, 5], 1), input(&[3, 5], 2), input(&[3], 3));
        check_grad(&x, |x| linear(x, &w, &b).unwrap());
        check_grad(&w, |w| linear(&x, w, &b).unwrap());
        check_grad(&b, |b| linear(&x, &w, b).unwrap());
    }
}
