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

#[cfg(feature = "cuda")]
use super::cuda::{self, CudaSlice, PushKernelArg as _};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::DropMask;
use super::gemm::{Element, MatMut, MatRef, Products, Threads, product};
use super::{slice, vectorized, with_real};

/// Attention over `q`, `k`, `v` of shape `(tokens, heads * head_dim)` (the projections as they
/// come out of the linear layers), where `segments` lists each row's `(start, len)` in the packed
/// token order. Returns the context in the same layout. Probabilities are dropped out with
/// probability `dropout` using mask `key`. On the CPU, the four products take operands in
/// `products`' precision.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Arc<Vec<(usize, usize)>>,
    heads: usize,
    dropout: f64,
    key: u64,
    products: Products,
) -> Result<Tensor> {
    let (tokens, hidden) = q.dims2()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} must have one shape",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    check_layout("attention", &segments, tokens, hidden, heads)?;
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
        products,
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] for each segment's first token only (BERT's `[CLS]`, all a classifier reads
/// from the last layer), for inference: `q` has one row per segment, `k` and `v` every token.
/// Each row equals the first token's row of [`attention`] without dropout, bit for bit: a row of
/// scores, its softmax and its context depend on that row's query alone. CPU only, no backward.
pub fn first_token_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: Arc<Vec<(usize, usize)>>,
    heads: usize,
    products: Products,
) -> Result<Tensor> {
    let (rows, hidden) = q.dims2()?;
    let (tokens, k_hidden) = k.dims2()?;
    if rows != segments.len() || k_hidden != hidden || v.dims() != k.dims() {
        candle_core::bail!(
            "first-token attention: q {:?} (one row per segment of {}), k {:?} and v {:?} do not fit",
            q.dims(),
            segments.len(),
            k.dims(),
            v.dims()
        );
    }
    check_layout("first-token attention", &segments, tokens, hidden, heads)?;
    let op = Attention {
        segments,
        mask_offsets: Arc::new(Vec::new()),
        heads,
        head_dim: hidden / heads,
        mask: None,
        products,
    };
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &FirstTokenAttention(op))
}

/// Segments in order, non-empty, not overlapping, inside the tokens (each task then owns its block
/// of the output: the kernels rely on it), and a width that splits into the heads.
fn check_layout(
    op: &str,
    segments: &[(usize, usize)],
    tokens: usize,
    hidden: usize,
    heads: usize,
) -> Result<()> {
    let mut end = 0;
    for &(start, len) in segments {
        if len == 0 || start < end || start + len > tokens {
            candle_core::bail!(
                "{op}: segments {segments:?} must be ordered, non-empty, disjoint and within {tokens} tokens"
            );
        }
        end = start + len;
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        candle_core::bail!("{op}: width {hidden} does not split into {heads} heads");
    }
    Ok(())
}

#[derive(Clone)]
struct Attention {
    segments: Arc<Vec<(usize, usize)>>,
    mask_offsets: Arc<Vec<u64>>,
    heads: usize,
    head_dim: usize,
    mask: Option<DropMask>,
    products: Products,
}

/// The output buffer, shared by rayon tasks that each write their own (segment, head) blocks.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: the tasks that receive it write disjoint blocks (see `Attention::block`).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// A method, so that closures capture the whole `Sync` wrapper, not the raw pointer field.
    fn ptr(self) -> *mut T {
        self.0
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

    /// The `(len, head_dim)` block of a `(tokens, hidden)` buffer that holds one task's rows.
    fn view<'a, T>(&self, m: &'a [T], base: usize, len: usize) -> MatRef<'a, T> {
        MatRef::new(m, base, len, self.head_dim, self.hidden(), 1)
    }

    /// The task's writable block of `buffer` (`size` elements, of which the task's block starts at
    /// `base`).
    ///
    /// # Safety
    ///
    /// `buffer` points to `size` elements of which no other live reference or view covers this
    /// block; `base` and `len` come from [`Self::task`] for a validated segment list, so the block
    /// lies inside the buffer, and distinct tasks' blocks are disjoint (segments do not overlap and
    /// heads take distinct columns).
    unsafe fn block<'a, T>(
        &self,
        buffer: SharedMut<T>,
        size: usize,
        base: usize,
        len: usize,
    ) -> MatMut<'a, T> {
        debug_assert!(base + (len - 1) * self.hidden() + self.head_dim <= size);
        // SAFETY: see the function's contract; rows are `hidden >= head_dim` apart.
        unsafe { MatMut::from_raw(buffer.0.add(base), len, self.head_dim, self.hidden()) }
    }

    /// `p = softmax(scale * q k^T)` of one (segment, head) into `p` (`rows x len`, row-major), for
    /// queries `qm` (`rows x head_dim`) and the segment's keys `km` (`len x head_dim`). A row's
    /// result depends on its query alone, not on the other rows.
    fn probabilities<T: Element>(&self, qm: MatRef<'_, T>, km: MatRef<'_, T>, p: &mut [T]) {
        let (rows, len) = (qm.rows(), km.rows());
        product(MatMut::row_major(p, rows, len), false, qm, km.t(), Threads::Caller, self.products);
        let scale = T::from_f64(1.0 / (self.head_dim as f64).sqrt());
        let mut max = vec![T::zero(); rows];
        fold_rows(len, T::neg_infinity(), &mut max, |m, i| num_traits::Float::max(m, p[i] * scale));
        // The exponentials apart from the sums, so that they vectorise (a float sum in the same
        // loop would keep the loop scalar).
        vectorized!({
            for (row, &max) in p.chunks_mut(len).zip(&max) {
                row.iter_mut().for_each(|s| *s = (*s * scale - max).portable_exp());
            }
        });
        let mut sum = max;
        fold_rows(len, T::zero(), &mut sum, |s, i| s + p[i]);
        vectorized!({
            for (row, &sum) in p.chunks_mut(len).zip(&sum) {
                let inv = sum.recip();
                row.iter_mut().for_each(|s| *s *= inv);
            }
        });
    }

    /// The task's first element in the dropout mask's counter space.
    fn mask_start(&self, segment: usize, head: usize, len: usize) -> u64 {
        self.mask_offsets[segment] + (head * len * len) as u64
    }

    fn forward<T: Element>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let size = q.len();
        let mut out = vec![T::zero(); size];
        let dst = SharedMut(out.as_mut_ptr());
        let scratch = self.max_len() * self.max_len();
        (0..self.segments.len() * self.heads).into_par_iter().for_each_init(
            || vec![T::zero(); scratch],
            |p, task| {
                let (segment, head, start, len) = self.task(task);
                let base = self.base(start, head);
                let p = &mut p[..len * len];
                self.probabilities(self.view(q, base, len), self.view(k, base, len), p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(segment, head, len), p);
                }
                // SAFETY: `out` outlives the loop and is only written through tasks' blocks.
                let context = unsafe { self.block(dst, size, base, len) };
                product(
                    context,
                    false,
                    MatRef::row_major(p, len, len),
                    self.view(v, base, len),
                    Threads::Caller,
                    self.products,
                );
            },
        );
        out
    }

    /// Gradients of q, k and v, packed as `[dq; dk; dv]`.
    fn backward<T: Element>(&self, q: &[T], k: &[T], v: &[T], g: &[T]) -> Vec<T> {
        let size = q.len();
        let mut out = vec![T::zero(); 3 * size];
        let (dq_all, dk_all, dv_all) = {
            let ptr = out.as_mut_ptr();
            // SAFETY: the three thirds of `out`.
            unsafe { (SharedMut(ptr), SharedMut(ptr.add(size)), SharedMut(ptr.add(2 * size))) }
        };
        let scale = T::from_f64(1.0 / (self.head_dim as f64).sqrt());
        let scratch = self.max_len() * self.max_len();
        (0..self.segments.len() * self.heads).into_par_iter().for_each_init(
            || [(); 4].map(|_| vec![T::zero(); scratch]),
            |[p, dropped, dp, factors], task| {
                let (segment, head, start, len) = self.task(task);
                let base = self.base(start, head);
                let (p, dropped, dp) = (&mut p[..len * len], &mut dropped[..len * len], &mut dp[..len * len]);
                self.probabilities(self.view(q, base, len), self.view(k, base, len), p);
                // The mask's factors once, for the probabilities and their gradient.
                let factors = self.mask.map(|mask| {
                    let factors = &mut factors[..len * len];
                    mask.factors(self.mask_start(segment, head, len), factors);
                    &*factors
                });
                match factors {
                    Some(f) => vectorized!({
                        dropped.iter_mut().zip(p.iter()).zip(f).for_each(|((d, &p), &f)| *d = p * f)
                    }),
                    None => dropped.copy_from_slice(p),
                }
                let g_block = self.view(g, base, len);
                // SAFETY: `out` outlives the loop and is only written through tasks' blocks.
                let (dq, dk, dv) = unsafe {
                    (
                        self.block(dq_all, size, base, len),
                        self.block(dk_all, size, base, len),
                        self.block(dv_all, size, base, len),
                    )
                };
                // dv = dropped^T g
                product(
                    dv,
                    false,
                    MatRef::row_major(dropped, len, len).t(),
                    g_block,
                    Threads::Caller,
                    self.products,
                );
                // d dropped = g v^T, then through the dropout mask
                product(
                    MatMut::row_major(dp, len, len),
                    false,
                    g_block,
                    self.view(v, base, len).t(),
                    Threads::Caller,
                    self.products,
                );
                if let Some(f) = factors {
                    vectorized!({ dp.iter_mut().zip(f).for_each(|(d, &f)| *d *= f) });
                }
                // d scores = scale * p * (dp - rowsum(dp * p))
                let mut dot = vec![T::zero(); len];
                fold_rows(len, T::zero(), &mut dot, |acc, i| acc + dp[i] * p[i]);
                vectorized!({
                    for ((dp_row, p_row), &dot) in dp.chunks_mut(len).zip(p.chunks(len)).zip(&dot) {
                        for (d, &pv) in dp_row.iter_mut().zip(p_row) {
                            *d = scale * pv * (*d - dot);
                        }
                    }
                });
                // dq = ds k ; dk = ds^T q
                let ds = MatRef::row_major(&*dp, len, len);
                product(dq, false, ds, self.view(k, base, len), Threads::Caller, self.products);
                product(dk, false, ds.t(), self.view(q, base, len), Threads::Caller, self.products);
            },
        );
        out
    }
}

/// The op behind [`first_token_attention`].
struct FirstTokenAttention(Attention);

impl FirstTokenAttention {
    fn forward<T: Element>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let op = &self.0;
        let hidden = op.hidden();
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedMut(out.as_mut_ptr());
        (0..op.segments.len() * op.heads).into_par_iter().for_each_init(
            || vec![T::zero(); op.max_len()],
            |p, task| {
                let (segment, head, start, len) = op.task(task);
                let p = &mut p[..len];
                let query = MatRef::new(q, segment * hidden + head * op.head_dim, 1, op.head_dim, hidden, 1);
                op.probabilities(query, op.view(k, op.base(start, head), len), p);
                // SAFETY: `out` outlives the loop; each task writes its own (row, head) block, one
                // row of `head_dim` elements inside the `(segments, hidden)` buffer.
                let context = unsafe {
                    MatMut::from_raw(
                        dst.ptr().add(segment * hidden + head * op.head_dim),
                        1,
                        op.head_dim,
                        hidden,
                    )
                };
                let weights = MatRef::row_major(&*p, 1, len);
                product(
                    context,
                    false,
                    weights,
                    op.view(v, op.base(start, head), len),
                    Threads::Caller,
                    op.products,
                );
            },
        );
        out
    }
}

impl CustomOp3 for FirstTokenAttention {
    fn name(&self) -> &'static str {
        "first-token-attention"
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
        with_real!("first-token attention", qs, T => {
            let q = slice::<T>("first-token attention", qs, ql)?;
            let (k, v) = (slice::<T>("first-token attention", ks, kl)?, slice::<T>("first-token attention", vs, vl)?);
            Ok((T::to_cpu_storage_owned(self.forward(q, k, v)), ql.shape().clone()))
        })
    }
}

/// For each row of `len` elements (`out.len()` rows), `acc = step(acc, index)` over the row's
/// element indices in ascending order, starting from `init`. Eight rows go side by side so that
/// their independent chains overlap in the pipeline; each row's result is still that of its own
/// sequential loop.
#[inline(always)]
fn fold_rows<T: Copy>(len: usize, init: T, out: &mut [T], step: impl Fn(T, usize) -> T) {
    const ROWS: usize = 8;
    let first = out.len() / ROWS * ROWS;
    for (group, out) in out.chunks_exact_mut(ROWS).enumerate() {
        // A fixed count, so that the accumulators stay in registers.
        let mut acc = [init; ROWS];
        for j in 0..len {
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = step(*acc, (group * ROWS + r) * len + j);
            }
        }
        out.copy_from_slice(&acc);
    }
    for (row, out) in out.iter_mut().enumerate().skip(first) {
        *out = (0..len).fold(init, |acc, j| step(acc, row * len + j));
    }
}

/// The GPU's attention: the packed rows are laid out as `(segments, heads, L, head_dim)` (zero
/// beyond each segment, `L` the longest rounded up to a multiple of 8), so that every (segment,
/// head) pair's products run in one strided batched cuBLAS call; the softmax, the dropout mask
/// (the CPU's counter, bit for bit) and its backward are warp-per-row kernels that skip the
/// padding. The backward recomputes the probabilities, as the CPU's does.
#[cfg(feature = "cuda")]
struct DeviceLayout {
    starts: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    offsets: CudaSlice<u64>,
    /// `L`: the longest segment, rounded up to a multiple of 8.
    len: usize,
}

#[cfg(feature = "cuda")]
impl Attention {
    fn device_layout(&self, dev: &candle_core::cuda_backend::CudaDevice) -> Result<DeviceLayout> {
        let to_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("attention: {v} exceeds i32")))
        };
        let starts = self.segments.iter().map(|&(s, _)| to_i32(s)).collect::<Result<Vec<_>>>()?;
        let lens = self.segments.iter().map(|&(_, l)| to_i32(l)).collect::<Result<Vec<_>>>()?;
        Ok(DeviceLayout {
            starts: cuda::upload(dev, &starts)?,
            lens: cuda::upload(dev, &lens)?,
            offsets: cuda::upload(dev, &self.mask_offsets)?,
            // Leading dimensions that are multiples of 8 elements (16 bytes in bf16) let cuBLAS
            // use the tensor cores; the kernels skip the extra zero rows and columns.
            len: self.max_len().next_multiple_of(8),
        })
    }

    /// Elements of one padded `(segments, heads, L, head_dim)` tensor.
    fn padded_size(&self, lay: &DeviceLayout) -> usize {
        self.segments.len() * self.heads * lay.len * self.head_dim
    }

    fn pad<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        src: &cuda::CudaView<'_, T>,
    ) -> Result<CudaSlice<T>> {
        let total = self.padded_size(lay);
        let mut dst = cuda::alloc::<T>(dev, total)?;
        let kernel = cuda::Kernel::typed::<T>(dev, "attn_pad")?;
        let mut args = kernel.args();
        let (h, l, d) = (self.heads as i32, lay.len as i32, self.head_dim as i32);
        args.arg(src).arg(&mut dst).arg(&lay.starts).arg(&lay.lens).arg(&h).arg(&l).arg(&d).arg(&total);
        cuda::launch(args, cuda::elementwise(total))?;
        Ok(dst)
    }

    fn unpad<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        src: &CudaSlice<T>,
        dst: &mut cuda::CudaViewMut<'_, T>,
    ) -> Result<()> {
        let total = self.padded_size(lay);
        let kernel = cuda::Kernel::typed::<T>(dev, "attn_unpad")?;
        let mut args = kernel.args();
        let (h, l, d) = (self.heads as i32, lay.len as i32, self.head_dim as i32);
        args.arg(src).arg(dst).arg(&lay.starts).arg(&lay.lens).arg(&h).arg(&l).arg(&d).arg(&total);
        cuda::launch(args, cuda::elementwise(total))
    }

    /// The mask's kernel arguments: key, threshold (0: no dropout) and scale.
    fn mask_args(&self) -> (u64, u32, f32) {
        self.mask.map_or((0, 0, 1.0), |m| (m.key, m.threshold, m.scale as f32))
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    fn pairs(&self) -> usize {
        self.segments.len() * self.heads
    }

    /// Probabilities and dropped-out probabilities, `(pairs, L, L)` each.
    fn probabilities_cuda<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        qp: &CudaSlice<T>,
        kp: &CudaSlice<T>,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let (l, d) = (lay.len, self.head_dim);
        let scores = cuda::Product { tb: true, batch: self.pairs(), ..cuda::Product::new(l, l, d) };
        let mut p = scores.output(dev, &qp.as_view(), &kp.as_view())?;
        let mut pd = cuda::alloc::<T>(dev, self.pairs() * l * l)?;
        let kernel = cuda::Kernel::typed::<T>(dev, "attn_softmax")?;
        let mut args = kernel.args();
        let (key, threshold, drop_scale) = self.mask_args();
        let (h, li, scale, rows) = (self.heads as i32, l as i32, self.scale(), self.pairs() * l);
        args.arg(&mut p).arg(&mut pd).arg(&lay.lens).arg(&lay.offsets).arg(&h).arg(&li).arg(&scale);
        args.arg(&key).arg(&threshold).arg(&drop_scale).arg(&rows);
        cuda::launch(args, cuda::warp_rows(rows))?;
        Ok((p, pd))
    }

    fn forward_cuda<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        q: &cuda::CudaView<'_, T>,
        k: &cuda::CudaView<'_, T>,
        v: &cuda::CudaView<'_, T>,
    ) -> Result<CudaSlice<T>>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let lay = self.device_layout(dev)?;
        let (qp, kp, vp) = (self.pad(dev, &lay, q)?, self.pad(dev, &lay, k)?, self.pad(dev, &lay, v)?);
        let (_, pd) = self.probabilities_cuda(dev, &lay, &qp, &kp)?;
        let (l, d) = (lay.len, self.head_dim);
        let product = cuda::Product { batch: self.pairs(), ..cuda::Product::new(l, d, l) };
        let context = product.output(dev, &pd.as_view(), &vp.as_view())?;
        let mut out = dev.alloc_zeros::<T>(q.len())?;
        self.unpad(dev, &lay, &context, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// `[dq; dk; dv]`, as the CPU's backward.
    fn backward_cuda<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        q: &cuda::CudaView<'_, T>,
        k: &cuda::CudaView<'_, T>,
        v: &cuda::CudaView<'_, T>,
        g: &cuda::CudaView<'_, T>,
    ) -> Result<CudaSlice<T>>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let lay = self.device_layout(dev)?;
        let (qp, kp, vp) = (self.pad(dev, &lay, q)?, self.pad(dev, &lay, k)?, self.pad(dev, &lay, v)?);
        let gp = self.pad(dev, &lay, g)?;
        let (p, pd) = self.probabilities_cuda(dev, &lay, &qp, &kp)?;
        let (l, d, pairs) = (lay.len, self.head_dim, self.pairs());
        let product = |m, n, k| cuda::Product { batch: pairs, ..cuda::Product::new(m, n, k) };
        // dv = dropped^T g ; d(dropped) = g v^T
        let dvp = cuda::Product { ta: true, ..product(l, d, l) }.output(dev, &pd.as_view(), &gp.as_view())?;
        let mut ds =
            cuda::Product { tb: true, ..product(l, l, d) }.output(dev, &gp.as_view(), &vp.as_view())?;
        // Through the mask and the softmax, in place.
        {
            let kernel = cuda::Kernel::typed::<T>(dev, "attn_softmax_bwd")?;
            let mut args = kernel.args();
            let (key, threshold, drop_scale) = self.mask_args();
            let (h, li, scale, rows) = (self.heads as i32, l as i32, self.scale(), pairs * l);
            args.arg(&p).arg(&mut ds).arg(&lay.lens).arg(&lay.offsets).arg(&h).arg(&li).arg(&scale);
            args.arg(&key).arg(&threshold).arg(&drop_scale).arg(&rows);
            cuda::launch(args, cuda::warp_rows(rows))?;
        }
        // dq = ds k ; dk = ds^T q
        let dqp = product(l, d, l).output(dev, &ds.as_view(), &kp.as_view())?;
        let dkp = cuda::Product { ta: true, ..product(l, d, l) }.output(dev, &ds.as_view(), &qp.as_view())?;
        let n = q.len();
        let mut out = dev.alloc_zeros::<T>(3 * n)?;
        self.unpad(dev, &lay, &dqp, &mut out.slice_mut(..n))?;
        self.unpad(dev, &lay, &dkp, &mut out.slice_mut(n..2 * n))?;
        self.unpad(dev, &lay, &dvp, &mut out.slice_mut(2 * n..))?;
        Ok(out)
    }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(qs);
        cuda::with_float!("attention", qs, T => {
            let q = cuda::input::<T>("attention", qs, ql)?;
            let k = cuda::input::<T>("attention", ks, kl)?;
            let v = cuda::input::<T>("attention", vs, vl)?;
            Ok((cuda::storage(dev, self.forward_cuda(dev, &q, &k, &v)?), ql.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let candle_core::Storage::Cuda(gs) = &*grad_storage else {
            candle_core::bail!("attention-backward: the gradient must be on the GPU");
        };
        let (n, hidden) = ql.shape().dims2()?;
        let dev = cuda::device(qs);
        cuda::with_float!("attention-backward", qs, T => {
            let q = cuda::input::<T>("attention-backward", qs, ql)?;
            let k = cuda::input::<T>("attention-backward", ks, kl)?;
            let v = cuda::input::<T>("attention-backward", vs, vl)?;
            let g = cuda::input::<T>("attention-backward", gs, grad_layout)?;
            Ok((cuda::storage(dev, self.op.backward_cuda(dev, &q, &k, &v, &g)?), Shape::from((3 * n, hidden))))
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
    #[allow(clippy::disallowed_methods)] // candle as the reference
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
    fn overlapping_out_of_range_or_mismatched_inputs_are_refused() {
        // Each task owns its rows' block of the output: overlapping segments would alias it.
        let (q, k, v) = qkv();
        for segments in [vec![(0, 3), (2, 2)], vec![(3, 3)], vec![(0, 0)], vec![(3, 2), (0, 3)]] {
            assert!(
                attention(&q, &k, &v, Arc::new(segments.clone()), HEADS, 0.0, 0, Products::Full).is_err(),
                "{segments:?}"
            );
        }
        let short = input(&[4, WIDTH], 9);
        assert!(
            attention(&q, &short, &v, segments(), HEADS, 0.0, 0, Products::Full).is_err(),
            "k of another shape"
        );
        assert!(attention(&q, &k, &v, segments(), 4, 0.0, 0, Products::Full).is_err(), "width 6 in 4 heads");
    }

    #[test]
    fn matches_the_textbook_composition() -> Result<()> {
        let (q, k, v) = qkv();
        let got = attention(&q, &k, &v, segments(), HEADS, 0.0, 0, Products::Full)?;
        let diff = (got - reference(&q, &k, &v))?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_with_and_without_dropout() {
        let (q, k, v) = qkv();
        for p in [0.0, 0.3] {
            check_grad(&q, |q| attention(q, &k, &v, segments(), HEADS, p, 5, Products::Full).unwrap());
            check_grad(&k, |k| attention(&q, k, &v, segments(), HEADS, p, 5, Products::Full).unwrap());
            check_grad(&v, |v| attention(&q, &k, v, segments(), HEADS, p, 5, Products::Full).unwrap());
        }
    }
}
