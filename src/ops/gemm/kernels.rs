//! Micro-kernels: one `MR x NR` tile of `C` over `kc` steps, per element type and path.
//!
//! Every kernel computes, for each element `(i, j)` of its tile, `c = fma(A[i][p], B[p][j], c)` for
//! `p` in `0..kc`, starting from the tile's values (or from +0.0), and nothing else. The SIMD
//! kernels run one element per vector lane, so their bits equal the portable kernel's.

use super::super::Real;
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

/// A micro-kernel over a full tile: `kc` steps, `c` with row stride `rs_c`; `zero` starts from +0.0.
type TileFn<T> = unsafe fn(kc: usize, ops: Operands<T>, c: *mut T, rs_c: usize, zero: bool);

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
    /// one else; `rows <= mr`, `cols <= nr`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_tile(
        &self,
        kc: usize,
        ops: Operands<T>,
        c: *mut T,
        rs_c: usize,
        rows: usize,
        cols: usize,
        zero: bool,
    ) {
        debug_assert!(rows <= self.mr && cols <= self.nr);
        if rows == self.mr && cols == self.nr {
            // SAFETY: the caller's contract covers the whole tile.
            unsafe { (self.run)(kc, ops, c, rs_c, zero) };
            return;
        }
        let mut tile = [T::zero(); MAX_TILE];
        let tile = &mut tile[..self.mr * self.nr];
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: (r, j) is inside the valid rows x cols block.
                tile[r * self.nr + j] = unsafe { *c.add(r * rs_c + j) };
            }
        }
        // SAFETY: `tile` is a full mr x nr tile with row stride nr.
        unsafe { (self.run)(kc, ops, tile.as_mut_ptr(), self.nr, zero) };
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
pub(crate) trait Element: Real {
    /// The kernel for `path` (a path without a variant of its own for this type uses the nearest).
    fn kernel(path: KernelPath) -> Kernel<Self>;
}

impl Element for f32 {
    fn kernel(path: KernelPath) -> Kernel<f32> {
        match path {
            KernelPath::Portable => Kernel { mr: 4, nr: 8, run: portable::<f32, 4, 8> },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Kernel { mr: 6, nr: 16, run: x86::f32_avx2 },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => Kernel { mr: 12, nr: 32, run: x86::f32_avx512 },
            #[cfg(not(target_arch = "x86_64"))]
            _ => Kernel { mr: 4, nr: 8, run: portable::<f32, 4, 8> },
        }
    }
}

impl Element for f64 {
    fn kernel(path: KernelPath) -> Kernel<f64> {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::Avx512 => Kernel { mr: 4, nr: 8, run: x86::f64_fma },
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
    zero: bool,
) {
    let mut acc = [[T::zero(); NR]; MR];
    // SAFETY (whole body): every offset stays within the sizes of the contract above.
    unsafe {
        if !zero {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = *c.add(i * rs_c + j);
                }
            }
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

    use super::Operands;

    /// f64 for the finite-difference and parity tests: the portable body compiled with FMA.
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f64_fma(kc: usize, ops: Operands<f64>, c: *mut f64, rs_c: usize, zero: bool) {
        // SAFETY: forwarded contract.
        unsafe { super::portable::<f64, 4, 8>(kc, ops, c, rs_c, zero) }
    }

    /// 6 x 16 f32 tile: 12 ymm accumulators, two vectors of B and one broadcast of A per step.
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_avx2(kc: usize, ops: Operands<f32>, c: *mut f32, rs_c: usize, zero: bool) {
        const MR: usize = 6;
        // SAFETY (whole body): offsets within the contract's sizes.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            if !zero {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm256_loadu_ps(c.add(i * rs_c));
                    row[1] = _mm256_loadu_ps(c.add(i * rs_c + 8));
                }
            }
            let (mut a, mut b) = (ops.a, ops.b);
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(i * ops.rs_a));
                    row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                }
                a = a.add(ops.cs_a);
                b = b.add(ops.rs_b);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(c.add(i * rs_c), row[0]);
                _mm256_storeu_ps(c.add(i * rs_c + 8), row[1]);
            }
        }
    }

    /// 12 x 32 f32 tile: 24 zmm accumulators, two vectors of B and one broadcast of A per step.
    ///
    /// # Safety
    ///
    /// As [`super::TileFn`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_avx512(kc: usize, ops: Operands<f32>, c: *mut f32, rs_c: usize, zero: bool) {
        const MR: usize = 12;
        // SAFETY (whole body): offsets within the contract's sizes.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            if !zero {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_loadu_ps(c.add(i * rs_c));
                    row[1] = _mm512_loadu_ps(c.add(i * rs_c + 16));
                }
            }
            let (mut a, mut b) = (ops.a, ops.b);
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i * ops.rs_a));
                    row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                }
                a = a.add(ops.cs_a);
                b = b.add(ops.rs_b);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * rs_c), row[0]);
                _mm512_storeu_ps(c.add(i * rs_c + 16), row[1]);
            }
        }
    }
}
