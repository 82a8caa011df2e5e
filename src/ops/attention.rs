//! Multi-head scaled dot-product attention as one op, with its backward.
//!
//! Composed from candle ops, attention costs three head-splitting transposes (copies), a batched
//! GEMM per product with its own transposed copies in the backward, the softmax, a dropout mask
//! tensor and the head-merging transpose. Here each (row, head) pair is one task: it reads its
//! query, key and value slices straight out of the `(rows * len, hidden)` projections through GEMM
//! strides, keeps its `len x len` scores in a scratch buffer, and writes its slice of the context.
//! The backward recomputes the probabilities (cheap next to the GEMMs, and nothing of size
//! `heads * len^2` is kept between passes) and the dropout mask (a hash of the key and the
//! element's position, see [`super::dropout`]). Tasks are independent and each runs its GEMMs on
//! one thread, so results do not depend on the thread count.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::DropMask;
use super::linear::{Mat, gemm_serial, gemm_with};
use super::{Real, slice, with_real};

/// Attention over `q`, `k`, `v` of shape `(rows * len, heads * head_dim)` (the projections as they
/// come out of the linear layers), where `keep[r * len + j]` says whether key `j` of row `r` is a
/// real token. Returns the context in the same layout. Probabilities are dropped out with
/// probability `dropout` using mask `key`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: Arc<Vec<bool>>,
    rows: usize,
    heads: usize,
    dropout: f64,
    key: u64,
) -> Result<Tensor> {
    let (total, hidden) = q.dims2()?;
    if rows == 0 || total % rows != 0 || hidden % heads != 0 || keep.len() != total {
        candle_core::bail!(
            "attention: {total} positions, {rows} rows, {heads} heads, mask of {}",
            keep.len()
        );
    }
    let op = Attention {
        keep,
        rows,
        len: total / rows,
        heads,
        head_dim: hidden / heads,
        mask: DropMask::new(dropout, key),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone)]
struct Attention {
    keep: Arc<Vec<bool>>,
    rows: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    mask: Option<DropMask>,
}

/// A raw pointer that may cross into rayon tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: tasks write disjoint (row, head) blocks; see the callers.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer, offset by `count` elements. (A method, so closures capture the `Send` wrapper
    /// rather than the bare pointer field.)
    fn at(self, count: usize) -> *mut T {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(count) }
    }
}

impl Attention {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Offset of the first element of (row, head) in a `(rows * len, hidden)` buffer.
    fn base(&self, row: usize, head: usize) -> usize {
        row * self.len * self.hidden() + head * self.head_dim
    }

    /// The probabilities of one (row, head): `p = softmax(scale * q k^T)` over real keys, into
    /// `p` (`len x len`, row-major). Returns nothing; masked keys get exactly 0.
    fn probabilities<T: Real>(&self, q: &[T], k: &[T], row: usize, head: usize, p: &mut [T]) {
        let (len, hd, hidden) = (self.len, self.head_dim, self.hidden());
        let base = self.base(row, head);
        let qm = Mat { ptr: q[base..].as_ptr(), rs: hidden as isize, cs: 1 };
        let kt = Mat { ptr: k[base..].as_ptr(), rs: 1, cs: hidden as isize };
        gemm_serial(p, false, len, len, hd, qm, kt);
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        let keep = &self.keep[row * len..(row + 1) * len];
        for scores in p.chunks_mut(len) {
            let mut max = T::neg_infinity();
            for (s, &kept) in scores.iter().zip(keep) {
                if kept {
                    max = num_traits::Float::max(max, *s * scale);
                }
            }
            let mut sum = T::zero();
            for (s, &kept) in scores.iter_mut().zip(keep) {
                *s = if kept { (*s * scale - max).exp() } else { T::zero() };
                sum += *s;
            }
            if sum > T::zero() {
                let inv = sum.recip();
                scores.iter_mut().for_each(|s| *s *= inv);
            }
        }
    }

    /// Index of (row, head, query, key) in the dropout mask's counter space.
    fn mask_start(&self, row: usize, head: usize) -> u64 {
        ((row * self.heads + head) * self.len * self.len) as u64
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (len, hidden) = (self.len, self.hidden());
        let mut out = vec![T::zero(); self.rows * len * hidden];
        let dst = SharedMut(out.as_mut_ptr());
        (0..self.rows * self.heads).into_par_iter().for_each_init(
            || vec![T::zero(); len * len],
            |p, task| {
                let (row, head) = (task / self.heads, task % self.heads);
                self.probabilities(q, k, row, head, p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(row, head), p);
                }
                let base = self.base(row, head);
                // SAFETY: this task alone writes columns head*hd..(head+1)*hd of rows row*len..
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.at(base), (len - 1) * hidden + self.head_dim)
                };
                let vm = Mat { ptr: v[base..].as_ptr(), rs: hidden as isize, cs: 1 };
                gemm_strided(out, hidden, len, self.head_dim, len, Mat::rows(p.as_ptr(), len), vm);
            },
        );
        out
    }

    /// Gradients of q, k and v, packed as `[dq; dk; dv]`.
    fn backward<T: Real>(&self, q: &[T], k: &[T], v: &[T], g: &[T]) -> Vec<T> {
        let (len, hd, hidden) = (self.len, self.head_dim, self.hidden());
        let size = self.rows * len * hidden;
        let mut out = vec![T::zero(); 3 * size];
        let dst = SharedMut(out.as_mut_ptr());
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        (0..self.rows * self.heads).into_par_iter().for_each_init(
            || (vec![T::zero(); len * len], vec![T::zero(); len * len], vec![T::zero(); len * len]),
            |(p, dropped, dp), task| {
                let (row, head) = (task / self.heads, task % self.heads);
                let base = self.base(row, head);
                self.probabilities(q, k, row, head, p);
                dropped.copy_from_slice(p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(row, head), dropped);
                }
                let at = |m: &[T]| Mat { ptr: m[base..].as_ptr(), rs: hidden as isize, cs: 1 };
                let at_t = |m: &[T]| Mat { ptr: m[base..].as_ptr(), rs: 1, cs: hidden as isize };
                let block = (len - 1) * hidden + hd;
                // SAFETY: this task alone writes its (row, head) block of each of dq, dk, dv.
                let (dq, dk, dv) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dst.at(base), block),
                        std::slice::from_raw_parts_mut(dst.at(size + base), block),
                        std::slice::from_raw_parts_mut(dst.at(2 * size + base), block),
                    )
                };
                // dv = dropped^T g
                gemm_strided(dv, hidden, len, hd, len, Mat::transposed(dropped.as_ptr(), len), at(g));
                // d dropped = g v^T, then through the dropout mask
                gemm_serial(dp, false, len, len, hd, at(g), at_t(v));
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(row, head), dp);
                }
                // d scores = scale * p * (dp - rowsum(dp * p))
                for (dp_row, p_row) in dp.chunks_mut(len).zip(p.chunks(len)) {
                    let dot = dp_row.iter().zip(p_row).map(|(&a, &b)| a * b).sum::<T>();
                    for (d, &pv) in dp_row.iter_mut().zip(p_row) {
                        *d = scale * pv * (*d - dot);
                    }
                }
                // dq = ds k ; dk = ds^T q
                gemm_strided(dq, hidden, len, hd, len, Mat::rows(dp.as_ptr(), len), at(k));
                gemm_strided(dk, hidden, len, hd, len, Mat::transposed(dp.as_ptr(), len), at(q));
            },
        );
        out
    }
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n)`, on the calling thread.
fn gemm_strided<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    gemm_with(dst, dst_rs, false, m, n, k, lhs, rhs, gemm::Parallelism::None);
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("attention", qs, T => {
            let (q, k, v) = (slice::<T>("attention", qs, ql)?, slice::<T>("attention", ks, kl)?, slice::<T>("attention", vs, vl)?);
            Ok((T::to_cpu_storage_owned(self.forward(q, k, v)), ql.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed =
            q.apply_op3_no_bwd(k, v, &AttentionBackward { op: self.clone(), grad: grad.contiguous()? })?;
        let n = q.dim(0)?;
        Ok((Some(packed.narrow(0, 0, n)?), Some(packed.narrow(0, n, n)?), Some(packed.narrow(0, 2 * n, n)?)))
    }
}

/// The backward pass as a no-backward op over (q, k, v), carrying the incoming gradient.
struct AttentionBackward {
    op: Attention,
    grad: Tensor,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*grad_storage else {
            candle_core::bail!("attention-backward: the gradient must be on the CPU");
        };
        let (n, hidden) = ql.shape().dims2()?;
        with_real!("attention-backward", qs, T => {
            let (q, k, v) = (slice::<T>("attention", qs, ql)?, slice::<T>("attention", ks, kl)?, slice::<T>("attention", vs, vl)?);
            let g = slice::<T>("attention-backward", gs, grad_layout)?;
            Ok((T::to_cpu_storage_owned(self.op.backward(q, k, v, g)), Shape::from((3 * n, hidden))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    const ROWS: usize = 2;
    const LEN: usize = 4;
    const HEADS: usize = 2;

    fn keep() -> Arc<Vec<bool>> {
        Arc::new(vec![true, true, true, false, true, true, false, false])
    }

    /// The textbook composition, for comparison.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let split = |t: &Tensor| {
            t.reshape((ROWS, LEN, HEADS, 3)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let bias: Vec<f64> = keep().iter().map(|&k| if k { 0.0 } else { f64::NEG_INFINITY }).collect();
        let bias = Tensor::from_vec(bias, (ROWS, 1, 1, LEN), q.device()).unwrap();
        let scores =
            (q.matmul(&k.t().unwrap()).unwrap() / 3f64.sqrt()).unwrap().broadcast_add(&bias).unwrap();
        let e = scores.broadcast_sub(&scores.max_keepdim(3).unwrap()).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((ROWS * LEN, HEADS * 3))
            .unwrap()
    }

    #[test]
    fn matches_the_textbook_composition() -> Result<()> {
        let (q, k, v) = (
            input(&[ROWS * LEN, HEADS * 3], 1),
            input(&[ROWS * LEN, HEADS * 3], 2),
            input(&[ROWS * LEN, HEADS * 3], 3),
        );
        let got = attention(&q, &k, &v, keep(), ROWS, HEADS, 0.0, 0)?;
        let diff = (got - reference(&q, &k, &v))?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_with_and_without_dropout() {
        let (q, k, v) = (
            input(&[ROWS * LEN, HEADS * 3], 1),
            input(&[ROWS * LEN, HEADS * 3], 2),
            input(&[ROWS * LEN, HEADS * 3], 3),
        );
        for p in [0.0, 0.3] {
            check_grad(&q, |q| attention(q, &k, &v, keep(), ROWS, HEADS, p, 5).unwrap());
            check_grad(&k, |k| attention(&q, k, &v, keep(), ROWS, HEADS, p, 5).unwrap());
            check_grad(&v, |v| attention(&q, &k, v, keep(), ROWS, HEADS, p, 5).unwrap());
        }
    }
}
