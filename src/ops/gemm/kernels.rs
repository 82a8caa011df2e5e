//! Micro-kernels: one `MR x NR` tile of `C` over `kc` steps, per element type and path.
//!
//! Every kernel computes, for each element `(i, j)` of its tile, `c = fma(A[i][p], B[p][j], c)` for
//! `p` in `0..kc`, starting where [`Start`] says (+0.0, the tile's values, or a row's), and nothing
//! else. The SIMD kernels run one element per vector lane, so their bits equal the portable
//! kernel's.

use super::super::Real;
use super::{MatMut, MatRef, Start, Threads};
use crate::ops::cpu::KernelPath;

/// Where a micro-kernel reads its operands: element `(i, p)` of `A` at `a + i * rs_a + p * cs_a`,
/// and row `p` of `B` as `NR` consecutive elements at `b + p * rs_b`.
#[derive(Clone, Copy)]
pub(crate) struct Operands<T> {
    pub a: *const T,
    pub rs_a: usize,
    pub cs_a: usize,
    pub b: *const T,
    pub rs_b: usize,
}

/// A micro-kernel over a full tile: `kc` steps, `c` with row stride `rs_c`, chains from `start`
/// (a [`Start::Row`] of at least the tile's width).
type TileFn<T> = unsafe fn(kc: usize, ops: Operands<T>, c: *mut T, rs_c: usize, start: Start<'_, T>);

/// A micro-kernel and its tile shape.
#[derive(Clone, Copy)]
pub(crate) struct Kernel<T> {
    pub mr: usize,
    pub nr: usize,
    run: TileFn<T>,
}

impl<T: Real> Kernel<T> {
    /// Runs the kernel on a tile of which only `rows x cols` lie inside `C` (the operands' panels
    /// are full or zero-padded; lanes outside `C` are computed in a scratch tile and dropped).
    ///
    /// # Safety
    ///
    /// `ops` addresses `kc` steps of a full `mr`-row panel of `A` and `nr`-column panel of `B`; the
    /// `rows x cols` elements at `c + r * rs_c + j` are valid for reads and writes and accessed by no
    /// one else; `rows <= mr`, `cols <= nr`; a [`Start::Row`] holds at least `cols` values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_tile(
        &self,
        kc: usize,
        ops: Operands<T>,
        c: *mut T,
        rs_c: usize,
        rows: usize,
        cols: usize,
        start: Start<'_, T>,
    ) {
        debug_assert!(rows <= self.mr && cols <= self.nr);
        if rows == self.mr && cols == self.nr {
            // SAFETY: the caller's contract covers the whole tile.
            unsafe { (self.run)(kc, ops, c, rs_c, start) };
            return;
        }
        let mut tile = [T::zero(); MAX_TILE];
        let tile = &mut tile[..self.mr * self.nr];
        // SAFETY: the rows x cols block at `c` is valid (the caller's contract).
        unsafe { start.fill_tile(tile, self.nr, c, rs_c, rows, cols) };
        // SAFETY: `tile` is a full mr x nr tile with row stride nr.
        unsafe { (self.run)(kc, ops, tile.as_mut_ptr(), self.nr, start.in_scratch()) };
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: as above.
                unsafe { *c.add(r * rs_c + j) = tile[r * self.nr + j] };
            }
        }
    }
}

/// The largest `MR * NR` of any kernel (the scratch tile for edges).
const MAX_TILE: usize = 12 * 32;

/// Element types with micro-kernels.
pub(crate) trait Element: Real + super::Plain {
    /// The kernel for `path` (a path without a variant of its own for this type uses the nearest).
    fn kernel(path: KernelPath) -> Kernel<Self>;

    /// A product with bf16 operands ([`super::Products::Bf16`]).
    fn bf16_product(
        c: MatMut<'_, Self>,
        start: Start<'_, Self>,
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        threads: Threads,
    );
}

impl Element for f32 {
    fn bf16_product(
        c: MatMut<'_, f32>,
        start: Start<'_, f32>,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        threads: Threads,
    ) {
        super::bf16::gemm_bf16(c, start, a, b, threads);
    }

    fn kernel(path: KernelPath) -> Kernel<f32> {
        match path {
            KernelPath::Portable => Kernel { mr: 4, nr: 8, run: portable::<f32, 4, 8> },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Kernel { mr: 6, nr: 16, run: x86::f32_avx2 },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 | KernelPath::Avx512Bf16 => Kernel { mr: 12, nr: 32, run: x86::f32_avx512 },
            #[cfg(not(target_arch = "x86_64"))]
            _ => Kernel { mr: 4, nr: 8, run: portable::<f32, 4, 8> },
        }
    }
}

impl Element for f64 {
    /// f64 serves the finite-difference tests, which check the exact products.
    fn bf16_product(
        c: MatMut<'_, f64>,
        start: Start<'_, f64>,
        a: MatRef<'_, f64>,
        b: MatRef<'_, f64>,
        threads: Threads,
    ) {
        super::gemm(c, start, a, b, threads);
    }

    fn kernel(path: KernelPath) -> Kernel<f64> {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::Avx512 | KernelPath::Avx512Bf16 => {
                Kernel { mr: 4, nr: 8, run: x86::f64_fma }
            }
            _ => Kernel { mr: 4, nr: 8, run: portable::<f64, 4, 8> },
        }
    }
}

/// The portable kernel: plain Rust, `mul_add` per element (a hardware FMA where the target has one,
/// else the C library's correctly rounded `fma`, which gives the same bits).
///
/// # Safety
///
/// As [`TileFn`]: `ops` addresses `kc` steps of full panels, `c` a full `MR x NR` tile with
/// stride `rs_c`.
#[inline(always)]
unsafe fn portable<T: Real, const MR: usize, const NR: usize>(
    kc: usize,
    ops: Operands<T>,
    c: *mut T,
    rs_c: usize,
    start: Start<'_, T>,
) {
    let mut acc = [[T::zero(); NR]; MR];
    // SAFETY (whole body): every offset stays within the sizes of the contract above.
    unsafe {
        match start {
            Start::Zero => {}
            Start::Load => {
                for (i, row) in acc.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = *c.add(i * rs_c + j);
                    }
                }
            }
            Start::Row(values) => acc.iter_mut().for_each(|row| row.copy_from_slice(&values[..NR])),
        }
        for p in 0..kc {
            let (ap, bp) = (ops.a.add(p * ops.cs_a), ops.b.add(p * ops.rs_b));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = *ap.add(i * ops.rs_a);
                for (j, v) in row.iter_mut().enumerate() {
                    *v = ai.mul_add(*bp.add(j), *v);
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

    use super::{Operands, Start};

    /// f64 for the finite-difference and parity tests: the portable body compiled with FMA.
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f64_fma(
        kc: usize,
        ops: Operands<f64>,
        c: *mut f64,
        rs_c: usize,
        start: Start<'_, f64>,
    ) {
        // SAFETY: forwarded contract.
        unsafe { super::portable::<f64, 4, 8>(kc, ops, c, rs_c, start) }
    }

    /// One f32 micro-kernel: `MR` rows by two vectors of `LANES` columns. Per step it loads two
    /// vectors of B, broadcasts each of the MR elements of A and fuses them in (`2 * MR`
    /// accumulators in registers).
    macro_rules! f32_kernel {
        ($(#[$doc:meta])* $name:ident, $feature:literal, MR = $mr:literal, LANES = $lanes:literal,
         $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident) => {
            $(#[$doc])*
            ///
            /// # Safety
            ///
            #[doc = concat!("As [`super::TileFn`], on a CPU with ", $feature, ".")]
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                kc: usize,
                ops: Operands<f32>,
                c: *mut f32,
                rs_c: usize,
                start: Start<'_, f32>,
            ) {
                // SAFETY (whole body): offsets within the contract's sizes.
                unsafe {
                    let mut acc = [[$zero(); 2]; $mr];
                    match start {
                        Start::Zero => {}
                        Start::Load => {
                            for (i, row) in acc.iter_mut().enumerate() {
                                row[0] = $load(c.add(i * rs_c));
                                row[1] = $load(c.add(i * rs_c + $lanes));
                            }
                        }
                        Start::Row(values) => {
                            debug_assert!(values.len() >= 2 * $lanes);
                            let (r0, r1) = ($load(values.as_ptr()), $load(values.as_ptr().add($lanes)));
                            acc.iter_mut().for_each(|row| *row = [r0, r1]);
                        }
                    }
                    let (mut a, mut b) = (ops.a, ops.b);
                    for _ in 0..kc {
                        let b0 = $load(b);
                        let b1 = $load(b.add($lanes));
                        for (i, row) in acc.iter_mut().enumerate() {
                            let ai = $set1(*a.add(i * ops.rs_a));
                            row[0] = $fmadd(ai, b0, row[0]);
                            row[1] = $fmadd(ai, b1, row[1]);
                        }
                        a = a.add(ops.cs_a);
                        b = b.add(ops.rs_b);
                    }
                    for (i, row) in acc.iter().enumerate() {
                        $store(c.add(i * rs_c), row[0]);
                        $store(c.add(i * rs_c + $lanes), row[1]);
                    }
                }
            }
        };
    }

    f32_kernel!(
        /// 6 x 16 f32 tile in ymm registers (12 accumulators).
        f32_avx2, "avx2,fma", MR = 6, LANES = 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps
    );

    f32_kernel!(
        /// 12 x 32 f32 tile in zmm registers (24 accumulators).
        f32_avx512, "avx512f", MR = 12, LANES = 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps
    );
}
