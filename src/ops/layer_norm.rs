//! Layer normalisation over the last dimension, with a backward for input, weight and bias.

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{ROW_BLOCK, Real, slice, with_real};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension of `x`, as
/// `torch.nn.LayerNorm` (biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(weight, bias, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// Mean and reciprocal standard deviation of one row.
fn moments<T: Real>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, (var + T::from_f64(eps)).sqrt().recip())
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
            out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
                let (mean, rstd) = moments(x, self.eps);
                for i in 0..d {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
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
            let (r, di, eps) = (rows as i32, d as i32, self.eps as f32);
            args.arg(&x).arg(&w).arg(&b).arg(&mut y).arg(&r).arg(&di).arg(&eps);
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
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.get(rows)?;
        let db = packed.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f64,
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
                    for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let (mean, rstd) = moments(x, self.eps);
                        let n = T::from_f64(d as f64);
                        let mut sum_gw = T::zero();
                        let mut sum_gw_xhat = T::zero();
                        for i in 0..d {
                            let xhat = (x[i] - mean) * rstd;
                            let gw = g[i] * w[i];
                            sum_gw += gw;
                            sum_gw_xhat += gw * xhat;
                            acc[i] += g[i] * xhat;
                            acc[d + i] += g[i];
                        }
                        let (mean_gw, mean_gw_xhat) = (sum_gw / n, sum_gw_xhat / n);
                        for i in 0..d {
                            let xhat = (x[i] - mean) * rstd;
                            dx[i] = rstd * (g[i] * w[i] - mean_gw - xhat * mean_gw_xhat);
                        }
                    }
                    acc
                })
                .collect();
            for p in &partials {
                for (o, v) in dwb.iter_mut().zip(p) {
                    *o += *v;
                }
            }
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
            let (r, di, eps) = (rows as i32, d as i32, self.eps as f32);
            {
                let kernel = cuda::Kernel::typed::<T>(dev, "layer_norm_bwd_dx")?;
                let mut args = kernel.args();
                let mut dx = out.slice_mut(..rows * d);
                args.arg(&x).arg(&w).arg(&g).arg(&mut dx).arg(&mut stats).arg(&r).arg(&di).arg(&eps);
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
    }
}
