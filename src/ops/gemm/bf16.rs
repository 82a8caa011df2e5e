//! Matrix products with bf16 operands and f32 accumulation, with one result on every CPU.
//!
//! # The contract
//!
//! Both operands are rounded to bf16 ([`to_bf16`]: round to nearest even; a result below bf16's
//! smallest normal becomes a zero of the same sign). The steps of `k` go in pairs (`k` rounded
//! up to even with zeros), and every element of `C` is one chain:
//!
//! ```text
//! c = daz(C[i][j])  (or +0.0, or daz(row[j]): see super::Start)
//! for q in 0..k/2:
//!     c = ftz(fma(A[i][2q+1], B[2q+1][j], c))     // the odd step of the pair first
//!     c = ftz(fma(A[i][2q],   B[2q][j],   c))
//! ```
//!
//! where `daz` and `ftz` turn a subnormal f32 into a zero of the same sign (`ftz` judges the
//! rounded result). That is exactly what AVX-512 BF16's `VDPBF16PS` computes per lane (Intel's
//! pseudocode: two f32 FMAs, odd element first, subnormal inputs as zero, subnormal results
//! flushed, round to nearest even, MXCSR ignored); a bf16 product is exact in f32, so each step
//! is an FMA. CPUs with the instruction ([`KernelPath::Avx512Bf16`]) run it natively; every other
//! path runs the chain above as plain code (vectorised where it can be), with the same bits. The
//! tests check the two against each other, thread counts and blockings.
//!
//! The packed layouts put a pair in one 32-bit word (low half the even step), as the instruction
//! reads it: `B`'s column panels as `[q][j]` words; `A`'s row panels as `[i][q]` when `A`'s rows
//! are contiguous (a row's pairs are then its steps converted in place, no transposition) and as
//! `[q][i]` otherwise (a transposed `A`'s pairs of columns fill one step across the rows). The
//! kernels read `A` through an [`APanel`]'s two strides, so both layouts feed the same chain.

use rayon::prelude::*;

use super::{MC, MatMut, MatRef, NC, PARALLEL_WORK, Start, Threads, with_scratch};
use crate::ops::cpu::{KernelPath, kernel_path};
use crate::ops::vectorized;

/// `x` rounded to bf16 (the high 16 bits of an f32), to nearest even; NaN stays a (quiet) NaN and
/// a subnormal result becomes a zero of the same sign. Branch-free, so that packing loops
/// vectorise.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let normal = if rounded & 0x7f80 == 0 { rounded & 0x8000 } else { rounded };
    if x.is_nan() { ((bits >> 16) | 0x40) as u16 } else { normal }
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits(u32::from(x) << 16)
}

/// A subnormal `x` as a zero of the same sign (the instruction's input and output rule).
#[inline(always)]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { f32::from_bits(x.to_bits() & 0x8000_0000) } else { x }
}

/// Two bf16 steps of `k` in one word, low half first.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(to_bf16(even)) | (u32::from(to_bf16(odd)) << 16)
}

/// Where a packed row panel of `A` lies: the word of row `i` and pair `q` at `ptr + q * step + i *
/// row` (`[q][i]`: `step = MR, row = 1`; `[i][q]`: `step = 1`, `row` the panel's pairs).
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const u32,
    step: usize,
    row: usize,
}

impl APanel {
    /// The panel from pair `q0` on.
    fn at_pair(self, q0: usize) -> Self {
        // `wrapping_add`: nothing is read here; callers keep `q0` within the panel.
        APanel { ptr: self.ptr.wrapping_add(q0 * self.step), ..self }
    }
}

/// A bf16 micro-kernel over a full `MR x NR` tile: `kq` pairs from the packed panels `a` and `b`
/// (`[q][NR]`), `c` with row stride `rs_c`, chains from `start` (a [`Start::Row`] of at least the
/// tile's width).
type TileFn = unsafe fn(kq: usize, a: APanel, b: *const u32, c: *mut f32, rs_c: usize, start: Start<'_, f32>);

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    run: TileFn,
}

/// The largest `MR * NR` of any kernel (the scratch tile for edges).
const MAX_TILE: usize = 12 * 32;

impl Kernel {
    fn for_path(path: KernelPath) -> Self {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Bf16 => Kernel { mr: 12, nr: 32, run: x86::native },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => Kernel { mr: 8, nr: 32, run: x86::emulated_avx512 },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Kernel { mr: 4, nr: 16, run: x86::emulated_avx2 },
            _ => Kernel { mr: 4, nr: 8, run: emulated::<4, 8> },
        }
    }

    /// Runs the kernel on a tile of which only `rows x cols` lie inside `C`, as
    /// [`super::kernels::Kernel::run_tile`] does.
    ///
    /// # Safety
    ///
    /// `a` and `b` address `kq` pairs of full panels; the `rows x cols` elements at
    /// `c + r * rs_c + j` are valid and accessed by no one else; `rows <= mr`, `cols <= nr`; a
    /// [`Start::Row`] holds at least `cols` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_tile(
        &self,
        kq: usize,
        a: APanel,
        b: *const u32,
        c: *mut f32,
        rs_c: usize,
        rows: usize,
        cols: usize,
        start: Start<'_, f32>,
    ) {
        if rows == self.mr && cols == self.nr {
            // SAFETY: the caller's contract covers the whole tile.
            unsafe { (self.run)(kq, a, b, c, rs_c, start) };
            return;
        }
        let mut tile = [0f32; MAX_TILE];
        let tile = &mut tile[..self.mr * self.nr];
        // SAFETY: the rows x cols block at `c` is valid (the caller's contract).
        unsafe { start.fill_tile(tile, self.nr, c, rs_c, rows, cols) };
        // SAFETY: `tile` is a full tile with row stride nr.
        unsafe { (self.run)(kq, a, b, tile.as_mut_ptr(), self.nr, start.in_scratch()) };
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: as above.
                unsafe { *c.add(r * rs_c + j) = tile[r * self.nr + j] };
            }
        }
    }
}

/// `c = [start +] a b` under the contract of the module doc, on the process's kernel path.
pub(crate) fn gemm_bf16(
    c: MatMut<'_, f32>,
    start: Start<'_, f32>,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    threads: Threads,
) {
    gemm_bf16_on(kernel_path(), KC_PAIRS, 0, c, start, a, b, threads);
}

/// Pairs of steps per pass over a task's tiles. Deeper than the f32 GEMM's [`super::KC`] (256 steps):
/// at 1024 pairs a weight gradient (4096 steps) takes two passes instead of sixteen, and a dense
/// bf16 training step ran 4% faster (medians of 8 alternated runs, 588 -> 564 ms; 2048 pairs
/// gained nothing more), where the f32 step ran 1.6% slower at 1024 steps than at 256.
const KC_PAIRS: usize = 1024;

/// A pointer handed to tasks that write disjoint tiles of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles of an exclusively borrowed `MatMut`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// [`gemm_bf16`] on `path`, with `kc` pairs per pass and `chunk` pairs per packed chunk (0: as
/// many passes as fit [`super::CHUNK_BYTES`] of packed `B`; the tests vary all three).
#[allow(clippy::too_many_arguments)]
fn gemm_bf16_on(
    path: KernelPath,
    kc: usize,
    chunk: usize,
    mut c: MatMut<'_, f32>,
    start: Start<'_, f32>,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    threads: Threads,
) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "gemm_bf16: {m}x{n} = {}x{} * {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    let kernel = Kernel::for_path(path);
    let (mr, nr) = (kernel.mr, kernel.nr);
    let (row_panels, col_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let parallel = threads == Threads::Pool && m * n * k >= PARALLEL_WORK && rayon::current_num_threads() > 1;

    // A chunk of pairs at a time, both operands packed per chunk (see `super::CHUNK_BYTES`); the
    // chains go on through `C` from one chunk to the next, as from one pass of `kc` to the next.
    let chunk = match chunk {
        0 => super::chunk_steps(kc.max(1), col_panels * nr * size_of::<u32>()),
        chunk => chunk,
    };
    let chunk_q = chunk.min(k.div_ceil(2)).max(1);
    let (a_len, b_len) = (row_panels * chunk_q * mr, col_panels * chunk_q * nr);
    with_scratch(a_len + b_len, |scratch: &mut [u32]| {
        let mut p0 = 0;
        // At least one chunk, so that `k == 0` still writes (or flushes) C.
        loop {
            let steps = (2 * chunk_q).min(k - p0);
            let (a, b) = (a.col_range(p0, steps), b.row_range(p0, steps));
            let kq = steps.div_ceil(2);
            let (packed_a, rest) = scratch.split_at_mut(row_panels * kq * mr);
            let packed_b = &mut rest[..col_panels * kq * nr];
            let layout = pack(&a, &b, kernel, packed_a, packed_b, parallel);
            let panels = Panels { a: packed_a, b: packed_b, layout, kq };
            let start = if p0 == 0 { start } else { Start::Load };
            run_tiles(kernel, kc, c.reborrow(), start, &panels, parallel);
            p0 += steps;
            if p0 >= k {
                break;
            }
        }
    });
}

/// The packed operands of a product: `A`'s row panels (each pair of row `i`, pair `q` at
/// `q * step + i * row` of its panel, see [`APanel`]) and `B`'s column panels (`[q][nr]`).
struct Panels<'a> {
    a: &'a [u32],
    b: &'a [u32],
    /// `A`'s panel layout: `(step, row)`.
    layout: (usize, usize),
    kq: usize,
}

/// Packs `a` and `b` into `packed_a` and `packed_b` (every word written: they are reused scratch),
/// and returns `A`'s panel layout.
fn pack(
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, f32>,
    kernel: Kernel,
    packed_a: &mut [u32],
    packed_b: &mut [u32],
    parallel: bool,
) -> (usize, usize) {
    let (mr, nr, k) = (kernel.mr, kernel.nr, a.cols);
    let kq = k.div_ceil(2);
    // `A` as `[i][q]` when its rows are contiguous (each row's pairs converted in place), else
    // `[q][i]`.
    let rows_contiguous = a.cs == 1;
    if kq > 0 {
        // An operand whose steps are contiguous (a transposed `A`, as in a weight gradient, and a
        // row-major `B`) is packed step by step across its panels; others panel by panel.
        if !rows_contiguous && a.rs == 1 {
            pack_steps(a.data, a.offset, a.cs, a.rows, k, mr, packed_a, parallel);
        } else {
            // Compiled for the kernel path's vector instructions a panel at a time (or all at
            // once): in a small product (a head of attention) a dispatch per row cost as much as
            // converting the row.
            match parallel {
                true => packed_a
                    .par_chunks_mut(kq * mr)
                    .enumerate()
                    .for_each(|(pi, dst)| vectorized!({ pack_rows(a, pi * mr, mr, rows_contiguous, dst) })),
                false => vectorized!({
                    for (pi, dst) in packed_a.chunks_mut(kq * mr).enumerate() {
                        pack_rows(a, pi * mr, mr, rows_contiguous, dst)
                    }
                }),
            }
        }
        if b.cs == 1 {
            pack_steps(b.data, b.offset, b.rs, b.cols, k, nr, packed_b, parallel);
        } else {
            match parallel {
                true => packed_b
                    .par_chunks_mut(kq * nr)
                    .enumerate()
                    .for_each(|(pj, dst)| vectorized!({ pack_cols(b, pj * nr, nr, dst) })),
                false => vectorized!({
                    for (pj, dst) in packed_b.chunks_mut(kq * nr).enumerate() {
                        pack_cols(b, pj * nr, nr, dst)
                    }
                }),
            }
        }
    }
    if rows_contiguous { (1, kq) } else { (mr, 1) }
}

/// The tiles of `c = [c +] a b` from the packed panels, in tasks of [`MC`] x [`NC`], `kc` pairs per
/// pass.
fn run_tiles(
    kernel: Kernel,
    kc: usize,
    c: MatMut<'_, f32>,
    start: Start<'_, f32>,
    panels: &Panels<'_>,
    parallel: bool,
) {
    let (m, n, kq) = (c.rows, c.cols, panels.kq);
    let (mr, nr) = (kernel.mr, kernel.nr);
    let (row_panels, col_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let (a_step, a_row) = panels.layout;
    let (packed_a, packed_b) = (panels.a, panels.b);
    let (mc_tiles, nc_tiles) = (MC.div_ceil(mr), NC / nr);
    let (row_tasks, col_tasks) = (row_panels.div_ceil(mc_tiles), col_panels.div_ceil(nc_tiles));
    let (out, rs_c) = (Out(c.ptr), c.rs);
    let kc = kc.max(1);
    let task = |t: usize| {
        let (ti, tj) = (t / col_tasks, t % col_tasks);
        let mut q0 = 0;
        // At least one pass, so that `k == 0` still writes (or flushes) C.
        loop {
            let steps = kc.min(kq - q0);
            for pi in ti * mc_tiles..((ti + 1) * mc_tiles).min(row_panels) {
                let ap =
                    APanel { ptr: packed_a[pi * kq * mr..].as_ptr(), step: a_step, row: a_row }.at_pair(q0);
                for pj in tj * nc_tiles..((tj + 1) * nc_tiles).min(col_panels) {
                    let bp = packed_b[(pj * kq + q0) * nr..].as_ptr();
                    let (r0, c0) = (pi * mr, pj * nr);
                    // SAFETY: the tile lies inside the output and belongs to this task alone; the
                    // panels hold `steps` pairs from `q0`.
                    unsafe {
                        kernel.run_tile(
                            steps,
                            ap,
                            bp,
                            out.ptr().add(r0 * rs_c + c0),
                            rs_c,
                            mr.min(m - r0),
                            nr.min(n - c0),
                            if q0 == 0 { start.at_column(c0) } else { Start::Load },
                        )
                    };
                }
            }
            q0 += steps;
            if q0 >= kq {
                break;
            }
        }
    };
    if parallel {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * col_tasks).for_each(task);
    }
}

/// Rows `r0..` (at most `mr`) of `a`, zero-padded (every word of `dst` written): as `[i][q]` pairs
/// when `rows_contiguous` (`a`'s rows are: each row's pairs in place), else as `[q][mr]`.
#[inline(always)]
fn pack_rows(a: &MatRef<'_, f32>, r0: usize, mr: usize, rows_contiguous: bool, dst: &mut [u32]) {
    let (rows, k) = (mr.min(a.rows - r0), a.cols);
    let kq = k.div_ceil(2);
    if rows_contiguous {
        for i in 0..rows {
            let start = a.offset + (r0 + i) * a.rs;
            pairs_of(&a.data[start..start + k], &mut dst[i * kq..(i + 1) * kq]);
        }
        dst[rows * kq..].fill(0);
    } else {
        for q in 0..kq {
            for i in 0..rows {
                let odd = if 2 * q + 1 < k { a.at(r0 + i, 2 * q + 1) } else { 0.0 };
                dst[q * mr + i] = pair(a.at(r0 + i, 2 * q), odd);
            }
            dst[q * mr + rows..(q + 1) * mr].fill(0);
        }
    }
}

/// Columns `c0..` (at most `nr`) of `b` as `[q][nr]` pairs, zero-padded (every word of `dst`
/// written); a row-major `b` goes through [`pack_steps`].
#[inline(always)]
fn pack_cols(b: &MatRef<'_, f32>, c0: usize, nr: usize, dst: &mut [u32]) {
    let (cols, k) = (nr.min(b.cols - c0), b.rows);
    let kq = k.div_ceil(2);
    if b.rs == 1 {
        // Columns contiguous (a transposed weight; attention's keys and values): a column's
        // pairs converted at once, then spread over the steps.
        const RUN: usize = 64;
        let mut column_pairs = [0u32; RUN];
        for q0 in (0..kq).step_by(RUN) {
            let pairs = RUN.min(kq - q0);
            for j in 0..cols {
                let start = b.offset + (c0 + j) * b.cs + 2 * q0;
                let steps = (2 * pairs).min(k - 2 * q0);
                pairs_of(&b.data[start..start + steps], &mut column_pairs[..pairs]);
                for (q, &w) in column_pairs[..pairs].iter().enumerate() {
                    dst[(q0 + q) * nr + j] = w;
                }
            }
        }
    } else {
        for q in 0..kq {
            for j in 0..cols {
                let odd = if 2 * q + 1 < k { b.at(2 * q + 1, c0 + j) } else { 0.0 };
                dst[q * nr + j] = pair(b.at(2 * q, c0 + j), odd);
            }
        }
    }
    // A ragged panel's padding.
    if cols < nr {
        dst.chunks_mut(nr).for_each(|step| step[cols..].fill(0));
    }
}

/// The `k` steps of an operand whose steps are contiguous (step `p`'s `len` elements from
/// `offset + p * stride`: a transposed `A`'s columns, a row-major `B`'s rows) as panels of `w`
/// elements, each `[q][w]` pairs, zero-padded (a ragged last panel, an odd `k`'s last step; every
/// word of `dst` written). Panel by panel, a panel's piece of each step is a few dozen bytes of a line
/// kilobytes away from the next step's, read again for every panel: that cost half of a weight
/// gradient's product. Here a block of steps is converted across a group of panels at once, each
/// step's piece read once, in order, and the pairs copied out to the panels from L1.
#[allow(clippy::too_many_arguments)]
fn pack_steps(
    data: &[f32],
    offset: usize,
    stride: usize,
    len: usize,
    k: usize,
    w: usize,
    dst: &mut [u32],
    parallel: bool,
) {
    /// Elements of a step per group of panels (at most), and pairs per block: a block's pairs
    /// (16 KiB) stay in L1 while they are copied out.
    const GROUP: usize = 256;
    const BLOCK: usize = 16;
    let kq = k.div_ceil(2);
    // Groups small enough for four per thread, so that the threads finish together.
    let tasks = if parallel { 4 * rayon::current_num_threads() } else { 1 };
    let panels_per_group = (GROUP / w).min(len.div_ceil(w).div_ceil(tasks)).max(1);
    let pack_group = |(g, dst): (usize, &mut [u32])| {
        let c0 = g * panels_per_group * w;
        let span = (len - c0).min(panels_per_group * w);
        let source = Steps { data, offset, stride, c0, span, k };
        if span == w {
            // One whole panel (a head of attention's keys or values): its layout is the lines',
            // so the pairs go straight into it.
            vectorized!({ source.convert(0, dst) });
            return;
        }
        let mut pairs = vec![0u32; BLOCK * span];
        for q0 in (0..kq).step_by(BLOCK) {
            let steps = BLOCK.min(kq - q0);
            // One vector dispatch per block, not per step: a head of attention's operands have
            // steps of 32 elements, where a dispatch per step cost as much as the conversion.
            vectorized!({ source.convert(q0, &mut pairs[..steps * span]) });
            for (x, panel) in dst.chunks_mut(kq * w).enumerate() {
                let cols = w.min(span - x * w);
                let panel = &mut panel[q0 * w..(q0 + steps) * w];
                // The native and AVX-512 kernels' panel widths (`MR` 12, `NR` 32) by fixed copies.
                match (w, cols) {
                    (12, 12) => copy_out::<12>(panel, &pairs[x * w..], span),
                    (32, 32) => copy_out::<32>(panel, &pairs[x * w..], span),
                    _ => {
                        for (qq, step) in panel.chunks_exact_mut(w).enumerate() {
                            step[..cols].copy_from_slice(&pairs[qq * span + x * w..][..cols]);
                            step[cols..].fill(0);
                        }
                    }
                }
            }
        }
    };
    if parallel {
        dst.par_chunks_mut(panels_per_group * kq * w).enumerate().for_each(pack_group);
    } else {
        dst.chunks_mut(panels_per_group * kq * w).enumerate().for_each(pack_group);
    }
}

/// A group of columns `c0..c0 + span` of the contiguous steps that [`pack_steps`] packs.
#[derive(Clone, Copy)]
struct Steps<'a> {
    data: &'a [f32],
    offset: usize,
    stride: usize,
    c0: usize,
    span: usize,
    k: usize,
}

impl Steps<'_> {
    /// The pairs of steps `2 q0..` into `lines` of `span` words each (as many as it holds), the
    /// odd step of an odd `k`'s last pair zero. Inlined into callers under [`vectorized!`].
    #[inline(always)]
    fn convert(self, q0: usize, lines: &mut [u32]) {
        let Steps { data, offset, stride, c0, span, k } = self;
        for (qq, line) in lines.chunks_exact_mut(span).enumerate() {
            let p = 2 * (q0 + qq);
            let even = &data[offset + p * stride + c0..][..span];
            if p + 1 < k {
                let odd = &data[offset + (p + 1) * stride + c0..][..span];
                for ((d, &e), &o) in line.iter_mut().zip(even).zip(odd) {
                    *d = pair(e, o);
                }
            } else {
                line.iter_mut().zip(even).for_each(|(d, &e)| *d = pair(e, 0.0));
            }
        }
    }
}

/// Full panel pieces of `W` words, `span` apart in `pairs`, into consecutive steps of `panel`, as
/// fixed-size copies: a slice copy of a run-time length is a call to `memmove` for each 48 bytes of
/// an `A` panel, which took a third of packing a transposed `A` (a weight gradient's, attention's
/// probabilities').
#[inline(always)]
fn copy_out<const W: usize>(panel: &mut [u32], pairs: &[u32], span: usize) {
    for (qq, step) in panel.chunks_exact_mut(W).enumerate() {
        let step: &mut [u32; W] = step.try_into().expect("a whole step");
        *step = pairs[qq * span..][..W].try_into().expect("a whole piece");
    }
}

/// Consecutive steps `src` as pairs (the last one zero-padded when `src` is odd). Inlined into
/// its callers, which run it under [`vectorized!`].
#[inline(always)]
fn pairs_of(src: &[f32], dst: &mut [u32]) {
    let whole = src.len() / 2;
    for (d, s) in dst[..whole].iter_mut().zip(src.chunks_exact(2)) {
        *d = pair(s[0], s[1]);
    }
    if src.len() % 2 == 1 {
        dst[whole] = pair(src[src.len() - 1], 0.0);
    }
}

/// The contract's chain in plain code, one element per lane of `[f32; NR]` rows (which the
/// compiler vectorises where the caller enables vector features).
///
/// # Safety
///
/// As [`TileFn`]: `a` and `b` address `kq` pairs of full panels, `c` a full `MR x NR` tile.
#[inline(always)]
unsafe fn emulated<const MR: usize, const NR: usize>(
    kq: usize,
    a: APanel,
    b: *const u32,
    c: *mut f32,
    rs_c: usize,
    start: Start<'_, f32>,
) {
    let mut acc = [[0f32; NR]; MR];
    // SAFETY (whole body): every offset stays within the sizes of the contract above.
    unsafe {
        match start {
            Start::Zero => {}
            Start::Load => {
                for (i, row) in acc.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = flush(*c.add(i * rs_c + j));
                    }
                }
            }
            Start::Row(values) => {
                for row in acc.iter_mut() {
                    for (v, &x) in row.iter_mut().zip(&values[..NR]) {
                        *v = flush(x);
                    }
                }
            }
        }
        for q in 0..kq {
            let (ap, bp) = (a.ptr.add(q * a.step), b.add(q * NR));
            let mut b_even = [0f32; NR];
            let mut b_odd = [0f32; NR];
            for j in 0..NR {
                let w = *bp.add(j);
                b_even[j] = f32::from_bits(w << 16);
                b_odd[j] = f32::from_bits(w & 0xffff_0000);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = *ap.add(i * a.row);
                let (a_even, a_odd) = (f32::from_bits(w << 16), f32::from_bits(w & 0xffff_0000));
                for (j, v) in row.iter_mut().enumerate() {
                    let odd = flush(a_odd.mul_add(b_odd[j], *v));
                    *v = flush(a_even.mul_add(b_even[j], odd));
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                *c.add(i * rs_c + j) = v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The emulation compiled for AVX-512 (8 x 32 tile).
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn emulated_avx512(
        kq: usize,
        a: super::APanel,
        b: *const u32,
        c: *mut f32,
        rs_c: usize,
        start: super::Start<'_, f32>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { super::emulated::<8, 32>(kq, a, b, c, rs_c, start) }
    }

    /// The emulation compiled for AVX2 (4 x 16 tile).
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn emulated_avx2(
        kq: usize,
        a: super::APanel,
        b: *const u32,
        c: *mut f32,
        rs_c: usize,
        start: super::Start<'_, f32>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { super::emulated::<4, 16>(kq, a, b, c, rs_c, start) }
    }

    /// `VDPBF16PS`: a 12 x 32 tile in zmm registers (24 accumulators), one instruction per row,
    /// vector and pair of steps.
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn native(
        kq: usize,
        a: super::APanel,
        b: *const u32,
        c: *mut f32,
        rs_c: usize,
        start: super::Start<'_, f32>,
    ) {
        const MR: usize = 12;
        // SAFETY (whole body): offsets within the contract's sizes.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            // The instruction reads a subnormal accumulator as zero; so do the other paths.
            match start {
                super::Start::Zero => {}
                super::Start::Load => {
                    for (i, row) in acc.iter_mut().enumerate() {
                        row[0] = _mm512_loadu_ps(c.add(i * rs_c));
                        row[1] = _mm512_loadu_ps(c.add(i * rs_c + 16));
                    }
                }
                super::Start::Row(values) => {
                    debug_assert!(values.len() >= 32);
                    let (r0, r1) =
                        (_mm512_loadu_ps(values.as_ptr()), _mm512_loadu_ps(values.as_ptr().add(16)));
                    acc.iter_mut().for_each(|row| *row = [r0, r1]);
                }
            }
            let (mut ap, mut b) = (a.ptr, b);
            for _ in 0..kq {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i * a.row) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
                ap = ap.add(a.step);
                b = b.add(32);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * rs_c), row[0]);
                _mm512_storeu_ps(c.add(i * rs_c + 16), row[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: u64) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1d ^ salt;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                // Varied exponents, down to the subnormal range, so that flushing shows.
                unit * [1.0, 0.01, 30.0, 1e-19, 1e-20][(state % 5) as usize]
            })
            .collect()
    }

    /// The contract, literally.
    fn reference(c0: &[f32], a: &MatRef<'_, f32>, b: &MatRef<'_, f32>) -> Vec<u32> {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        let r = |x: f32| from_bf16(to_bf16(x));
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let mut acc = flush(c0[i * n + j]);
                for q in 0..k.div_ceil(2) {
                    let (ao, bo) = if 2 * q + 1 < k {
                        (r(a.at(i, 2 * q + 1)), r(b.at(2 * q + 1, j)))
                    } else {
                        (0.0, 0.0)
                    };
                    acc = flush(ao.mul_add(bo, acc));
                    acc = flush(r(a.at(i, 2 * q)).mul_add(r(b.at(2 * q, j)), acc));
                }
                out.push(acc.to_bits());
            }
        }
        out
    }

    #[test]
    fn rounding_to_bf16() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80, "a tie goes to even");
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82, "a tie goes to even");
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "rounds up to infinity");
        assert_eq!(to_bf16(-1e-39), 0x8000, "subnormal results flush to a signed zero");
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    /// Every path against the literal chain (and so the native instruction against the
    /// emulation, where this CPU has it), with transposed operands, odd `k`, ragged edges,
    /// accumulation into C, several K-blocks and thread counts.
    #[test]
    fn every_path_gives_the_contract_bits() {
        let shapes = [
            (70, 384, 96, false, true),
            (40, 71, 50, true, false),
            (128, 32, 128, false, true),
            (5, 3, 7, true, true),
            (13, 1, 33, false, false),
            // Several groups of panels and blocks of steps, ragged, odd `k`.
            (150, 301, 300, true, false),
            // A transposed `B` over several runs of a column's pairs, odd `k`.
            (20, 131, 40, false, true),
        ];
        for (m, k, n, ta, tb) in shapes {
            let (av, bv, c0, row) = (values(m * k, 1), values(k * n, 2), values(m * n, 3), values(n, 4));
            let a = if ta { MatRef::row_major(&av, k, m).t() } else { MatRef::row_major(&av, m, k) };
            let b = if tb { MatRef::row_major(&bv, n, k).t() } else { MatRef::row_major(&bv, k, n) };
            for (start, initial) in super::super::tests::starts(&c0, &row) {
                let want = reference(&initial, &a, &b);
                let mode = std::mem::discriminant(&start);
                for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
                    for (kc, chunk) in [(KC_PAIRS, 0), (3, 0), (128, 0), (3, 7), (16, 40)] {
                        for threads in [1, 2, 3] {
                            let mut c = c0.clone();
                            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                            pool.install(|| {
                                gemm_bf16_on(
                                    path,
                                    kc,
                                    chunk,
                                    MatMut::row_major(&mut c, m, n),
                                    start,
                                    a,
                                    b,
                                    Threads::Pool,
                                )
                            });
                            let got: Vec<u32> = c.iter().map(|x| x.to_bits()).collect();
                            assert!(
                                got == want,
                                "{path} kc={kc} chunk={chunk} {threads} threads, {m}x{k}x{n} {mode:?}: bits differ"
                            );
                        }
                    }
                }
            }
        }
    }
}
