//! Dense layers as one fused op: `x W^T + b` in a single GEMM, with a backward that computes the
//! three gradients directly.
//!
//! Composed from candle ops, a linear layer costs a transposed view, a GEMM, a broadcast add, and
//! in the backward two GEMMs on transposed views, a transpose of the weight gradient and a
//! strided reduction for the bias. Here the forward seeds the output with the bias and lets the
//! GEMM accumulate into it; the backward calls the GEMM with the strides that express the
//! transposes, and reduces the bias gradient in fixed row blocks. GEMM parallelises over output
//! tiles only, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{ROW_BLOCK, Real, slice, with_real};

/// `x W^T + b` for `x` `(rows, in)`, `weight` `(out, in)` (torch's layout), `bias` `(out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, Linear)
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A matrix view for GEMM: base pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
pub(super) struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(ptr: *const T, cols: usize) -> Self {
        Self { ptr, rs: cols as isize, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(ptr: *const T, cols: usize) -> Self {
        Self { ptr, rs: 1, cs: cols as isize }
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, dst row-major, on the rayon pool.
fn gemm<T: Real>(dst: &mut [T], accumulate: bool, m: usize, n: usize, k: usize, lhs: Mat<T>, rhs: Mat<T>) {
    gemm_with(dst, n, accumulate, m, n, k, lhs, rhs, parallelism());
}

/// [`gemm`] on the calling thread only, for callers that parallelise over many small products.
pub(super) fn gemm_serial<T: Real>(
    dst: &mut [T],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    gemm_with(dst, n, accumulate, m, n, k, lhs, rhs, gemm::Parallelism::None);
}

/// `dst (m x n, row stride dst_rs) = [dst +] lhs (m x k) * rhs (k x n)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_with<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    parallelism: gemm::Parallelism,
) {
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n, "gemm: destination too small");
    // SAFETY: every matrix lies inside a live slice whose length the callers derive from the same
    // dimensions (checked above for dst; lhs and rhs come from tensors of the shapes named).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
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
            gemm(&mut y, true, rows, out, inp, Mat::rows(x.as_ptr(), inp), Mat::transposed(w.as_ptr(), inp));
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
            gemm(&mut dx, false, rows, inp, out, Mat::rows(g.as_ptr(), out), Mat::rows(w.as_ptr(), inp));
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
            gemm(&mut dw, false, out, inp, rows, Mat::transposed(g.as_ptr(), out), Mat::rows(x.as_ptr(), inp));
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
