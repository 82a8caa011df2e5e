//! Layer normalisation over the last dimension, with a backward for input, weight and bias; its
//! uncentred twin, RMSNorm (the Llama family's), from the same kernels; and the residual
//! connection that closes each transformer block, `layer_norm(dropout(h) + x)`, as one op.
//!
//! Composed from candle ops, the residual costs a dropout pass and an add in the forward, and in
//! the backward the dropout's pass plus, for each of the four edges between them, the gradient
//! store's zero-filled buffer and addition. The fused op reads `h` and `x` once, recomputes the
//! sum and its dropout mask in the backward (nothing but its output is kept), and returns the
//! gradients of `h` and `x` from one pass. Both ops share the row kernels below, so their bits are
//! those of the composed ops.

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::DropMask;
use super::{ROW_BLOCK, Real, slice, vectorized, with_real};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension of `x`, as
/// `torch.nn.LayerNorm` (biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    tape::apply3(x, weight, bias, LayerNorm { eps, center: true })
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension of `x`, as transformers'
/// `LlamaRMSNorm`: [`layer_norm`] without centring and with a zero bias (which adds exactly
/// nothing, and is no parameter).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let bias = Tensor::zeros(weight.shape(), weight.dtype(), weight.device())?;
    tape::apply3(x, weight, &bias, LayerNorm { eps, center: false })
}

/// `layer_norm(dropout(h) + x)` with dropout probability `dropout` under mask `key` (the mask of
/// [`super::dropout`] on `h`, element for element): a transformer block's residual connection.
/// On a GPU it runs as those three ops.
pub fn residual_layer_norm(
    h: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    dropout: f64,
    key: u64,
) -> Result<Tensor> {
    let d = h.dims().last().copied().unwrap_or(0);
    if h.dims() != x.dims() || weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "residual layer norm: h {:?} and x {:?} must have one shape, weight {:?} and bias {:?} its last dimension",
            h.dims(),
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if !h.device().is_cpu() {
        return layer_norm(&tape::add(&super::dropout(h, dropout, key)?, x)?, weight, bias, eps);
    }
    // Three inputs at most per op: the weight and bias travel as the rows of one (2, d) tensor.
    let norm = tape::stack(&[weight.clone(), bias.clone()])?;
    let op = ResidualLayerNorm { eps, mask: DropMask::new(dropout, key) };
    tape::apply3(h, x, &norm, op)
}

#[derive(Clone)]
struct LayerNorm {
    eps: f64,
    /// Whether rows are centred on their mean (LayerNorm) or not (RMSNorm).
    center: bool,
}

/// Mean (0 when not centring) and reciprocal standard deviation (about that mean) of one row.
#[inline(always)]
fn moments<T: Real>(row: &[T], eps: f64, center: bool) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = if center { row.iter().copied().sum::<T>() / n } else { T::zero() };
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, (var + T::from_f64(eps)).sqrt().recip())
}

/// One row of the forward: `y = (x - mean) * rstd * w + b`. (The sums in [`moments`] stay
/// sequential; the element-wise loop vectorises inside [`vectorized!`] with the same bits.)
#[inline(always)]
fn normalize<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, center: bool, y: &mut [T]) {
    let (mean, rstd) = moments(x, eps, center);
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * rstd * w + b;
    }
}

/// One row of the backward: the input's gradient into `dx`, and the row's contributions to the
/// weight and bias gradients added to `acc` (`[dw; db]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn normalize_backward<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: f64,
    center: bool,
    dx: &mut [T],
    acc: &mut [T],
) {
    let d = x.len();
    let (mean, rstd) = moments(x, eps, center);
    let n = T::from_f64(d as f64);
    let (mut sum_gw, mut sum_gw_xhat) = (T::zero(), T::zero());
    for i in 0..d {
        let xhat = (x[i] - mean) * rstd;
        let gw = g[i] * w[i];
        sum_gw += gw;
        sum_gw_xhat += gw * xhat;
    }
    let (acc_w, acc_b) = acc.split_at_mut(d);
    for i in 0..d {
        acc_w[i] += g[i] * ((x[i] - mean) * rstd);
        acc_b[i] += g[i];
    }
    // Without centring, the mean's gradient term is absent.
    let mean_gw = if center { sum_gw / n } else { T::zero() };
    let mean_gw_xhat = sum_gw_xhat / n;
    for i in 0..d {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = rstd * (g[i] * w[i] - mean_gw - xhat * mean_gw_xhat);
    }
}

/// Sums per-block partials into `out`, block after block (a fixed order).
fn add_partials<T: Real>(partials: &[Vec<T>], out: &mut [T]) {
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += *v;
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("layer-norm", xs, T => {
            let x = slice::<T>("layer-norm", xs, xl)?;
            let w = slice::<T>("layer-norm", ws, wl)?;
            let b = slice::<T>("layer-norm", bs, bl)?;
            let d = w.len();
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(ROW_BLOCK * d).zip(x.par_chunks(ROW_BLOCK * d)).for_each(|(y, x)| {
                vectorized!({
                    for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                        normalize(x, w, b, self.eps, self.center, y);
                    }
                })
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(xs);
        cuda::with_float!("layer-norm", xs, T => {
            let x = cuda::input::<T>("layer-norm", xs, xl)?;
            let w = cuda::input::<T>("layer-norm", ws, wl)?;
            let b = cuda::input::<T>("layer-norm", bs, bl)?;
            let d = w.len();
            if d == 0 || b.len() != d || x.len() % d != 0 {
                candle_core::bail!("layer-norm: x {:?}, weight {:?}, bias {:?} do not fit", xl.shape(), wl.shape(), bl.shape());
            }
            let rows = x.len() / d;
            let mut y = cuda::alloc::<T>(dev, x.len())?;
            let kernel = cuda::Kernel::typed::<T>(dev, "layer_norm_fwd")?;
            let mut args = kernel.args();
            let (r, di, eps, center) = (rows as i32, d as i32, self.eps as f32, i32::from(self.center));
            args.arg(&x).arg(&w).arg(&b).arg(&mut y).arg(&r).arg(&di).arg(&eps).arg(&center);
            cuda::launch(args, cuda::warp_rows(rows))?;
            Ok((cuda::storage(dev, y), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One kernel returns [dx rows..., dweight, dbias] stacked as (rows + 2, d).
        let d = weight.elem_count();
        let rows = x.elem_count() / d;
        let packed = x.contiguous()?.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps, center: self.center },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.get(rows)?;
        let db = packed.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f64,
    center: bool,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("layer-norm-backward", xs, T => {
            let x = slice::<T>("layer-norm-backward", xs, xl)?;
            let w = slice::<T>("layer-norm-backward", ws, wl)?;
            let g = slice::<T>("layer-norm-backward", gs, gl)?;
            let d = w.len();
            let rows = x.len() / d;
            let mut out = vec![T::zero(); (rows + 2) * d];
            let (dx, dwb) = out.split_at_mut(rows * d);
            // Per block of ROW_BLOCK rows: dx for those rows, and the block's partial dw and db.
            let partials: Vec<Vec<T>> = dx
                .par_chunks_mut(ROW_BLOCK * d)
                .zip(x.par_chunks(ROW_BLOCK * d).zip(g.par_chunks(ROW_BLOCK * d)))
                .map(|(dx, (x, g))| {
                    let mut acc = vec![T::zero(); 2 * d];
                    vectorized!({
                        for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                            normalize_backward(x, w, g, self.eps, self.center, dx, &mut acc);
                        }
                    });
                    acc
                })
                .collect();
            add_partials(&partials, dwb);
            Ok((T::to_cpu_storage_owned(out), Shape::from((rows + 2, d))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(xs);
        cuda::with_float!("layer-norm-backward", xs, T => {
            let x = cuda::input::<T>("layer-norm-backward", xs, xl)?;
            let w = cuda::input::<T>("layer-norm-backward", ws, wl)?;
            let g = cuda::input::<T>("layer-norm-backward", gs, gl)?;
            let d = w.len();
            if d == 0 || x.len() % d != 0 || g.len() != x.len() {
                candle_core::bail!("layer-norm-backward: x {:?}, weight {:?}, grad {:?} do not fit", xl.shape(), wl.shape(), gl.shape());
            }
            let rows = x.len() / d;
            // The CPU's layout: [dx rows..., dweight, dbias] as (rows + 2, d).
            let mut out = cuda::alloc::<T>(dev, (rows + 2) * d)?;
            let mut stats = cuda::alloc::<f32>(dev, 2 * rows)?;
            let (r, di, eps, center) = (rows as i32, d as i32, self.eps as f32, i32::from(self.center));
            {
                let kernel = cuda::Kernel::typed::<T>(dev, "layer_norm_bwd_dx")?;
                let mut args = kernel.args();
                let mut dx = out.slice_mut(..rows * d);
                args.arg(&x).arg(&w).arg(&g).arg(&mut dx).arg(&mut stats).arg(&r).arg(&di).arg(&eps).arg(&center);
                cuda::launch(args, cuda::warp_rows(rows))?;
            }
            let (config, blocks) = cuda::row_blocks(rows, d);
            let mut partials = cuda::alloc::<f32>(dev, blocks * 2 * d)?;
            {
                let kernel = cuda::Kernel::typed::<T>(dev, "layer_norm_bwd_partials")?;
                let mut args = kernel.args();
                args.arg(&x).arg(&g).arg(&stats).arg(&mut partials).arg(&r).arg(&di);
                cuda::launch(args, config)?;
            }
            cuda::finish_column_sums(dev, &partials, blocks, 2 * d, &mut out.slice_mut(rows * d..))?;
            Ok((cuda::storage(dev, out), Shape::from((rows + 2, d))))
        })
    }
}

/// The op behind [`residual_layer_norm`] (CPU only): inputs `h`, `x` and the `(2, d)` stack of
/// weight and bias.
#[derive(Clone)]
struct ResidualLayerNorm {
    eps: f64,
    mask: Option<DropMask>,
}

impl ResidualLayerNorm {
    /// Row `row` of `dropout(h) + x` into `s` (the dropout op's counter: the element's index).
    #[inline(always)]
    fn sum_row<T: Real>(&self, row: usize, h: &[T], x: &[T], factors: &mut [T], s: &mut [T]) {
        match self.mask {
            Some(mask) => {
                mask.factors((row * h.len()) as u64, factors);
                for (((s, &h), &x), &f) in s.iter_mut().zip(h).zip(x).zip(&*factors) {
                    *s = h * f + x;
                }
            }
            None => s.iter_mut().zip(h).zip(x).for_each(|((s, &h), &x)| *s = h + x),
        }
    }
}

impl CustomOp3 for ResidualLayerNorm {
    fn name(&self) -> &'static str {
        "residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ns: &CpuStorage,
        nl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("residual-layer-norm", hs, T => {
            let h = slice::<T>("residual-layer-norm", hs, hl)?;
            let x = slice::<T>("residual-layer-norm", xs, xl)?;
            let norm = slice::<T>("residual-layer-norm", ns, nl)?;
            let d = norm.len() / 2;
            if d == 0 || norm.len() != 2 * d || h.len() != x.len() || h.len() % d != 0 {
                candle_core::bail!("residual-layer-norm: h {:?}, x {:?}, weight and bias {:?} do not fit", hl.shape(), xl.shape(), nl.shape());
            }
            let (w, b) = norm.split_at(d);
            let mut out = vec![T::zero(); h.len()];
            out.par_chunks_mut(ROW_BLOCK * d)
                .zip(h.par_chunks(ROW_BLOCK * d).zip(x.par_chunks(ROW_BLOCK * d)))
                .enumerate()
                .for_each(|(block, (y, (h, x)))| {
                    let (mut s, mut factors) = (vec![T::zero(); d], vec![T::zero(); d]);
                    vectorized!({
                        for (r, ((y, h), x)) in y.chunks_mut(d).zip(h.chunks(d)).zip(x.chunks(d)).enumerate() {
                            self.sum_row(block * ROW_BLOCK + r, h, x, &mut factors, &mut s);
                            normalize(&s, w, b, self.eps, true, y);
                        }
                    })
                });
            Ok((T::to_cpu_storage_owned(out), hl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        h: &Tensor,
        x: &Tensor,
        norm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One pass returns [dh rows..., dx rows..., dweight, dbias] stacked as (2 rows + 2, d).
        let d = norm.elem_count() / 2;
        let rows = h.elem_count() / d;
        let backward = ResidualLayerNormBackward { eps: self.eps, mask: self.mask, norm: norm.contiguous()? };
        let packed = h.contiguous()?.apply_op3_no_bwd(&x.contiguous()?, &grad.contiguous()?, &backward)?;
        let dh = packed.narrow(0, 0, rows)?.reshape(h.shape())?;
        let dx = packed.narrow(0, rows, rows)?.reshape(x.shape())?;
        let dnorm = packed.narrow(0, 2 * rows, 2)?;
        Ok((Some(dh), Some(dx), Some(dnorm)))
    }
}

/// The backward of [`ResidualLayerNorm`] on `(h, x, grad)`; the norm's weight and bias come along.
struct ResidualLayerNormBackward {
    eps: f64,
    mask: Option<DropMask>,
    norm: Tensor,
}

impl CustomOp3 for ResidualLayerNormBackward {
    fn name(&self) -> &'static str {
        "residual-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (norm_storage, nl) = self.norm.storage_and_layout();
        let candle_core::Storage::Cpu(ns) = &*norm_storage else {
            candle_core::bail!("residual-layer-norm-backward: the weight is not on the CPU")
        };
        let forward = ResidualLayerNorm { eps: self.eps, mask: self.mask };
        with_real!("residual-layer-norm-backward", hs, T => {
            let h = slice::<T>("residual-layer-norm-backward", hs, hl)?;
            let x = slice::<T>("residual-layer-norm-backward", xs, xl)?;
            let g = slice::<T>("residual-layer-norm-backward", gs, gl)?;
            let w = &slice::<T>("residual-layer-norm-backward", ns, nl)?[..nl.shape().elem_count() / 2];
            let d = w.len();
            let rows = h.len() / d;
            let mut out = vec![T::zero(); (2 * rows + 2) * d];
            let (dh, rest) = out.split_at_mut(rows * d);
            let (dx, dwb) = rest.split_at_mut(rows * d);
            let block = ROW_BLOCK * d;
            // Per block of ROW_BLOCK rows: dh and dx for those rows, and the block's partial dw and
            // db. dx is the sum's gradient, dh the same through the dropout mask.
            let partials: Vec<Vec<T>> = dh
                .par_chunks_mut(block)
                .zip(dx.par_chunks_mut(block))
                .zip(h.par_chunks(block).zip(x.par_chunks(block)).zip(g.par_chunks(block)))
                .enumerate()
                .map(|(b, ((dh, dx), ((h, x), g)))| {
                    let mut acc = vec![T::zero(); 2 * d];
                    let (mut s, mut factors) = (vec![T::zero(); d], vec![T::zero(); d]);
                    vectorized!({
                        let rows = dh.chunks_mut(d).zip(dx.chunks_mut(d)).zip(h.chunks(d).zip(x.chunks(d)).zip(g.chunks(d)));
                        for (r, ((dh, dx), ((h, x), g))) in rows.enumerate() {
                            forward.sum_row(b * ROW_BLOCK + r, h, x, &mut factors, &mut s);
                            normalize_backward(&s, w, g, self.eps, true, dx, &mut acc);
                            match forward.mask {
                                Some(_) => dh.iter_mut().zip(&*dx).zip(&factors).for_each(|((dh, &ds), &f)| *dh = ds * f),
                                None => dh.copy_from_slice(dx),
                            }
                        }
                    });
                    acc
                })
                .collect();
            add_partials(&partials, dwb);
            Ok((T::to_cpu_storage_owned(out), Shape::from((2 * rows + 2, d))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn matches_the_definition() -> Result<()> {
        let x = input(&[3, 5], 1);
        let (w, b) = (input(&[5], 2), input(&[5], 3));
        let got = layer_norm(&x, &w, &b, 1e-5)?;
        let mean = x.mean_keepdim(1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let want = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?.broadcast_add(&b)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        // 70 rows: more than two reduction blocks, the last one partial.
        let (x, w, b) = (input(&[70, 6], 1), input(&[6], 2), input(&[6], 3));
        check_grad(&x, |x| layer_norm(x, &w, &b, 1e-5).unwrap());
        check_grad(&w, |w| layer_norm(&x, w, &b, 1e-5).unwrap());
        check_grad(&b, |b| layer_norm(&x, &w, b, 1e-5).unwrap());
        check_grad(&x, |x| rms_norm(x, &w, 1e-6).unwrap());
        check_grad(&w, |w| rms_norm(&x, w, 1e-6).unwrap());
    }

    /// RMSNorm is the textbook `x / sqrt(mean(x^2) + eps) * w`.
    #[test]
    fn rms_norm_matches_the_textbook_composition() -> Result<()> {
        let (x, w) = (input(&[70, 6], 1), input(&[6], 2));
        let rms = ((x.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?).recip()?;
        let want = x.broadcast_mul(&rms)?.broadcast_mul(&w)?;
        let diff = (rms_norm(&x, &w, 1e-6)? - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    /// The fused residual equals the ops it replaces, bit for bit (f32, with and without dropout,
    /// more rows than one reduction block), forward and all gradients.
    #[test]
    fn residual_is_dropout_add_and_layer_norm_bit_for_bit() -> Result<()> {
        use candle_core::{DType, Var};
        let f32 = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let (h, x) = (f32(input(&[70, 24], 1)), f32(input(&[70, 24], 2)));
        let (w, b) = (f32(input(&[24], 3)), f32(input(&[24], 4)));
        let probe = input(&[70, 24], 5).to_dtype(DType::F32)?;
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for p in [0.0, 0.3] {
            let fused = residual_layer_norm(&h, &x, &w, &b, 1e-12, p, 9)?;
            let composed = layer_norm(&(super::super::dropout(&h, p, 9)? + x.as_tensor())?, &w, &b, 1e-12)?;
            assert_eq!(bits(&fused), bits(&composed), "forward, p = {p}");
            let (gf, gc) =
                ((fused * &probe)?.sum_all()?.backward()?, (composed * &probe)?.sum_all()?.backward()?);
            for (name, v) in [("h", &h), ("x", &x), ("weight", &w), ("bias", &b)] {
                assert_eq!(bits(gf.get(v).unwrap()), bits(gc.get(v).unwrap()), "{name}'s gradient, p = {p}");
            }
        }
        Ok(())
    }

    #[test]
    fn residual_gradients_match_finite_differences() {
        let (h, x) = (input(&[70, 6], 1), input(&[70, 6], 2));
        let (w, b) = (input(&[6], 3), input(&[6], 4));
        for p in [0.0, 0.3] {
            check_grad(&h, |h| residual_layer_norm(h, &x, &w, &b, 1e-5, p, 5).unwrap());
            check_grad(&x, |x| residual_layer_norm(&h, x, &w, &b, 1e-5, p, 5).unwrap());
            check_grad(&w, |w| residual_layer_norm(&h, &x, w, &b, 1e-5, p, 5).unwrap());
            check_grad(&b, |b| residual_layer_norm(&h, &x, &w, b, 1e-5, p, 5).unwrap());
        }
    }
}
