//! Rotary position embeddings (RoPE), as transformers applies them (ModernBERT here; the Llama
//! family uses the same): each head's vector `x = (x1, x2)` (its two halves) becomes
//! `x * cos + (-x2, x1) * sin`, the angles `position * inv_freq[i]` repeated over both halves.
//!
//! The tables are made once per batch from the pure-Rust `libm` (the same bits on every machine);
//! the rotation is candle's element-wise multiply, add, negate and concatenate, which are exact
//! per element and differentiable on every device, so the op needs no kernel of its own.

use candle_core::{DType, Device, Result, Tensor};

/// The `(cos, sin)` tables `(positions, head_dim)` for token positions `positions`, in `dtype`.
/// `inv_freq[i] = 1 / base^(2i / head_dim)` is computed in f32, as transformers computes it (and
/// keeps it, in a float64 model too); the angles and their cosines and sines in f64.
pub fn rotary_tables(
    positions: &[u32],
    head_dim: usize,
    base: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        candle_core::bail!("rotary embeddings: head width {head_dim} is not even");
    }
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            f64::from(1.0 / libm::powf(base as f32, exponent))
        })
        .collect();
    let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * head_dim), Vec::new());
    sin.reserve(positions.len() * head_dim);
    for &p in positions {
        for _ in 0..2 {
            for &f in &inv_freq {
                let angle = f64::from(p) * f;
                cos.push(libm::cos(angle));
                sin.push(libm::sin(angle));
            }
        }
    }
    let table = |v: Vec<f64>| Tensor::from_vec(v, (positions.len(), head_dim), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

/// `x` `(tokens, heads * head_dim)`, each head rotated by its token's row of the tables
/// `(tokens, head_dim)` (see [`rotary_tables`]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (tokens, width) = x.dims2()?;
    let (rows, head_dim) = cos.dims2()?;
    if rows != tokens || heads * head_dim != width || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} in {heads} heads and tables {:?} / {:?} do not fit",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let half = head_dim / 2;
    let x = x.reshape((tokens, heads, head_dim))?;
    let rotated = Tensor::cat(&[&x.narrow(2, half, half)?.neg()?, &x.narrow(2, 0, half)?], 2)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let out = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    out.reshape((tokens, width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn rotates_each_half_pair_by_its_angle() -> Result<()> {
        // One head of width 4: pairs (x0, x2) and (x1, x3) rotate by p * inv_freq[0] and [1].
        let (cos, sin) = rotary_tables(&[0, 3], 4, 100.0, DType::F64, &Device::Cpu)?;
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], &Device::Cpu)?;
        let got = rope(&x, &cos, &sin, 1)?.to_vec2::<f64>()?;
        assert_eq!(got[0], vec![1.0, 2.0, 3.0, 4.0], "position 0 is the identity");
        let inv = [1.0, f64::from(1.0f32 / 10.0)];
        for (i, &f) in inv.iter().enumerate() {
            let (c, s) = (libm::cos(3.0 * f), libm::sin(3.0 * f));
            let (a, b) = ([1.0, 2.0][i], [3.0, 4.0][i]);
            assert!((got[1][i] - (a * c - b * s)).abs() < 1e-12);
            assert!((got[1][i + 2] - (b * c + a * s)).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (cos, sin) = rotary_tables(&[0, 1, 2, 7, 0], 4, 10_000.0, DType::F64, &Device::Cpu)?;
        check_grad(&input(&[5, 8], 4), |x| rope(x, &cos, &sin, 2).unwrap());
        Ok(())
    }

    #[test]
    fn tables_that_do_not_fit_are_refused() {
        let (cos, sin) = rotary_tables(&[0, 1], 4, 10_000.0, DType::F64, &Device::Cpu).unwrap();
        assert!(rope(&input(&[3, 8], 1), &cos, &sin, 2).is_err(), "rows");
        assert!(rope(&input(&[2, 8], 1), &cos, &sin, 3).is_err(), "heads");
        assert!(rotary_tables(&[0], 3, 10_000.0, DType::F64, &Device::Cpu).is_err(), "odd width");
    }
}
