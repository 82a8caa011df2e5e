//! pipe's own matrix product, with one summation order on every machine.
//!
//! # The contract
//!
//! `C = [C +] A B` computes every element as one chain of fused multiply-adds in ascending `k`:
//!
//! ```text
//! c = C[i][j]  (or +0.0, or row[j]: a bias, see Start)
//! for p in 0..k:  c = fma(A[i][p], B[p][j], c)      // one rounding per step
//! ```
//!
//! Starting from +0.0 or a row, the product writes every element of `C` and reads none, so `C` may
//! be fresh uninitialised memory (`product_new`, a linear layer's output). Nothing else touches
//! the sum: no partial sums per K-block, no split of `k` across threads, no horizontal reductions.
//! So the result is a function of the operands alone, whatever the blocking, the micro-kernel
//! shape, the SIMD width (each vector lane runs one element's chain) or the thread count. FMA is
//! correctly rounded wherever it runs (in hardware, or `fmaf` in software on the portable path),
//! so the portable, AVX2 and AVX-512 kernels agree to the bit; the tests check it at MiniLM's
//! shapes, on every path, with several blockings and thread counts.
//!
//! Why not the `gemm` crate candle uses: it sizes its K-blocks from the detected L1 cache (for
//! `k = 1536`, three blocks of 512 on a 32 KiB 8-way L1, two of 768 on a 48 KiB 12-way one), adds
//! each block's partial sum to `C` separately, picks different kernels by SIMD level and shape, and
//! its scalar fallback does not fuse. Each of those changes the rounding from one CPU to another.
//!
//! # The algorithm
//!
//! A micro-kernel computes one `MR x NR` tile of `C` in registers: per step `p` it loads `NR`
//! consecutive elements of row `p` of `B`, broadcasts the `MR` elements of column `p` of `A` and
//! fuses them in. `A` is read in place through its strides (row-major, or transposed as in a weight
//! gradient); `B` is packed once into panels of `NR` columns (read in place, its rows collide in
//! the caches). Ragged last panels are copied zero-padded. Tiles are grouped into tasks of [`MC`] rows by [`NC`] columns on the rayon pool,
//! each task walking its row panels (which stay in cache) against its column panels, [`KC`] steps
//! of `k` per pass. A deep `k` (a weight gradient's, the batch's tokens) is packed and run a chunk
//! of steps at a time ([`CHUNK_BYTES`]). Neither split touches the sums: a chain continues through
//! its tile's store and reload, and the tests vary both splits to show that the bits do not move.

mod bf16;
mod kernels;

use std::marker::PhantomData;

use rayon::prelude::*;

use super::Real;
use super::cpu::{KernelPath, kernel_path};
pub use bf16::{from_bf16, to_bf16};
pub(crate) use kernels::Element;

/// Steps of `k` per pass over a task's tiles (its slices of A and B then stay in L1/L2).
const KC: usize = 256;
/// Bytes of packed `B` per chunk of `k` (at most, unless one pass of [`KC`] steps needs more): a
/// product with a deep `k` (a weight gradient's `k` is the batch's tokens) packs and runs a chunk
/// of steps at a time, so that each chunk's packed `B` is still in the caches when the tiles read
/// it, rather than all of it packed first (25 MB for a 4096-token weight gradient of MiniLM's FFN)
/// and read back from memory. At MiniLM's 4096-token weight gradients: 2-4% faster products (the
/// 1536 x 384 one 428 -> 444 GFLOP/s), and a dense training step 1.3%.
const CHUNK_BYTES: usize = 2 << 20;
/// Rows of `C` per task; a multiple of every kernel's `MR`.
const MC: usize = 96;
/// Columns of `C` per task; a multiple of every kernel's `NR`.
const NC: usize = 128;
/// Products smaller than this many multiply-adds run on the calling thread only.
const PARALLEL_WORK: usize = 1 << 17;

/// Element types of which every bit pattern is a value, so that one scratch buffer can be reused
/// as any of them.
///
/// # Safety
///
/// Implementors have no invalid bit patterns, and their size and alignment divide 8.
pub(crate) unsafe trait Plain: Copy {}
// SAFETY: plain numbers of 4 or 8 bytes.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f64 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}

thread_local! {
    /// The calling thread's packing buffer, kept between products (see [`with_scratch`]).
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` elements of the calling thread's packing buffer. Its contents are whatever
/// earlier products left there: every packer writes every element the kernels read, padding
/// included. A product neither allocates nor zero-fills its packed operands, which cost up to a
/// tenth of a large product's time (zeroing 25 MB for a weight gradient's packed B). A product
/// that starts while its thread's buffer is in use (in a task of another product on that
/// thread) gets a fresh buffer.
pub(crate) fn with_scratch<T: Plain, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let words = (len * size_of::<T>()).div_ceil(8);
    let run = |buffer: &mut Vec<u64>| {
        if buffer.len() < words {
            buffer.resize(words, 0);
        }
        // SAFETY: the buffer holds at least `len` elements of `T` (`words` u64s), initialised,
        // aligned for `T` (alignment dividing 8), any bit pattern being a `T` (`Plain`); the
        // borrow is exclusive for the call.
        f(unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr().cast::<T>(), len) })
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => run(&mut buffer),
        Err(_) => run(&mut Vec::new()),
    })
}

/// A read-only matrix view: `rows x cols` elements at `offset + r * rs + c * cs` of a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A strided view into `data`. Panics if any element lies outside `data` (a bug in the caller,
    /// never a property of user input: shapes are checked before any kernel runs).
    pub fn new(data: &'a [T], offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = offset + (rows - 1) * rs + (cols - 1) * cs;
            assert!(
                last < data.len(),
                "gemm: a {rows}x{cols} view (strides {rs}, {cs}) at {offset} exceeds {}",
                data.len()
            );
        }
        Self { data, offset, rows, cols, rs, cs }
    }

    /// `data` as a row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Rows `r0..r0 + rows` (no copy).
    pub(super) fn row_range(self, r0: usize, rows: usize) -> Self {
        debug_assert!(r0 + rows <= self.rows);
        Self { offset: self.offset + r0 * self.rs, rows, ..self }
    }

    /// Columns `c0..c0 + cols` (no copy).
    pub(super) fn col_range(self, c0: usize, cols: usize) -> Self {
        debug_assert!(c0 + cols <= self.cols);
        Self { offset: self.offset + c0 * self.cs, cols, ..self }
    }

    fn at(&self, r: usize, c: usize) -> T
    where
        T: Copy,
    {
        self.data[self.offset + r * self.rs + c * self.cs]
    }
}

/// A writable matrix view: `rows x cols` elements at `ptr + r * rs + c`.
pub(crate) struct MatMut<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    rs: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a `MatMut` is an exclusive borrow of its elements (see the constructors); sending it to
// another thread is sending that borrow, like `&mut [T]`.
unsafe impl<T: Send> Send for MatMut<'_, T> {}

impl<'a, T> MatMut<'a, T> {
    /// `rows x cols` elements of `data` at `offset`, rows `rs` apart. Panics if any lies outside.
    pub fn new(data: &'a mut [T], offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!(cols <= rs || rows == 1, "gemm: rows of {cols} elements {rs} apart overlap");
            let last = offset + (rows - 1) * rs + cols - 1;
            assert!(last < data.len(), "gemm: a {rows}x{cols} output at {offset} exceeds {}", data.len());
        }
        // SAFETY: `offset` is within `data` when the view is not empty (checked above).
        let ptr =
            if rows > 0 && cols > 0 { unsafe { data.as_mut_ptr().add(offset) } } else { data.as_mut_ptr() };
        Self { ptr, rows, cols, rs, _borrow: PhantomData }
    }

    /// `data` as a row-major `rows x cols` matrix.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, rows, cols, cols)
    }

    /// A view from a raw pointer, for callers that write disjoint blocks of one buffer from several
    /// threads (attention's heads interleave within each row).
    ///
    /// # Safety
    ///
    /// For the view's lifetime, the `rows x cols` elements at `ptr + r * rs + c` must be valid for
    /// writes (and initialised, for a product that accumulates into them), `cols <= rs` (rows do
    /// not overlap), and no other reference may access them.
    pub unsafe fn from_raw(ptr: *mut T, rows: usize, cols: usize, rs: usize) -> Self {
        Self { ptr, rows, cols, rs, _borrow: PhantomData }
    }

    /// The same elements, borrowed for a shorter while (one product of several into this view).
    pub(super) fn reborrow(&mut self) -> MatMut<'_, T> {
        MatMut { ptr: self.ptr, rows: self.rows, cols: self.cols, rs: self.rs, _borrow: PhantomData }
    }
}

/// Where each chain of a product, or of one tile, starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a, T> {
    /// +0.0: `C` is only written (it may be uninitialised).
    Zero,
    /// `C[i][j]`: the product adds to `C`.
    Load,
    /// `row[j]` in every row (a bias): the same chains as seeding `C` with the row and adding, one
    /// pass over `C` fewer. For a product, `row` has `C`'s width; for a tile, at least its width.
    Row(&'a [T]),
}

impl<'a, T: Copy> Start<'a, T> {
    /// `Zero` or `Load`.
    pub fn accumulate(accumulate: bool) -> Self {
        if accumulate { Start::Load } else { Start::Zero }
    }

    /// The start of the tiles whose first column is `c0`.
    fn at_column(self, c0: usize) -> Self {
        match self {
            Start::Row(row) => Start::Row(&row[c0..]),
            other => other,
        }
    }

    /// Puts a ragged tile's start values in the scratch `tile` (row stride `nr`): nothing for
    /// `Zero` (the kernel starts from zero), the `rows x cols` block at `c` for `Load`, the row's
    /// first `cols` values in each of `rows` rows for `Row`. The kernel then runs on the scratch
    /// tile from [`Self::in_scratch`].
    ///
    /// # Safety
    ///
    /// For `Load`, the `rows x cols` elements at `c + r * rs_c + j` are valid for reads.
    unsafe fn fill_tile(self, tile: &mut [T], nr: usize, c: *const T, rs_c: usize, rows: usize, cols: usize) {
        match self {
            Start::Zero => {}
            Start::Load => {
                for (r, tile_row) in tile.chunks_mut(nr).take(rows).enumerate() {
                    // SAFETY: row r's first `cols` elements, valid by the caller's contract.
                    let c_row = unsafe { std::slice::from_raw_parts(c.add(r * rs_c), cols) };
                    tile_row[..cols].copy_from_slice(c_row);
                }
            }
            Start::Row(row) => {
                tile.chunks_mut(nr).take(rows).for_each(|t| t[..cols].copy_from_slice(&row[..cols]))
            }
        }
    }

    /// The start of a kernel run on a scratch tile filled by [`Self::fill_tile`].
    fn in_scratch(self) -> Start<'static, T> {
        match self {
            Start::Zero => Start::Zero,
            _ => Start::Load,
        }
    }
}

/// Whether a product may use the rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split into tasks on the current rayon pool (large products only).
    Pool,
    /// On the calling thread, for callers that parallelise over many small products.
    Caller,
}

/// `c = [start +] a b` under the contract of the module doc, on the kernel path the process
/// selected.
pub(crate) fn gemm<T: Element>(
    c: MatMut<'_, T>,
    start: Start<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
) {
    gemm_on(kernel_path(), Blocking::STANDARD, c, start, a, b, threads);
}

/// The operand precision of a product on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// The operands' own precision, under the contract above.
    #[default]
    Full,
    /// f32 operands rounded to bf16, products accumulated in f32, under the bf16 contract of
    /// [`bf16`] (the CPU's mixed precision). f64 operands (the finite-difference tests) ignore it.
    Bf16,
}

/// `c = [start +] a b` ([`gemm`]) with the operand precision `products`.
pub(crate) fn product<T: Element>(
    c: MatMut<'_, T>,
    start: Start<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
    products: Products,
) {
    if let Start::Row(row) = start {
        assert_eq!(row.len(), c.cols, "gemm: a start row of {} for {} columns", row.len(), c.cols);
    }
    match products {
        Products::Full => gemm(c, start, a, b, threads),
        Products::Bf16 => T::bf16_product(c, start, a, b, threads),
    }
}

/// `a b` as a new row-major vector, written once by the product: no zero fill first (a product
/// that starts from zero writes every element of `C` and reads none, on every path).
pub(crate) fn product_new<T: Element>(
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
    products: Products,
) -> Vec<T> {
    fresh_product(Start::Zero, a, b, threads, products)
}

/// `row + a b` (`row` added to every row: a bias) as a new row-major vector, each element's chain
/// starting from `row[j]`, written once as [`product_new`] writes.
pub(crate) fn product_new_from_row<T: Element>(
    row: &[T],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
    products: Products,
) -> Vec<T> {
    fresh_product(Start::Row(row), a, b, threads, products)
}

/// A product into a new vector, from a start that reads nothing of `C` (`Zero` or `Row`).
fn fresh_product<T: Element>(
    start: Start<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
    products: Products,
) -> Vec<T> {
    assert!(!matches!(start, Start::Load), "gemm: a new output has nothing to load");
    let (m, n) = (a.rows, b.cols);
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the view covers the vector's `m * n` elements of spare capacity, which nothing else
    // references, rows `n` apart.
    let view = unsafe { MatMut::from_raw(c.as_mut_ptr(), m, n, n) };
    product(view, start, a, b, threads, products);
    // SAFETY: a product from zero or from a row writes all `m * n` elements (see above).
    unsafe { c.set_len(m * n) };
    c
}

/// Steps of `k` per chunk (see [`CHUNK_BYTES`]) for a packed `B` of `step_bytes` per step: as many
/// passes of `kc` steps as fit, at least one.
fn chunk_steps(kc: usize, step_bytes: usize) -> usize {
    (CHUNK_BYTES / step_bytes.max(1) / kc.max(1)).max(1).saturating_mul(kc)
}

/// The block sizes; fixed in production, varied by the tests to show they do not matter.
#[derive(Debug, Clone, Copy)]
struct Blocking {
    /// Steps of `k` per pass over a task's tiles.
    kc: usize,
    /// Task rows, in micro-tiles (0: [`MC`]).
    mc_tiles: usize,
    /// Task columns, in micro-tiles (0: [`NC`]).
    nc_tiles: usize,
    /// Steps of `k` per packed chunk of `B` (0: as many passes of `kc` as fit [`CHUNK_BYTES`]).
    chunk: usize,
}

impl Blocking {
    const STANDARD: Self = Self { kc: KC, mc_tiles: 0, nc_tiles: 0, chunk: 0 };

    /// Steps of `k` per chunk for a packed `B` of `step_bytes` per step.
    fn chunk(&self, step_bytes: usize) -> usize {
        match self.chunk {
            0 => chunk_steps(self.kc, step_bytes),
            chunk => chunk,
        }
    }

    fn tiles(&self, mr: usize, nr: usize) -> (usize, usize) {
        let mc = if self.mc_tiles == 0 { MC / mr } else { self.mc_tiles };
        let nc = if self.nc_tiles == 0 { NC / nr } else { self.nc_tiles };
        (mc, nc)
    }
}

/// A pointer shared by tasks: into the output (each task writes its own tiles) or into inputs
/// (read only).
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: only used to hand disjoint tiles of one exclusively borrowed `MatMut`, or read-only
// operands, to rayon tasks.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// A method, so closures capture the whole `Send` wrapper rather than the raw pointer field.
    fn ptr(self) -> *mut T {
        self.0
    }
}

fn gemm_on<T: Element>(
    path: KernelPath,
    blocking: Blocking,
    mut c: MatMut<'_, T>,
    start: Start<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    threads: Threads,
) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "gemm: {m}x{n} = {}x{} * {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            // SAFETY: row r of the view (in bounds by the MatMut invariant).
            let row = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(r * c.rs), n) };
            match start {
                Start::Zero => row.fill(T::zero()),
                Start::Load => {}
                Start::Row(values) => row.copy_from_slice(values),
            }
        }
        return;
    }
    // Products narrower than one 12 x 32 AVX-512 tile, or with few rows, waste most of it; the
    // 6 x 16 AVX2 kernel fits them better and computes the same bits (the contract above).
    // Attention's n = 32 products (a head's width) fill the tile exactly: on a CPU with full-width
    // 512-bit units they run 12% faster there (the attention op's forward and backward, 2-core VM
    // on its L1d-48K host), and on one that splits them (the earlier host) it changed nothing.
    let path = if path >= KernelPath::Avx512 && (m < 4 * 12 || n < 32) { KernelPath::Avx2 } else { path };
    let kernel = T::kernel(path);
    let nr = kernel.nr;
    let col_panels = n.div_ceil(nr);
    let parallel = threads == Threads::Pool && m * n * k >= PARALLEL_WORK && rayon::current_num_threads() > 1;

    // B's column panels as the kernels read them, packed (`k` rows of `nr`, zero-padded) even when
    // B's rows are contiguous: read in place, rows kilobytes apart collide in the caches (in place
    // ran at 104-142 GFLOP/s where packed ran at 149-170, at BERT-base's and MiniLM's shapes). A
    // chunk of steps at a time (see [`CHUNK_BYTES`]); the chains go on through `C` from one chunk
    // to the next, as they do from one pass of `kc` to the next.
    let chunk = blocking.chunk(col_panels * nr * size_of::<T>()).max(1);
    with_scratch(col_panels * chunk.min(k) * nr, |scratch: &mut [T]| {
        for k0 in (0..k).step_by(chunk) {
            let steps = chunk.min(k - k0);
            let (a, b) = (a.col_range(k0, steps), b.row_range(k0, steps));
            let packed_b = &mut scratch[..col_panels * steps * nr];
            if b.cs == 1 {
                pack_row_major(&b, nr, packed_b, parallel);
            } else {
                let pack = |(i, dst): (usize, &mut [T])| pack_cols(&b, i * nr, nr, dst);
                match parallel {
                    true => packed_b.par_chunks_mut(steps * nr).enumerate().for_each(pack),
                    false => packed_b.chunks_mut(steps * nr).enumerate().for_each(pack),
                }
            }
            let start = if k0 == 0 { start } else { Start::Load };
            run_tiles(kernel, blocking, c.reborrow(), start, a, packed_b, parallel);
        }
    });
}

/// The tiles of `c = [c +] a b` with `b` packed (see [`gemm_on`]), in tasks.
fn run_tiles<T: Element>(
    kernel: kernels::Kernel<T>,
    blocking: Blocking,
    c: MatMut<'_, T>,
    start: Start<'_, T>,
    a: MatRef<'_, T>,
    packed_b: &[T],
    parallel: bool,
) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    let (mr, nr) = (kernel.mr, kernel.nr);
    let (row_panels, col_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let (mc_tiles, nc_tiles) = blocking.tiles(mr, nr);
    let (row_tasks, col_tasks) = (row_panels.div_ceil(mc_tiles), col_panels.div_ceil(nc_tiles));
    // A's ragged last row panel, copied zero-padded (`k` steps of `mr`).
    let ragged_a = if m % mr == 0 { Vec::new() } else { pack_rows(&a, m - m % mr, mr) };

    let out = Shared(c.ptr);
    let a_base = Shared(a.data.as_ptr().cast_mut());
    let rs_c = c.rs;
    // (pointer, row stride, column stride) of row panel `pi`'s elements (i, p) of A.
    let a_panel = |pi: usize| {
        let r0 = pi * mr;
        if r0 + mr <= m {
            // SAFETY: the panel's rows are inside the view.
            (unsafe { a_base.ptr().add(a.offset + r0 * a.rs) }.cast_const(), a.rs, a.cs)
        } else {
            (ragged_a.as_ptr(), 1, mr)
        }
    };
    // (pointer, row stride) of column panel `pj` of B.
    let b_panel = |pj: usize| (packed_b[pj * k * nr..].as_ptr(), nr);
    let kc = blocking.kc.min(k);
    let task = |t: usize| {
        let (ti, tj) = (t / col_tasks, t % col_tasks);
        // Steps of k outermost, so that a task's slices of A and B stay in cache across its tiles.
        for k0 in (0..k).step_by(kc) {
            let steps = kc.min(k - k0);
            for pi in ti * mc_tiles..((ti + 1) * mc_tiles).min(row_panels) {
                let (ap, rs_a, cs_a) = a_panel(pi);
                for pj in tj * nc_tiles..((tj + 1) * nc_tiles).min(col_panels) {
                    let (bp, rs_b) = b_panel(pj);
                    let (r0, c0) = (pi * mr, pj * nr);
                    let (rows, cols) = (mr.min(m - r0), nr.min(n - c0));
                    // SAFETY: steps k0.. of the panels above.
                    let (a, b) = unsafe { (ap.add(k0 * cs_a), bp.add(k0 * rs_b)) };
                    let operands = kernels::Operands { a, rs_a, cs_a, b, rs_b };
                    // SAFETY: the tile lies inside the output view (r0 + rows <= m, c0 + cols <= n)
                    // and belongs to this task alone (tasks partition the panels); the operands
                    // hold `steps` steps of full panels.
                    unsafe {
                        kernel.run_tile(
                            steps,
                            operands,
                            out.ptr().add(r0 * rs_c + c0),
                            rs_c,
                            rows,
                            cols,
                            if k0 == 0 { start.at_column(c0) } else { Start::Load },
                        )
                    };
                }
            }
        }
    };
    if parallel {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * col_tasks).for_each(task);
    }
}

/// Rows `r0..` (at most `mr`) of `a` as `k` steps of `mr` (`dst[p * mr + i]`), zero-padded.
fn pack_rows<T: Real>(a: &MatRef<'_, T>, r0: usize, mr: usize) -> Vec<T> {
    let (rows, k) = (mr.min(a.rows - r0), a.cols);
    let mut dst = vec![T::zero(); k * mr];
    for p in 0..k {
        for i in 0..rows {
            dst[p * mr + i] = a.at(r0 + i, p);
        }
    }
    dst
}

/// A `b` with contiguous rows as column panels of `nr` (`[p][nr]` each, zero-padded; every element
/// of `dst` written), a group of panels at a time, row by row: each row's piece is read once, in
/// order. Panel by panel, a wide operand's rows are a page apart and every read waited on memory
/// (a weight gradient's `B` is a whole activation: packing it was 4% of a training step).
fn pack_row_major<T: Real>(b: &MatRef<'_, T>, nr: usize, dst: &mut [T], parallel: bool) {
    /// Elements of a row per group of panels (at most).
    const GROUP: usize = 256;
    let (k, n) = (b.rows, b.cols);
    // Groups small enough for four per thread, so that the threads finish together.
    let tasks = if parallel { 4 * rayon::current_num_threads() } else { 1 };
    let panels_per_group = (GROUP / nr).min(n.div_ceil(nr).div_ceil(tasks)).max(1);
    let pack_group = |(g, dst): (usize, &mut [T])| {
        let c0 = g * panels_per_group * nr;
        let span = (n - c0).min(panels_per_group * nr);
        for p in 0..k {
            let row = &b.data[b.offset + p * b.rs + c0..][..span];
            for (x, panel) in dst.chunks_mut(k * nr).enumerate() {
                let cols = nr.min(span - x * nr);
                let step = &mut panel[p * nr..][..nr];
                step[..cols].copy_from_slice(&row[x * nr..][..cols]);
                step[cols..].fill(T::zero());
            }
        }
    };
    match parallel {
        true => dst.par_chunks_mut(panels_per_group * k * nr).enumerate().for_each(pack_group),
        false => dst.chunks_mut(panels_per_group * k * nr).enumerate().for_each(pack_group),
    }
}

/// Columns `c0..` (at most `nr`) of a `b` without contiguous rows (see [`pack_row_major`]) as `k`
/// rows of `nr` (`dst[p * nr + j]`), zero-padded (every element of `dst` written).
fn pack_cols<T: Real>(b: &MatRef<'_, T>, c0: usize, nr: usize, dst: &mut [T]) {
    let cols = nr.min(b.cols - c0);
    if b.rs == 1 {
        // A transposed row-major matrix: each column is a contiguous run along k. Transposed in
        // 8 x 8 tiles, so that reads and writes both go eight consecutive elements at a time.
        const T8: usize = 8;
        let (k, full_cols, full_rows) = (b.rows, cols / T8 * T8, b.rows / T8 * T8);
        // Compiled for the kernel path's vector instructions (as baseline code this packing was
        // 2.7% of a dense training step's samples, most of it attention's transposed keys and
        // values; the attention op alone went 22.3 -> 21.5 ms, forward and backward).
        super::vectorized!({
            for j0 in (0..full_cols).step_by(T8) {
                for p0 in (0..full_rows).step_by(T8) {
                    let mut tile = [[T::zero(); T8]; T8];
                    for (j, run) in tile.iter_mut().enumerate() {
                        let start = b.offset + (c0 + j0 + j) * b.cs + p0;
                        run.copy_from_slice(&b.data[start..start + T8]);
                    }
                    for i in 0..T8 {
                        let row = &mut dst[(p0 + i) * nr + j0..(p0 + i) * nr + j0 + T8];
                        for (j, d) in row.iter_mut().enumerate() {
                            *d = tile[j][i];
                        }
                    }
                }
            }
        });
        // The ragged edges element by element.
        for j in 0..cols {
            let start = b.offset + (c0 + j) * b.cs;
            let first = if j < full_cols { full_rows } else { 0 };
            for p in first..k {
                dst[p * nr + j] = b.data[start + p];
            }
        }
    } else {
        for j in 0..cols {
            for p in 0..b.rows {
                dst[p * nr + j] = b.at(p, c0 + j);
            }
        }
    }
    // A ragged panel's padding (`dst` is reused scratch).
    if cols < nr {
        dst.chunks_mut(nr).for_each(|row| row[cols..].fill(T::zero()));
    }
}

/// The transpose of the row-major `rows x cols` matrix `src`, row-major (`cols x rows`), a block
/// of 32 x 32 at a time and a band of rows of the result per task.
pub(crate) fn transposed<T: Copy + Default + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const BLOCK: usize = 32;
    assert_eq!(src.len(), rows * cols, "transposed: {} elements for {rows} x {cols}", src.len());
    let mut out = vec![T::default(); rows * cols];
    if rows == 0 {
        return out;
    }
    out.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(band, dst)| {
        let c0 = band * BLOCK;
        let band_cols = dst.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for c in 0..band_cols {
                let to = &mut dst[c * rows + r0..c * rows + (r0 + BLOCK).min(rows)];
                for (r, d) in to.iter_mut().enumerate() {
                    *d = src[(r0 + r) * cols + c0 + c];
                }
            }
        }
    });
    out
}

/// Which operand of [`matmul_t`] is stored transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transpose {
    None,
    /// `a` is stored as a row-major `k x m` matrix.
    Lhs,
    /// `b` is stored as a row-major `n x k` matrix (a weight in torch's layout).
    Rhs,
}

/// `a (m x k) * b (k x n)` for row-major f32 slices, as a new row-major vector: the product the
/// training path uses, for benchmarks and tools.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    matmul_t(a, b, m, k, n, Transpose::None)
}

/// [`matmul`] with one operand stored transposed.
pub fn matmul_t(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, transpose: Transpose) -> Vec<f32> {
    matmul_with(a, b, m, k, n, transpose, Products::Full)
}

/// [`matmul_t`] with the operand precision `products`.
pub fn matmul_with(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    transpose: Transpose,
    products: Products,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    let a =
        if transpose == Transpose::Lhs { MatRef::row_major(a, k, m).t() } else { MatRef::row_major(a, m, k) };
    let b =
        if transpose == Transpose::Rhs { MatRef::row_major(b, n, k).t() } else { MatRef::row_major(b, k, n) };
    product(MatMut::row_major(&mut c, m, n), Start::Zero, a, b, Threads::Pool, products);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with varied exponents, so that rounding differences would show.
    fn values(n: usize, salt: u64) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1d ^ salt;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                unit * [1.0, 0.01, 30.0, 0.3][(state & 3) as usize]
            })
            .collect()
    }

    /// The contract, literally: one fma chain per element in ascending k.
    fn reference(c0: &[f32], a: &MatRef<'_, f32>, b: &MatRef<'_, f32>) -> Vec<f32> {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        let mut c = c0.to_vec();
        for i in 0..m {
            for j in 0..n {
                let mut acc = c[i * n + j];
                for p in 0..k {
                    acc = a.at(i, p).mul_add(b.at(p, j), acc);
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    /// Each way a product starts, with the `C` its chains start from: zeros, `c0` itself, and
    /// `row` in every row. The product runs on a copy of `c0` in every case (so a start that
    /// must not read `C` would show if it did).
    pub(super) fn starts<'a>(c0: &[f32], row: &'a [f32]) -> [(Start<'a, f32>, Vec<f32>); 3] {
        let rows = c0.len() / row.len().max(1);
        [(Start::Zero, vec![0.0; c0.len()]), (Start::Load, c0.to_vec()), (Start::Row(row), row.repeat(rows))]
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn run(
        path: KernelPath,
        blocking: Blocking,
        threads: usize,
        c0: &[f32],
        start: Start<'_, f32>,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
    ) -> Vec<u32> {
        let mut c = c0.to_vec();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            gemm_on(path, blocking, MatMut::row_major(&mut c, a.rows, b.cols), start, a, b, Threads::Pool)
        });
        bits(&c)
    }

    /// Every path, several blockings and thread counts, transposed operands and ragged edges, at
    /// shapes of MiniLM's layers (k = 1536 crosses several K-blocks; these products are large
    /// enough to run on the pool): all equal the literal chain, bit for bit.
    #[test]
    fn every_path_blocking_and_thread_count_gives_the_contract_bits() {
        let blockings = [
            Blocking::STANDARD,
            Blocking { kc: usize::MAX, mc_tiles: 0, nc_tiles: 0, chunk: 0 },
            Blocking { kc: 64, mc_tiles: 1, nc_tiles: 1, chunk: 0 },
            Blocking { kc: 512, mc_tiles: 3, nc_tiles: 5, chunk: 0 },
            Blocking { kc: 1000, mc_tiles: 64, nc_tiles: 64, chunk: 0 },
            // Chunks of packed `B` smaller than `k`, one of them not a multiple of `kc`.
            Blocking { kc: 16, mc_tiles: 0, nc_tiles: 0, chunk: 32 },
            Blocking { kc: 64, mc_tiles: 2, nc_tiles: 3, chunk: 96 },
        ];
        // (m, k, n, a transposed, b transposed): the FFN down-projection forward, its weight
        // gradient (transposed lhs), the input gradient, and ragged small cases (a transposed rhs
        // whose packing has whole 8 x 8 tiles and ragged rows and columns, a wide row-major rhs).
        let shapes = [
            (70, 1536, 384, false, true),
            (384, 70, 1536, true, false),
            (37, 384, 1536, false, false),
            (5, 33, 7, true, true),
            (9, 37, 45, false, true),
            // A row-major rhs packed in several groups of panels, the last ragged.
            (13, 29, 300, false, false),
        ];
        for (m, k, n, ta, tb) in shapes {
            let (av, bv, c0, row) = (values(m * k, 1), values(k * n, 2), values(m * n, 3), values(n, 4));
            let a = if ta { MatRef::row_major(&av, k, m).t() } else { MatRef::row_major(&av, m, k) };
            let b = if tb { MatRef::row_major(&bv, n, k).t() } else { MatRef::row_major(&bv, k, n) };
            for (start, initial) in starts(&c0, &row) {
                let want = bits(&reference(&initial, &a, &b));
                for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
                    for blocking in blockings {
                        for threads in [1, 2, 3] {
                            let got = run(path, blocking, threads, &c0, start, a, b);
                            let mode = std::mem::discriminant(&start);
                            assert!(
                                got == want,
                                "{path} {blocking:?} {threads} threads, {m}x{k}x{n} {mode:?}: bits differ"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A product into fresh memory (ragged tiles on every path, both precisions) gives the bits of
    /// the same product into zeros.
    #[test]
    fn a_product_into_fresh_memory_equals_one_into_zeros() {
        let (m, k, n) = (37, 45, 70);
        let (av, bv) = (values(m * k, 4), values(k * n, 5));
        let (a, b) = (MatRef::row_major(&av, m, k), MatRef::row_major(&bv, k, n));
        for products in [Products::Full, Products::Bf16] {
            let mut zeros = vec![0f32; m * n];
            product(MatMut::row_major(&mut zeros, m, n), Start::Zero, a, b, Threads::Pool, products);
            let fresh = product_new(a, b, Threads::Pool, products);
            assert_eq!(bits(&fresh), bits(&zeros), "{products:?}");
        }
    }

    #[test]
    fn strided_views_and_f64() {
        // A (3 x 4) taken from every other column of a wider buffer; f64 on the portable kernel.
        let data: Vec<f64> = (0..40).map(|i| f64::from(i) * 0.25 - 3.0).collect();
        let a = MatRef::new(&data, 1, 3, 4, 10, 2);
        let b = MatRef::new(&data, 0, 4, 2, 3, 1);
        let mut c = vec![0f64; 6];
        gemm(MatMut::row_major(&mut c, 3, 2), Start::Zero, a, b, Threads::Caller);
        for i in 0..3 {
            for j in 0..2 {
                let want = (0..4).fold(0f64, |acc, p| a.at(i, p).mul_add(b.at(p, j), acc));
                assert_eq!(c[i * 2 + j].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn transposed_swaps_rows_and_columns() {
        // Bands and blocks with ragged ends, and the empty cases.
        for (rows, cols) in [(70, 45), (33, 1), (1, 40), (64, 64), (0, 5), (5, 0)] {
            let src: Vec<u32> = (0..(rows * cols) as u32).collect();
            let t = transposed(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows} x {cols} at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn views_outside_their_slice_are_refused() {
        let data = [0f32; 10];
        let _ = MatRef::new(&data, 2, 3, 3, 3, 1);
    }
}
