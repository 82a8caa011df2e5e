//! Transcendental functions with the same bits on every machine.
//!
//! `f32::exp`, `tanh` and `ln` call the system's C library, whose results may differ in the last
//! bit between glibc versions, between glibc and musl, and between x86-64 and aarch64. A model
//! trained with them would give different weights on a colleague's machine under the same stage
//! key. So the kernels never call them (clippy's `disallowed-methods` in `clippy.toml` enforces it):
//!
//! - **f32**, the training dtype: pipe's own code below, built from IEEE-754 additions,
//!   multiplications and divisions only (no FMA, no table lookups), which every CPU rounds alike.
//!   Branch-light so that loops over them vectorise; accuracy within a few ulp (tested against f64).
//! - **f64**, used by the finite-difference tests, the learning-rate schedule and weight
//!   initialisation: the `libm` crate, a pure-Rust port of musl's libm compiled into pipe, so its
//!   bits are fixed by `Cargo.lock`, not by the machine.
//!
//! A change to any of these changes trained bits: bump the train and evaluate stage versions in the
//! same commit (the golden digests in `tests/determinism.rs` fail until then).

/// `2^e` for `-126 <= e <= 127`, built from its bits.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits((e.wrapping_add(127) as u32) << 23)
}

/// `e^x` for f32: Cody-Waite reduction `x = n ln2 + r` (|r| <= ln2 / 2), Cephes' degree-5 polynomial
/// for `e^r`, and scaling by `2^n` in two steps so that `n = 128` and subnormal results are exact
/// powers. About 1 ulp; `+inf` above 88.72, `0` below -103.97, NaN stays NaN.
#[allow(clippy::excessive_precision)] // coefficients as published
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -103.972_08;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const SHIFTER: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_375; // ln 2, high part: few bits, so n * C1 is exact
    const C2: f32 = -2.121_944_4e-4; // ln 2 - C1
    let xc = x.clamp(LO, HI);
    let shifted = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (xc - n * C1) - n * C2;
    let z = r * r;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1)
        * z
        + r
        + 1.0;
    // `n` as an integer, read off the shifted sum's bits (the low mantissa bits, two's complement
    // about 1.5 * 2^23): a float-to-int cast saturates and maps NaN to 0, which compilers do
    // one lane at a time. A NaN `x` gives a meaningless integer here and NaN below all the same.
    let n = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let half = n / 2;
    let y = p * pow2(half) * pow2(n - half);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// Natural logarithm for f32: `x = m 2^e` with `m` in [sqrt(1/2), sqrt(2)), then
/// `ln m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`, by its series to `s^11`. Within 2 ulp.
#[allow(clippy::excessive_precision)] // coefficients as published
pub fn ln(x: f32) -> f32 {
    const LN2_HI: f32 = 6.931_381_2e-1; // few bits, so e * LN2_HI is exact
    const LN2_LO: f32 = 9.058_000_6e-6;
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (mut bits, mut e) = (x.to_bits(), 0i32);
    if bits < 0x0080_0000 {
        // Subnormal: scale into the normal range first.
        bits = (x * 8_388_608.0).to_bits();
        e = -23;
    }
    e += (bits >> 23) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(1 + f) = f - s (f - R) with s = f / (2 + f) and R = 2 s^2/3 + 2 s^4/5 + ...: f is exact
    // (Sterbenz), so only the small correction terms round (fdlibm's arrangement).
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let r = z * (2.0 / 3.0 + z * (2.0 / 5.0 + z * (2.0 / 7.0 + z * (2.0 / 9.0 + z * (2.0 / 11.0)))));
    let hfsq = 0.5 * f * f;
    let ef = e as f32;
    ef * LN2_HI - ((hfsq - (s * (hfsq + r) + ef * LN2_LO)) - f)
}

/// Hyperbolic tangent for f32: Cephes' odd polynomial below |x| = 0.625, else
/// `1 - 2 / (e^{2|x|} + 1)`; exactly ±1 from |x| = 9 on. About 2 ulp.
#[allow(clippy::excessive_precision)] // coefficients as published
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let t = if a < 0.625 {
        let z = x * x;
        ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328_2e-1)
            * z
            * a
            + a
    } else if a < 9.0 {
        1.0 - 2.0 / (exp(2.0 * a) + 1.0)
    } else if a.is_nan() {
        return x;
    } else {
        1.0
    };
    t.copysign(x)
}

/// The error function for f32: Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the
/// approximation PyTorch's vectorised CPU `erf` uses; in f32 the result is within 1e-6), with
/// pipe's [`exp`].
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly =
        t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// Softmax of one row of f32 logits (class probabilities), with [`exp`].
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut p: Vec<f32> = logits.iter().map(|&x| exp(x - max)).collect();
    let sum = p.iter().fold(0f32, |s, &v| s + v);
    p.iter_mut().for_each(|v| *v /= sum);
    p
}

/// `x^n` by binary powering, in a fixed order (for AdamW's bias corrections).
pub fn powi(x: f64, n: u64) -> f64 {
    let (mut base, mut n, mut acc) = (x, n, 1.0);
    while n > 0 {
        if n & 1 == 1 {
            acc *= base;
        }
        base *= base;
        n >>= 1;
    }
    acc
}

/// `cos` for f64 (the cosine schedule), from the pure-Rust `libm` crate.
pub fn cos_f64(x: f64) -> f64 {
    libm::cos(x)
}

/// Natural logarithm for f64 (losses in reports, normal draws), from the pure-Rust `libm` crate.
pub fn ln_f64(x: f64) -> f64 {
    libm::log(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact (f64) value.
    fn ulps(got: f32, want: f64) -> f64 {
        if got as f64 == want || (got.is_nan() && want.is_nan()) {
            return 0.0;
        }
        let want32 = want as f32;
        let ulp = (f32::from_bits(want32.abs().to_bits() + 1) - want32.abs()) as f64;
        ((got as f64 - want) / ulp).abs()
    }

    /// Every 97th f32 bit pattern between two values, plus the ends.
    fn sweep(lo: f32, hi: f32) -> impl Iterator<Item = f32> {
        let to_ordered = |x: f32| if x < 0.0 { -(x.abs().to_bits() as i64) } else { x.to_bits() as i64 };
        let from_ordered =
            |i: i64| if i < 0 { -f32::from_bits((-i) as u32) } else { f32::from_bits(i as u32) };
        let (a, b) = (to_ordered(lo), to_ordered(hi));
        (a..=b).step_by(97).map(from_ordered).chain([lo, hi])
    }

    #[allow(clippy::disallowed_methods)] // the system's f64 functions are the reference here
    #[test]
    fn f32_functions_are_within_a_few_ulp() {
        let mut worst = [0f64; 4];
        for x in sweep(-103.0, 88.7) {
            worst[0] = worst[0].max(ulps(exp(x), (x as f64).exp()));
        }
        for x in sweep(1e-44, 3e38) {
            worst[1] = worst[1].max(ulps(ln(x), (x as f64).ln()));
        }
        for x in sweep(-12.0, 12.0) {
            worst[2] = worst[2].max(ulps(tanh(x), (x as f64).tanh()));
        }
        for x in sweep(-6.0, 6.0) {
            let err = (erf(x) as f64 - libm::erf(x as f64)).abs();
            worst[3] = worst[3].max(err);
        }
        assert!(worst[0] <= 2.0, "exp: {} ulp", worst[0]);
        assert!(worst[1] <= 2.0, "ln: {} ulp", worst[1]);
        assert!(worst[2] <= 3.0, "tanh: {} ulp", worst[2]);
        assert!(worst[3] <= 1e-6, "erf: absolute error {}", worst[3]);
    }

    #[test]
    fn special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-100.0) > 0.0, "subnormal results are kept");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan());
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert_eq!(tanh(20.0), 1.0);
        assert_eq!(tanh(-20.0), -1.0);
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(powi(0.999, 0), 1.0);
        assert_eq!(powi(2.0, 10), 1024.0);
    }
}
