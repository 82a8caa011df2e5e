//! Multi-head scaled dot-product attention over packed rows, as one op with its backward: over
//! whole rows (encoders), within a window (ModernBERT's local layers), causal (decoders), and with
//! query heads sharing key/value heads (grouped-query attention); see [`AttentionShape`].
//!
//! The model packs the real tokens of a batch one row after another and never computes padding
//! (see `model::encoder`); a row is a *segment* `(start, len)` of the packed tokens, and attends
//! only within itself. The op takes the query, key and value projections side by side, as one
//! linear layer makes them, and returns their gradient as one tensor of that shape:
//! one GEMM per direction for the three projections, and one edge in the gradient graph instead of
//! three. Composed from candle ops, attention would also
//! cost head-splitting transposes (copies), batched GEMMs with transposed copies in the backward,
//! a mask, a dropout mask tensor and the head-merging transpose. Here each (segment, head) pair is
//! one task: it reads its query, key and value slices through GEMM strides, keeps its `len x len`
//! scores in a scratch buffer, and writes its slice of the context; in the backward a task is a
//! (segment, key/value head), whose query heads add to its keys' and values' gradients in order.
//! The backward recomputes the
//! probabilities (cheap next to the GEMMs; nothing of size `heads * len^2` is kept between passes)
//! and the dropout mask (a hash of the key and the element's position, see [`super::dropout`]).
//! Tasks are independent and each runs its GEMMs on one thread, so results do not depend on the
//! thread count.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use super::cuda::{self, CudaSlice, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::DropMask;
use super::gemm::{Element, MatMut, MatRef, Products, Start, Threads, product};
use super::{slice, vectorized, with_real};

/// Which keys each query sees, and how query heads share key and value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key and value heads, each serving `heads / kv_heads` consecutive query heads (grouped-query
    /// attention); as many as `heads` in multi-head attention.
    pub kv_heads: usize,
    /// Whether a query sees only the keys at or before its own position (decoders).
    pub causal: bool,
    /// The most positions a key may be from its query (local attention), if limited.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Multi-head attention over whole rows (BERT's).
    pub fn full(heads: usize) -> Self {
        Self { heads, kv_heads: heads, causal: false, window: None }
    }

    /// The keys `lo..hi` that query `i` of a row of `len` tokens sees.
    fn visible(&self, i: usize, len: usize) -> (usize, usize) {
        let (mut lo, mut hi) = (0, len);
        if let Some(w) = self.window {
            (lo, hi) = (i.saturating_sub(w), hi.min(i + w + 1));
        }
        if self.causal {
            hi = hi.min(i + 1);
        }
        (lo, hi)
    }

    /// The head width for projections `width` wide (queries, then keys and values, side by side,
    /// when `parts` counts them all), checked.
    fn head_dim(&self, op: &str, width: usize, heads_in_width: usize) -> Result<usize> {
        let fits = self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && heads_in_width > 0
            && width.is_multiple_of(heads_in_width);
        if !fits {
            candle_core::bail!(
                "{op}: width {width} does not split into {} query and {} key/value heads",
                self.heads,
                self.kv_heads
            );
        }
        Ok(width / heads_in_width)
    }
}

/// Attention over `qkv` of shape `(tokens, (heads + 2 kv_heads) * head_dim)`: each token's query,
/// key and value projections side by side (in that order), where `segments` lists each row's
/// `(start, len)` in the packed token order. Returns the context, `(tokens, heads * head_dim)`.
/// Probabilities are dropped out with probability `dropout` using mask `key`; `shape` says which
/// keys each query sees (all of its row, a window, the causal part) and how heads share keys and
/// values. On the CPU, the products take operands in `products`' precision.
pub fn attention(
    qkv: &Tensor,
    segments: Arc<Vec<(usize, usize)>>,
    shape: AttentionShape,
    dropout: f64,
    key: u64,
    products: Products,
) -> Result<Tensor> {
    let (tokens, width) = qkv.dims2()?;
    let head_dim = shape.head_dim("attention", width, shape.heads + 2 * shape.kv_heads)?;
    check_segments("attention", &segments, tokens)?;
    // Each task's first element in the dropout mask's counter space.
    let mut mask_offsets = Vec::with_capacity(segments.len());
    let mut offset = 0u64;
    for &(_, len) in segments.iter() {
        mask_offsets.push(offset);
        offset += (shape.heads * len * len) as u64;
    }
    let op = Attention {
        segments,
        mask_offsets: Arc::new(mask_offsets),
        shape,
        head_dim,
        mask: DropMask::new(dropout, key),
        products,
    };
    tape::apply1(qkv, op)
}

/// [`attention`] for each segment's first token only (BERT's `[CLS]`, all a classifier reads
/// from the last layer), for inference: `q` has one row per segment, `kv` every token's key and
/// value side by side. Each row equals the first token's row of [`attention`] without dropout, bit
/// for bit: a row of scores, its softmax and its context depend on that row's query alone. CPU
/// only, no backward.
pub fn first_token_attention(
    q: &Tensor,
    kv: &Tensor,
    segments: Arc<Vec<(usize, usize)>>,
    shape: AttentionShape,
    products: Products,
) -> Result<Tensor> {
    let (rows, q_width) = q.dims2()?;
    let (tokens, kv_width) = kv.dims2()?;
    let head_dim = shape.head_dim("first-token attention", q_width, shape.heads)?;
    if rows != segments.len() || kv_width != 2 * shape.kv_heads * head_dim {
        candle_core::bail!(
            "first-token attention: q {:?} (one row per segment of {}) and kv {:?} (keys and values side by side) do not fit",
            q.dims(),
            segments.len(),
            kv.dims()
        );
    }
    check_segments("first-token attention", &segments, tokens)?;
    let op =
        Attention { segments, mask_offsets: Arc::new(Vec::new()), shape, head_dim, mask: None, products };
    q.contiguous()?.apply_op2_no_bwd(&kv.contiguous()?, &FirstTokenAttention(op))
}

/// Segments in order, non-empty, not overlapping, inside the tokens (each task then owns its block
/// of the output: the kernels rely on it).
fn check_segments(op: &str, segments: &[(usize, usize)], tokens: usize) -> Result<()> {
    let mut end = 0;
    for &(start, len) in segments {
        if len == 0 || start < end || start + len > tokens {
            candle_core::bail!(
                "{op}: segments {segments:?} must be ordered, non-empty, disjoint and within {tokens} tokens"
            );
        }
        end = start + len;
    }
    Ok(())
}

#[derive(Clone)]
struct Attention {
    segments: Arc<Vec<(usize, usize)>>,
    mask_offsets: Arc<Vec<u64>>,
    shape: AttentionShape,
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
    /// The queries' width (and the context's): `heads * head_dim`.
    fn hidden(&self) -> usize {
        self.shape.heads * self.head_dim
    }

    /// The width of the keys (and of the values).
    fn kv_hidden(&self) -> usize {
        self.shape.kv_heads * self.head_dim
    }

    /// Elements per token of `qkv`: queries, keys and values side by side.
    fn stride(&self) -> usize {
        self.hidden() + 2 * self.kv_hidden()
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.shape.heads / self.shape.kv_heads
    }

    /// The (segment, head) of task `task` over `heads` heads, with the segment's `(start, len)`.
    fn task(&self, task: usize, heads: usize) -> (usize, usize, usize, usize) {
        let (segment, head) = (task / heads, task % heads);
        let (start, len) = self.segments[segment];
        (segment, head, start, len)
    }

    /// Offsets in `qkv` of the first token of a row starting at `start`: its query for `head`, and
    /// the key and value that head reads (its group's).
    fn qkv_bases(&self, start: usize, head: usize) -> [usize; 3] {
        let (row, kv) = (start * self.stride(), head / self.group() * self.head_dim);
        [row + head * self.head_dim, row + self.hidden() + kv, row + self.hidden() + self.kv_hidden() + kv]
    }

    /// Offset of `head`'s block of the row starting at `start` in a `(tokens, heads * head_dim)`
    /// buffer (the context and its gradient).
    fn context_base(&self, start: usize, head: usize) -> usize {
        start * self.hidden() + head * self.head_dim
    }

    /// Largest segment length (sizes the scratch buffers).
    fn max_len(&self) -> usize {
        self.segments.iter().map(|&(_, len)| len).max().unwrap_or(0)
    }

    /// The `(len, head_dim)` block at `base` of a buffer with `stride` elements per token: one
    /// task's rows of one projection.
    fn view<'a, T>(&self, m: &'a [T], stride: usize, base: usize, len: usize) -> MatRef<'a, T> {
        MatRef::new(m, base, len, self.head_dim, stride, 1)
    }

    /// The task's writable block of `buffer` (`size` elements, `stride` per token, of which the
    /// task's block starts at `base`).
    ///
    /// # Safety
    ///
    /// `buffer` points to `size` elements of which no other live reference or view covers this
    /// block; `base` and `len` come from [`Self::task`] and [`Self::qkv_bases`] or
    /// [`Self::context_base`] for a validated segment list, so the block lies inside the buffer,
    /// and distinct tasks' blocks are disjoint (segments do not overlap, heads and projections take
    /// distinct columns, and a key/value head's blocks belong to the one task of its group).
    unsafe fn block<'a, T>(
        &self,
        buffer: SharedMut<T>,
        size: usize,
        stride: usize,
        base: usize,
        len: usize,
    ) -> MatMut<'a, T> {
        debug_assert!(base + (len - 1) * stride + self.head_dim <= size);
        // SAFETY: see the function's contract; rows are `stride >= head_dim` apart.
        unsafe { MatMut::from_raw(buffer.0.add(base), len, self.head_dim, stride) }
    }

    /// `p = softmax(scale * q k^T)` of one (segment, head) into `p` (`rows x len`, row-major), for
    /// queries `qm` (`rows x head_dim`, the segment's tokens from the first on) and the segment's
    /// keys `km` (`len x head_dim`). A row's result depends on its query alone, not on the other
    /// rows. Keys the query does not see (see [`AttentionShape`]) get probability 0.
    fn probabilities<T: Element>(&self, qm: MatRef<'_, T>, km: MatRef<'_, T>, p: &mut [T]) {
        let (rows, len) = (qm.rows(), km.rows());
        product(MatMut::row_major(p, rows, len), Start::Zero, qm, km.t(), Threads::Caller, self.products);
        if self.shape.causal || self.shape.window.is_some() {
            for (i, row) in p.chunks_mut(len).enumerate() {
                let (lo, hi) = self.shape.visible(i, len);
                row[..lo].fill(T::neg_infinity());
                row[hi..].fill(T::neg_infinity());
            }
        }
        let scale = T::from_f64(1.0 / (self.head_dim as f64).sqrt());
        // The largest scaled score of each row, in any order (a maximum is exact, and a zero's
        // sign does not change `s - max` for any `s`), so that it vectorises.
        let mut max = vec![T::zero(); rows];
        vectorized!({
            for (m, row) in max.iter_mut().zip(p.chunks(len)) {
                // Sixteen lanes, then across them.
                let mut lanes = [T::neg_infinity(); 16];
                let mut chunks = row.chunks_exact(16);
                for chunk in &mut chunks {
                    for (l, &s) in lanes.iter_mut().zip(chunk) {
                        *l = num_traits::Float::max(*l, s * scale);
                    }
                }
                for (l, &s) in lanes.iter_mut().zip(chunks.remainder()) {
                    *l = num_traits::Float::max(*l, s * scale);
                }
                *m = lanes.into_iter().fold(T::neg_infinity(), num_traits::Float::max);
            }
        });
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

    /// A `(tokens, width)` output that the tasks write whole for every token inside a segment: its
    /// other tokens' rows zeroed, the rest left unwritten (zero-filling it all first cost a pass
    /// over the output per layer).
    fn output<T: Element>(&self, tokens: usize, width: usize) -> Vec<T> {
        let mut out: Vec<T> = Vec::with_capacity(tokens * width);
        let mut next = 0;
        let gaps = self.segments.iter().map(|&(start, len)| (start, start + len)).chain([(tokens, tokens)]);
        for (start, end) in gaps {
            // SAFETY: rows `next..start` lie inside the capacity (segments are checked to lie
            // inside the tokens, in order).
            unsafe { out.as_mut_ptr().add(next * width).write_bytes(0, (start - next) * width) };
            next = end;
        }
        out
    }

    /// The context `(tokens, hidden)` of `qkv` (`(tokens, stride)`).
    fn forward<T: Element>(&self, qkv: &[T]) -> Vec<T> {
        let (hidden, stride) = (self.hidden(), self.stride());
        let size = qkv.len() / stride * hidden;
        let mut out = self.output::<T>(qkv.len() / stride, hidden);
        let dst = SharedMut(out.as_mut_ptr());
        let scratch = self.max_len() * self.max_len();
        let heads = self.shape.heads;
        (0..self.segments.len() * heads).into_par_iter().for_each_init(
            || vec![T::zero(); scratch],
            |p, task| {
                let (segment, head, start, len) = self.task(task, heads);
                let [q, k, v] = self.qkv_bases(start, head).map(|base| self.view(qkv, stride, base, len));
                let p = &mut p[..len * len];
                self.probabilities(q, k, p);
                if let Some(mask) = &self.mask {
                    mask.apply_in_place(self.mask_start(segment, head, len), p);
                }
                // SAFETY: `out` outlives the loop and is only written through tasks' blocks.
                let context = unsafe { self.block(dst, size, hidden, self.context_base(start, head), len) };
                product(
                    context,
                    Start::Zero,
                    MatRef::row_major(p, len, len),
                    v,
                    Threads::Caller,
                    self.products,
                );
            },
        );
        // SAFETY: every segment's (row, head) blocks were written by its task, the other rows
        // zeroed by `output`.
        unsafe { out.set_len(size) };
        out
    }

    /// The gradient of `qkv` (`(tokens, stride)`) for the context's gradient `g` `(tokens, hidden)`.
    /// A task is a (segment, key/value head): its query heads in order, each adding its share to
    /// the keys' and values' gradients (the first writes them), so the sums have one order.
    fn backward<T: Element>(&self, qkv: &[T], g: &[T]) -> Vec<T> {
        let (hidden, stride) = (self.hidden(), self.stride());
        let size = qkv.len();
        let mut out = self.output::<T>(size / stride, stride);
        let dst = SharedMut(out.as_mut_ptr());
        let scale = T::from_f64(1.0 / (self.head_dim as f64).sqrt());
        let scratch = self.max_len() * self.max_len();
        let kv_heads = self.shape.kv_heads;
        (0..self.segments.len() * kv_heads).into_par_iter().for_each_init(
            || [(); 4].map(|_| vec![T::zero(); scratch]),
            |[p, dropped, dp, factors], task| {
                let (segment, kv_head, start, len) = self.task(task, kv_heads);
                let (p, dropped, dp) = (&mut p[..len * len], &mut dropped[..len * len], &mut dp[..len * len]);
                for (n, head) in (kv_head * self.group()..(kv_head + 1) * self.group()).enumerate() {
                    let bases = self.qkv_bases(start, head);
                    let [q, k, v] = bases.map(|base| self.view(qkv, stride, base, len));
                    self.probabilities(q, k, p);
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
                    let g_block = self.view(g, hidden, self.context_base(start, head), len);
                    // SAFETY: `out` outlives the loop and is only written through tasks' blocks:
                    // this head's queries, and this task's group's keys and values.
                    let (dq, dk, dv) = unsafe {
                        (
                            self.block(dst, size, stride, bases[0], len),
                            self.block(dst, size, stride, bases[1], len),
                            self.block(dst, size, stride, bases[2], len),
                        )
                    };
                    // The group's first head writes the keys' and values' gradients; the others add.
                    let add = n > 0;
                    // dv = dropped^T g
                    let dropped_t = MatRef::row_major(&*dropped, len, len).t();
                    product(dv, Start::accumulate(add), dropped_t, g_block, Threads::Caller, self.products);
                    // d dropped = g v^T, then through the dropout mask
                    let d_dropped = MatMut::row_major(dp, len, len);
                    product(d_dropped, Start::Zero, g_block, v.t(), Threads::Caller, self.products);
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
                    product(dq, Start::Zero, ds, k, Threads::Caller, self.products);
                    product(dk, Start::accumulate(add), ds.t(), q, Threads::Caller, self.products);
                }
            },
        );
        // SAFETY: every segment's queries, keys and values were written by the tasks (each
        // group's first head writes its keys and values), the other rows zeroed by `output`.
        unsafe { out.set_len(size) };
        out
    }
}

/// The op behind [`first_token_attention`].
struct FirstTokenAttention(Attention);

impl FirstTokenAttention {
    fn forward<T: Element>(&self, q: &[T], kv: &[T]) -> Vec<T> {
        let op = &self.0;
        let (hidden, kv_hidden) = (op.hidden(), op.kv_hidden());
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedMut(out.as_mut_ptr());
        let heads = op.shape.heads;
        (0..op.segments.len() * heads).into_par_iter().for_each_init(
            || vec![T::zero(); op.max_len()],
            |p, task| {
                let (segment, head, start, len) = op.task(task, heads);
                let p = &mut p[..len];
                let query = op.view(q, hidden, segment * hidden + head * op.head_dim, 1);
                let kv_base = start * 2 * kv_hidden + head / op.group() * op.head_dim;
                let keys = op.view(kv, 2 * kv_hidden, kv_base, len);
                let values = op.view(kv, 2 * kv_hidden, kv_base + kv_hidden, len);
                op.probabilities(query, keys, p);
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
                product(context, Start::Zero, weights, values, Threads::Caller, op.products);
            },
        );
        out
    }
}

impl CustomOp2 for FirstTokenAttention {
    fn name(&self) -> &'static str {
        "first-token-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        kvs: &CpuStorage,
        kvl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("first-token attention", qs, T => {
            let q = slice::<T>("first-token attention", qs, ql)?;
            let kv = slice::<T>("first-token attention", kvs, kvl)?;
            Ok((T::to_cpu_storage_owned(self.forward(q, kv)), ql.shape().clone()))
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
        self.segments.len() * self.shape.heads * lay.len * self.head_dim
    }

    /// The padded layout of a `(tokens, hidden)` block of `src`, whose tokens are `stride` elements
    /// apart (`src` starts at the block's first element).
    fn pad<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        src: &cuda::CudaView<'_, T>,
        stride: usize,
    ) -> Result<CudaSlice<T>> {
        let total = self.padded_size(lay);
        let mut dst = cuda::alloc::<T>(dev, total)?;
        let kernel = cuda::Kernel::typed::<T>(dev, "attn_pad")?;
        let mut args = kernel.args();
        let (h, l, d) = (self.shape.heads as i32, lay.len as i32, self.head_dim as i32);
        args.arg(src)
            .arg(&mut dst)
            .arg(&lay.starts)
            .arg(&lay.lens)
            .arg(&h)
            .arg(&l)
            .arg(&d)
            .arg(&stride)
            .arg(&total);
        cuda::launch(args, cuda::elementwise(total))?;
        Ok(dst)
    }

    /// [`Self::pad`] backwards: writes the real rows of `src` into `dst`'s block.
    fn unpad<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        src: &CudaSlice<T>,
        dst: &mut cuda::CudaViewMut<'_, T>,
        stride: usize,
    ) -> Result<()> {
        let total = self.padded_size(lay);
        let kernel = cuda::Kernel::typed::<T>(dev, "attn_unpad")?;
        let mut args = kernel.args();
        let (h, l, d) = (self.shape.heads as i32, lay.len as i32, self.head_dim as i32);
        args.arg(src)
            .arg(dst)
            .arg(&lay.starts)
            .arg(&lay.lens)
            .arg(&h)
            .arg(&l)
            .arg(&d)
            .arg(&stride)
            .arg(&total);
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
        self.segments.len() * self.shape.heads
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
        let (h, li, scale, rows) = (self.shape.heads as i32, l as i32, self.scale(), self.pairs() * l);
        // -1: no window (a window as wide as the longest row is none either).
        let window = self.shape.window.map_or(-1, |w| w.min(l) as i32);
        let causal = i32::from(self.shape.causal);
        args.arg(&mut p).arg(&mut pd).arg(&lay.lens).arg(&lay.offsets).arg(&h).arg(&li).arg(&scale);
        args.arg(&key).arg(&threshold).arg(&drop_scale).arg(&window).arg(&causal).arg(&rows);
        cuda::launch(args, cuda::warp_rows(rows))?;
        Ok((p, pd))
    }

    /// q, k and v of `qkv` `(tokens, 3 hidden)` in the padded layout.
    fn pad_qkv<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        lay: &DeviceLayout,
        qkv: &cuda::CudaView<'_, T>,
    ) -> Result<[CudaSlice<T>; 3]> {
        let hidden = self.hidden();
        let part = |i: usize| self.pad(dev, lay, &qkv.slice(i * hidden..), 3 * hidden);
        Ok([part(0)?, part(1)?, part(2)?])
    }

    fn forward_cuda<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        qkv: &cuda::CudaView<'_, T>,
    ) -> Result<CudaSlice<T>>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let lay = self.device_layout(dev)?;
        let [qp, kp, vp] = self.pad_qkv(dev, &lay, qkv)?;
        let (_, pd) = self.probabilities_cuda(dev, &lay, &qp, &kp)?;
        let (l, d) = (lay.len, self.head_dim);
        let product = cuda::Product { batch: self.pairs(), ..cuda::Product::new(l, d, l) };
        let context = product.output(dev, &pd.as_view(), &vp.as_view())?;
        let mut out = dev.alloc_zeros::<T>(qkv.len() / 3)?;
        self.unpad(dev, &lay, &context, &mut out.as_view_mut(), self.hidden())?;
        Ok(out)
    }

    /// The gradient of `qkv`, as the CPU's backward.
    fn backward_cuda<T: cuda::Float>(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        qkv: &cuda::CudaView<'_, T>,
        g: &cuda::CudaView<'_, T>,
    ) -> Result<CudaSlice<T>>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let lay = self.device_layout(dev)?;
        let [qp, kp, vp] = self.pad_qkv(dev, &lay, qkv)?;
        let gp = self.pad(dev, &lay, g, self.hidden())?;
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
            let (h, li, scale, rows) = (self.shape.heads as i32, l as i32, self.scale(), pairs * l);
            args.arg(&p).arg(&mut ds).arg(&lay.lens).arg(&lay.offsets).arg(&h).arg(&li).arg(&scale);
            args.arg(&key).arg(&threshold).arg(&drop_scale).arg(&rows);
            cuda::launch(args, cuda::warp_rows(rows))?;
        }
        // dq = ds k ; dk = ds^T q
        let dqp = product(l, d, l).output(dev, &ds.as_view(), &kp.as_view())?;
        let dkp = cuda::Product { ta: true, ..product(l, d, l) }.output(dev, &ds.as_view(), &qp.as_view())?;
        let hidden = self.hidden();
        let mut out = dev.alloc_zeros::<T>(qkv.len())?;
        for (i, part) in [dqp, dkp, dvp].iter().enumerate() {
            self.unpad(dev, &lay, part, &mut out.slice_mut(i * hidden..), 3 * hidden)?;
        }
        Ok(out)
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let tokens = l.shape().dims2()?.0;
        with_real!("attention", s, T => {
            let qkv = slice::<T>("attention", s, l)?;
            Ok((T::to_cpu_storage_owned(self.forward(qkv)), Shape::from((tokens, self.hidden()))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        if self.shape.kv_heads != self.shape.heads {
            candle_core::bail!("attention: grouped-query attention runs on the CPU only for now");
        }
        let tokens = l.shape().dims2()?.0;
        let dev = cuda::device(s);
        cuda::with_float!("attention", s, T => {
            let qkv = cuda::input::<T>("attention", s, l)?;
            Ok((cuda::storage(dev, self.forward_cuda(dev, &qkv)?), Shape::from((tokens, self.hidden()))))
        })
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &AttentionBackward(self.clone()))?))
    }
}

/// The backward pass as a no-backward op over `qkv` and the context's gradient.
struct AttentionBackward(Attention);

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("attention-backward", s, T => {
            let (qkv, g) = (slice::<T>("attention-backward", s, l)?, slice::<T>("attention-backward", gs, gl)?);
            Ok((T::to_cpu_storage_owned(self.0.backward(qkv, g)), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(s);
        cuda::with_float!("attention-backward", s, T => {
            let qkv = cuda::input::<T>("attention-backward", s, l)?;
            let g = cuda::input::<T>("attention-backward", gs, gl)?;
            Ok((cuda::storage(dev, self.0.backward_cuda(dev, &qkv, &g)?), l.shape().clone()))
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

    /// The textbook composition, row by row and head by head (query head `h` reading key/value
    /// head `h / group`), with the scores of keys the query does not see masked to -inf.
    #[allow(clippy::disallowed_methods)] // candle as the reference
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape) -> Tensor {
        let hd = WIDTH / HEADS;
        let group = shape.heads / shape.kv_heads;
        let mut rows = Vec::new();
        for &(start, len) in segments().iter() {
            let mut heads = Vec::new();
            for h in 0..shape.heads {
                let part =
                    |t: &Tensor, h: usize| t.narrow(0, start, len).unwrap().narrow(1, h * hd, hd).unwrap();
                let (qh, kh, vh) = (part(q, h), part(k, h / group), part(v, h / group));
                let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
                let hidden = |i: usize, j: usize| {
                    shape.window.is_some_and(|w| i.abs_diff(j) > w) || (shape.causal && j > i)
                };
                let mask: Vec<f64> = (0..len * len)
                    .map(|n| if hidden(n / len, n % len) { f64::NEG_INFINITY } else { 0.0 })
                    .collect();
                let scores = (scores + Tensor::from_vec(mask, (len, len), q.device()).unwrap()).unwrap();
                let e = scores.broadcast_sub(&scores.max_keepdim(1).unwrap()).unwrap().exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
                heads.push(p.matmul(&vh).unwrap());
            }
            rows.push(Tensor::cat(&heads, 1).unwrap());
        }
        Tensor::cat(&rows, 0).unwrap()
    }

    /// Every kind of attention the op runs: whole rows, windows, causal, grouped-query (two query
    /// heads sharing one key/value head), and the last two together.
    fn shapes() -> Vec<AttentionShape> {
        let full = AttentionShape::full(HEADS);
        let mut shapes = vec![full, AttentionShape { causal: true, ..full }];
        shapes.extend([0, 1, 2].map(|w| AttentionShape { window: Some(w), ..full }));
        let grouped = AttentionShape { kv_heads: 1, ..full };
        shapes.extend([grouped, AttentionShape { causal: true, window: Some(1), ..grouped }]);
        shapes
    }

    fn qkv() -> (Tensor, Tensor, Tensor) {
        qkv_for(HEADS)
    }

    /// The op's input: q, k and v side by side.
    fn side_by_side(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        Tensor::cat(&[q, k, v], 1).unwrap()
    }

    /// Queries, and keys and values for `kv_heads` heads.
    fn qkv_for(kv_heads: usize) -> (Tensor, Tensor, Tensor) {
        let kv_width = kv_heads * WIDTH / HEADS;
        (input(&[5, WIDTH], 1), input(&[5, kv_width], 2), input(&[5, kv_width], 3))
    }

    #[test]
    fn overlapping_out_of_range_or_mismatched_inputs_are_refused() {
        // Each task owns its rows' block of the output: overlapping segments would alias it.
        let (q, k, v) = qkv();
        let qkv = side_by_side(&q, &k, &v);
        for segments in [vec![(0, 3), (2, 2)], vec![(3, 3)], vec![(0, 0)], vec![(3, 2), (0, 3)]] {
            assert!(
                attention(
                    &qkv,
                    Arc::new(segments.clone()),
                    AttentionShape::full(HEADS),
                    0.0,
                    0,
                    Products::Full
                )
                .is_err(),
                "{segments:?}"
            );
        }
        let ragged = input(&[5, 3 * WIDTH - 1], 9);
        assert!(
            attention(&ragged, segments(), AttentionShape::full(HEADS), 0.0, 0, Products::Full).is_err(),
            "not three projections"
        );
        assert!(
            attention(&qkv, segments(), AttentionShape::full(4), 0.0, 0, Products::Full).is_err(),
            "width 6 in 4 heads"
        );
        let kv = Tensor::cat(&[&k, &v], 1).unwrap();
        assert!(
            first_token_attention(&q, &kv, segments(), AttentionShape::full(HEADS), Products::Full).is_err(),
            "q for every token"
        );
    }

    #[test]
    fn matches_the_textbook_composition_for_every_shape() -> Result<()> {
        for shape in shapes() {
            let (q, k, v) = qkv_for(shape.kv_heads);
            let want = reference(&q, &k, &v, shape);
            let got = attention(&side_by_side(&q, &k, &v), segments(), shape, 0.0, 0, Products::Full)?;
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{shape:?}: {diff}");
            // The first token of each row alone, from its query and every key and value.
            let first = Tensor::cat(&[q.get(0)?, q.get(3)?], 0)?.reshape((2, WIDTH))?;
            let kv = Tensor::cat(&[&k, &v], 1)?;
            let got = first_token_attention(&first, &kv, segments(), shape, Products::Full)?;
            let want = Tensor::cat(&[want.get(0)?, want.get(3)?], 0)?.reshape((2, WIDTH))?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{shape:?}, first tokens: {diff}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_for_every_shape_with_and_without_dropout() {
        for shape in shapes() {
            let (q, k, v) = qkv_for(shape.kv_heads);
            for p in [0.0, 0.3] {
                check_grad(&side_by_side(&q, &k, &v), |qkv| {
                    attention(qkv, segments(), shape, p, 5, Products::Full).unwrap()
                });
            }
        }
    }
}
