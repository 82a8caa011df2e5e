//! Rotary position embeddings (RoPE), as transformers applies them (ModernBERT here; the Llama
//! family uses the same): each head's vector `x = (x1, x2)` (its two halves) becomes
//! `x * cos + (-x2, x1) * sin`, the angles `position * inv_freq[i]` repeated over both halves.
//!
//! The tables are made once per batch from the pure-Rust `libm` (the same bits on every machine).
//! On the CPU the rotation is one op over the heads in place; on a GPU it is candle's element-wise
//! multiply, add, negate and concatenate (exact per element, so the same bits, and differentiable),
//! which needs no kernel of its own.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::tape;
use super::{Real, slice, vectorized, with_real};

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

/// `x` `(tokens, width)` with its first `heads` heads of `head_dim` columns each rotated by its
/// token's row of the tables `(tokens, head_dim)` (see [`rotary_tables`]); the columns after them
/// (a packed product's values, say) pass through unchanged. So the queries and keys of one
/// `(tokens, q + k + v)` product rotate in place, with no split and concatenation.
///
/// On the CPU one op, forward and backward; its bits are those of the textbook composition
/// (`x * cos + rotate_half(x) * sin` as candle's element-wise ops, each element's two products
/// and one sum in the same order), which is what runs on a GPU.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (tokens, width) = x.dims2()?;
    let (rows, head_dim) = cos.dims2()?;
    let odd = head_dim == 0 || !head_dim.is_multiple_of(2);
    if rows != tokens || heads * head_dim > width || width == 0 || odd || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} with {heads} heads to rotate and tables {:?} / {:?} do not fit",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if !x.device().is_cpu() {
        return composed(x, cos, sin, heads);
    }
    tape::apply3(x, cos, sin, Rope { heads, head_dim })
}

/// [`rope`] as candle's element-wise ops (differentiable on every device).
fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (tokens, width) = x.dims2()?;
    let head_dim = cos.dim(1)?;
    let (half, rotated_width) = (head_dim / 2, heads * head_dim);
    let r = x.narrow(1, 0, rotated_width)?.reshape((tokens, heads, head_dim))?;
    let turned = Tensor::cat(&[&r.narrow(2, half, half)?.neg()?, &r.narrow(2, 0, half)?], 2)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let out = (r.broadcast_mul(&cos)? + turned.broadcast_mul(&sin)?)?.reshape((tokens, rotated_width))?;
    match rotated_width == width {
        true => Ok(out),
        false => Tensor::cat(&[&out, &x.narrow(1, rotated_width, width - rotated_width)?], 1),
    }
}

#[derive(Clone)]
struct Rope {
    heads: usize,
    head_dim: usize,
}

impl Rope {
    /// Each row of `x` (`width` wide) with its first heads rotated by its tables' row: forward,
    /// or with `backward` by the opposite angle (the transposed rotation, for the gradient), as
    /// the composed ops' backward sums it: `g * cos + rotate_half^T(g * sin)`.
    fn rotate<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], width: usize, backward: bool) -> Vec<T> {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let mut out = x.to_vec();
        out.par_chunks_mut(width).zip(cos.par_chunks(d).zip(sin.par_chunks(d))).enumerate().for_each(
            |(t, (y, (c, s)))| {
                let x = &x[t * width..][..width];
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).take(self.heads) {
                    let (y1, y2) = y.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    vectorized!({
                        if backward {
                            for i in 0..half {
                                y1[i] = x1[i] * c[i] + x2[i] * s[half + i];
                                y2[i] = x2[i] * c[half + i] - x1[i] * s[i];
                            }
                        } else {
                            for i in 0..half {
                                y1[i] = x1[i] * c[i] - x2[i] * s[i];
                                y2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
                            }
                        }
                    })
                }
            },
        );
        out
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = xl.shape().dims2()?.1;
        with_real!("rope", xs, T => {
            let (x, c, s) = (slice::<T>("rope", xs, xl)?, slice::<T>("rope", cs, cl)?, slice::<T>("rope", ss, sl)?);
            Ok((T::to_cpu_storage_owned(self.rotate(x, c, s, width, false)), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = RopeBackward(Rope { heads: self.heads, head_dim: self.head_dim });
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &op)?), None, None))
    }
}

struct RopeBackward(Rope);

impl CustomOp3 for RopeBackward {
    fn name(&self) -> &'static str {
        "rope-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = gl.shape().dims2()?.1;
        with_real!("rope-backward", gs, T => {
            let op = "rope-backward";
            let (g, c, s) = (slice::<T>(op, gs, gl)?, slice::<T>(op, cs, cl)?, slice::<T>(op, ss, sl)?);
            Ok((T::to_cpu_storage_owned(self.0.rotate(g, c, s, width, true)), gl.shape().clone()))
        })
    }
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
        check_grad(&input(&[5, 11], 4), |x| rope(x, &cos, &sin, 2).unwrap());
        Ok(())
    }

    /// The op gives the composition's bits, forward and backward (f32; two of three heads rotated,
    /// the third and two more columns passed through).
    #[test]
    fn equals_the_composed_ops_bit_for_bit() -> Result<()> {
        let positions: Vec<u32> = (0..29).map(|p| p * 7 % 23).collect();
        let (cos, sin) = rotary_tables(&positions, 8, 10_000.0, DType::F32, &Device::Cpu)?;
        let x = candle_core::Var::from_tensor(&input(&[29, 26], 4).to_dtype(DType::F32)?)?;
        let w = input(&[29, 26], 5).to_dtype(DType::F32)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        let (op, textbook) = (rope(&x, &cos, &sin, 2)?, composed(&x, &cos, &sin, 2)?);
        assert_eq!(bits(&op)?, bits(&textbook)?);
        let (go, gt) = ((op * &w)?.sum_all()?.backward()?, (textbook * &w)?.sum_all()?.backward()?);
        assert_eq!(bits(go.get(&x).unwrap())?, bits(gt.get(&x).unwrap())?);
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
