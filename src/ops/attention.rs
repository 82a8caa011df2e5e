//! Multi-head scaled dot-product attention over packed rows, as one op with its backward.
//!
//! The model packs the real tokens of a batch one row after another and never computes padding
//! (see `model::bert`); a row is a *segment* `(start, len)` of the packed `(tokens, hidden)`
//! projections, and attends only within itself. Composed from candle ops, attention would also
//! cost head-splitting transposes (copies), batched GEMMs with transposed copies in the backward,
//! a mask, a dropout mask tensor and the head-merging transpose. Here each (segment, head) pair is
//! one task: it reads its query, key and value slices through GEMM strides, keeps its `len x len`
//! scores in a scratch buffer, and writes its slice of the context. The backward recomputes the
//! probabilities (cheap next to the GEMMs; nothing of size `heads * len^2` is kept between passes)
//! and the dropout mask (a hash of the key and the element's position, see [`super::dropout`]).
//! Tasks are independent and each runs its GEMMs on one thread, so results do not depend on the
//! thread count.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::DropMask;
use super::linear::{Mat, gemm_serial, gemm_with};
use super::{Real, slice, with_real};

/// Attention over `q`, `k`, `v` of shape `(tokens, heads * head_dim)` (the projections as they
/// come out of the linear layers), where `segments` lists each row's `(start, len)` in the packed
/// token order. Returns the context in the same layout. Probabilities are dropped out with
/// probability `dropout` using mask `key`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Arc<Vec<(usize, usize)>>,
    heads: usize,
    dropout: f64,
    key: u64,
) -> Result<Tensor> {
    let (tokens, hidden) = q.dims2()?;
    let covered = segments.iter().all(|&(start, len)| len > 0 && start + len <= tokens);
    if heads == 0 || hidden % heads != 0 || !covered {
        candle_core::bail!(
            "attention: {tokens} tokens of width {hidden}, {heads} heads, segments {segments:?}"
        );
    }
    // Each task's first element in the dropout mask's counter space.
    let mut mask_offsets = Vec::with_capacity(segments.len());
    let mut offset = 0u64;
    for &(_, len) in segments.iter() {
        mask_offsets.push(offset);
        offset += (heads * len * len) as u64;
    }
    let op = Attention {
        segments,
        mask_offsets: Arc::new(mask_offsets),
        heads,
        head_dim: hidden / heads,
        mask: DropMask::new(dropout, key),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone)]
struct Attention {
    segments: Arc<Vec<(usize, usize)>>,
    mask_offsets: Arc<Vec<u64>>,
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

    /// The (segment, head) of task `task`, with the segment's `(start, len)`.
    fn task(&self, task: usize) -> (usize, usize, usize, usize) {
        let (segment, head) = (task / self.heads, task % self.heads);
        let (start, len) = self.segments[segment];
        (segment, head, start, len)
    }

    /// Offset of a task's first element in a `(tokens, hidden)` buffer.
    fn base(&self, start: usize, head: usize) -> usize {
        start * self.hidden() + head * self.head_dim
    }

    /// Largest segment length (sizes the scratch buffers).
    fn max_len(&self) -> usize {
        self.segments.iter().map(|&(_, len)| len).max().unwrap_or(0)
    }

    /// `p = softmax(scale * q k^T)` of one (segment, head) into `p` (`len x len`, row-major).
    fn probabilities<T: Real>(&self, q: &[T], k: &[T], base: usize, len: usize, p: &mut [T]) {
        let (hd, hidden) = (self.head_dim, self.hidden());
        let qm = Mat { ptr: q[base..].as_ptr(), rs: hidden as isize, cs: 1 };
        let kt = Mat { ptr: k[base..].as_ptr(), rs: 1, cs: hidden as isize };
        gemm_serial(p, false, len, len, hd, qm, kt);
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        for scores in p.chunks_mut(len) {
            let max = scores.iter().fold(T::neg_infinity(), |m, &s| num_traits::Float::max(m, s * scale));
            let mut sum = T::zero();
            for s in scores.iter_mut() {
                *s = (*s * scale - max).exp();
                sum += *s;
            }
            let inv = sum.recip();
            scores.iter_mut().for_each(|s| *s *= inv);
        }
    }

    /// The task's first element in the dropout mask's counter space.
    fn mask_start(&self, segment: usize, head: usize, len: usize) -> u64 {
        self.mask_offsets[segment] + (head * len * len) as u64
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (hd, hidden) = (self.head_dim, self.hidden());
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedMut(out.as_mut_ptr());
        let scratch = self.max_len() * self.max_len();
        (0..self.segments.len() * self.heads).into_par_iter().for_each_init(
            || vec![T::zero(); scratch],
            |p, task| {
                let (segment, head, start, len) = self.task(task);
                let base = self.base(start, head);
                let p = &mut p[..len * len];
                self.probabilities(q, k, base, len, p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(segment, head, len), p);
                }
                // SAFETY: this task alone writes columns head*hd.. of rows start..start+len.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.at(base), (len - 1) * hidden + hd) };
                let vm = Mat { ptr: v[base..].as_ptr(), rs: hidden as isize, cs: 1 };
                gemm_strided(out, hidden, len, hd, len, Mat::rows(p.as_ptr(), len), vm);
            },
        );
        out
    }

    /// Gradients of q, k and v, packed as `[dq; dk; dv]`.
    fn backward<T: Real>(&self, q: &[T], k: &[T], v: &[T], g: &[T]) -> Vec<T> {
        let (hd, hidden) = (self.head_dim, self.hidden());
        let size = q.len();
        let mut out = vec![T::zero(); 3 * size];
        let dst = SharedMut(out.as_mut_ptr());
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        let scratch = self.max_len() * self.max_len();
        (0..self.segments.len() * self.heads).into_par_iter().for_each_init(
            || (vec![T::zero(); scratch], vec![T::zero(); scratch], vec![T::zero(); scratch]),
            |(p, dropped, dp), task| {
                let (segment, head, start, len) = self.task(task);
                let base = self.base(start, head);
                let (p, dropped, dp) = (&mut p[..len * len], &mut dropped[..len * len], &mut dp[..len * len]);
                self.probabilities(q, k, base, len, p);
                dropped.copy_from_slice(p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(segment, head, len), dropped);
                }
                let at = |m: &[T]| Mat { ptr: m[base..].as_ptr(), rs: hidden as isize, cs: 1 };
                let at_t = |m: &[T]| Mat { ptr: m[base..].as_ptr(), rs: 1, cs: hidden as isize };
                let block = (len - 1) * hidden + hd;
                // SAFETY: this task alone writes its (segment, head) block of each of dq, dk, dv.
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
                    mask.apply_in_place(self.mask_start(segment, head, len), dp);
                }
                // d scores = scale * p * (dp - rowsum(dp * p))
                for (dp_row, p_row) in dp.chunks_mut(len).zip(p.chunks(len)) {
                    let dot = dp_row.iter().zip(p_row.iter()).map(|(&a, &b)| a * b).sum::<T>();
                    for (d, &pv) in dp_row.iter_mut().zip(p_row.iter()) {
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

    const HEADS: usize = 2;
    const WIDTH: usize = 6;

    /// Two rows of 3 and 2 tokens, packed.
    fn segments() -> Arc<Vec<(usize, usize)>> {
        Arc::new(vec![(0, 3), (3, 2)])
    }

    /// The textbook composition, row by row and head by head.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let hd = WIDTH / HEADS;
        let mut rows = Vec::new();
        for &(start, len) in segments().iter() {
            let mut heads = Vec::new();
            for h in 0..HEADS {
                let part = |t: &Tensor| t.narrow(0, start, len).unwrap().narrow(1, h * hd, hd).unwrap();
                let scores = (part(q).matmul(&part(k).t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
                let e = scores.broadcast_sub(&scores.max_keepdim(1).unwrap()).unwrap().exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
                heads.push(p.matmul(&part(v)).unwrap());
            }
            rows.push(Tensor::cat(&heads, 1).unwrap());
        }
        Tensor::cat(&rows, 0).unwrap()
    }

    fn qkv() -> (Tensor, Tensor, Tensor) {
        (input(&[5, WIDTH], 1), input(&[5, WIDTH], 2), input(&[5, WIDTH], 3))
    }

    #[test]
    fn matches_the_textbook_composition() -> Result<()> {
        let (q, k, v) = qkv();
        let got = attention(&q, &k, &v, segments(), HEADS, 0.0, 0)?;
        let diff = (got - reference(&q, &k, &v))?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_with_and_without_dropout() {
        let (q, k, v) = qkv();
        for p in [0.0, 0.3] {
            check_grad(&q, |q| attention(q, &k, &v, segments(), HEADS, p, 5).unwrap());
            check_grad(&k, |k| attention(&q, k, &v, segments(), HEADS, p, 5).unwrap());
            check_grad(&v, |v| attention(&q, &k, v, segments(), HEADS, p, 5).unwrap());
        }
    }
}
