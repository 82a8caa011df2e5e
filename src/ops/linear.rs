//! Dense layers as one fused op: `x W^T + b` in a single GEMM, with a backward that computes the
//! three gradients directly.
//!
//! Composed from candle ops, a linear layer costs a transposed view, a GEMM, a broadcast add, and
//! in the backward two GEMMs on transposed views, a transpose of the weight gradient and a
//! strided reduction for the bias. Here the forward's GEMM starts every element's chain from its
//! bias; the backward calls the GEMM with the strides that express the transposes (a wide weight
//! gradient as its transpose's product), and reduces the bias gradient in fixed row blocks. The
//! GEMM ([`super::gemm`]) sums every element in one fixed order, so results depend neither on the
//! thread count nor on the CPU.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::gemm::{MatRef, Products, Threads, product_new, product_new_from_row, transposed};
use super::tape;
use super::{Activation, ROW_BLOCK, slice, with_real};

/// `x W^T + b` for `x` `(rows, in)`, `weight` `(out, in)` (torch's layout), `bias` `(out)`; on
/// the CPU, this product and the two of the backward take operands in `products`' precision.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, products: Products) -> Result<Tensor> {
    tape::apply3(x, weight, bias, Linear(products))
}

/// `linear(activation(z))` (the feed-forward block's second layer) without keeping the activation:
/// on the CPU the op keeps only `z` and recomputes the activation for the weight's gradient, so a
/// training step holds one `(rows, in)` tensor per layer instead of two. The same bits as the two
/// ops. On a GPU it runs as those two ops.
pub fn activated_linear(
    z: &Tensor,
    activation: Activation,
    weight: &Tensor,
    bias: &Tensor,
    products: Products,
) -> Result<Tensor> {
    if !z.device().is_cpu() {
        return linear(&super::activation(z, activation)?, weight, bias, products);
    }
    tape::apply3(z, weight, bias, ActivatedLinear { activation, products })
}

/// The op behind [`activated_linear`].
#[derive(Clone)]
struct ActivatedLinear {
    activation: Activation,
    products: Products,
}

impl CustomOp3 for ActivatedLinear {
    fn name(&self) -> &'static str {
        "activated-linear"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("activated-linear", zs, T => {
            let a = self.activation.apply(slice::<T>("activated-linear", zs, zl)?);
            let storage = T::to_cpu_storage_owned(a);
            Linear(self.products).cpu_fwd(&storage, &Layout::contiguous(zl.shape()), ws, wl, bs, bl)
        })
    }

    /// (The op runs on the CPU only, see [`activated_linear`].) The activation's values and slopes
    /// come from one pass, after the input's gradient: the same bits as recomputing the
    /// activation for the weight's gradient and running its backward apart.
    fn bwd(
        &self,
        z: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let da = grad_input(&grad, weight, self.products)?;
        let (a, dz) = self.activation.forward_and_backward(z, &da)?;
        let (dw, db) = grad_weight_and_bias(&grad, &a, bias, self.products)?;
        Ok((Some(dz), Some(dw), db))
    }
}

#[derive(Clone)]
struct Linear(Products);

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, inp) = xl.shape().dims2()?;
        let (out, w_in) = wl.shape().dims2()?;
        if w_in != inp || bl.shape().elem_count() != out {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not fit",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        with_real!("linear", xs, T => {
            let x = slice::<T>("linear", xs, xl)?;
            let w = slice::<T>("linear", ws, wl)?;
            let b = slice::<T>("linear", bs, bl)?;
            // Every chain starts from the bias (the bits of seeding `y` with it first, without that
            // pass over `y`: 2% of a training step).
            let (x, w) = (MatRef::row_major(x, rows, inp), MatRef::row_major(w, out, inp).t());
            let y = product_new_from_row(b, x, w, Threads::Pool, self.0);
            Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out))))
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
        let (rows, inp) = xl.shape().dims2()?;
        let (out, w_in) = wl.shape().dims2()?;
        if w_in != inp || bl.shape().elem_count() != out {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not fit",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        let dev = cuda::device(xs);
        cuda::with_float!("linear", xs, T => {
            let x = cuda::input::<T>("linear", xs, xl)?;
            let w = cuda::input::<T>("linear", ws, wl)?;
            let b = cuda::input::<T>("linear", bs, bl)?;
            // y = b in every row, then y += x W^T.
            let mut y = cuda::alloc::<T>(dev, rows * out)?;
            let kernel = cuda::Kernel::typed::<T>(dev, "broadcast_rows")?;
            let mut args = kernel.args();
            args.arg(&b).arg(&mut y).arg(&rows).arg(&out);
            cuda::launch(args, cuda::elementwise(rows * out))?;
            let product = cuda::Product { tb: true, accumulate: true, ..cuda::Product::new(rows, out, inp) };
            product.run(dev, &x, &w, &mut y.as_view_mut())?;
            Ok((cuda::storage(dev, y), Shape::from((rows, out))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = gradients(x, weight, bias, grad, self.0)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The gradients of `x W^T + b` for the output's gradient `grad`: `(dx, dW, db)`, without `db`
/// when the bias is a constant (a layer without one, as the Llama family's, passes zeros).
fn gradients(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    products: Products,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let dx = grad_input(&grad, weight, products)?;
    let (dw, db) = grad_weight_and_bias(&grad, x, bias, products)?;
    Ok((dx, dw, db))
}

/// `dx = g W` for a contiguous `grad`.
fn grad_input(grad: &Tensor, weight: &Tensor, products: Products) -> Result<Tensor> {
    grad.apply_op2_no_bwd(weight, &GradInput(products))
}

/// `(dW, db)` for a contiguous `grad` (see [`gradients`]).
fn grad_weight_and_bias(
    grad: &Tensor,
    x: &Tensor,
    bias: &Tensor,
    products: Products,
) -> Result<(Tensor, Option<Tensor>)> {
    let dw = grad.apply_op2_no_bwd(x, &GradWeight(products))?;
    let db = match bias.track_op() {
        true => Some(grad.apply_op1_no_bwd(&GradBias)?),
        false => None,
    };
    Ok((dw, db))
}

/// `dx = g W`: `(rows, out) x (out, in)`.
struct GradInput(Products);

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = wl.shape().dims2()?;
        with_real!("linear-grad-input", gs, T => {
            let g = slice::<T>("linear-grad-input", gs, gl)?;
            let w = slice::<T>("linear-grad-input", ws, wl)?;
            let (g, w) = (MatRef::row_major(g, rows, out), MatRef::row_major(w, out, inp));
            let dx = product_new(g, w, Threads::Pool, self.0);
            Ok((T::to_cpu_storage_owned(dx), Shape::from((rows, inp))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = wl.shape().dims2()?;
        let dev = cuda::device(gs);
        cuda::with_float!("linear-grad-input", gs, T => {
            let g = cuda::input::<T>("linear-grad-input", gs, gl)?;
            let w = cuda::input::<T>("linear-grad-input", ws, wl)?;
            let dx = cuda::Product::new(rows, inp, out).output(dev, &g, &w)?;
            Ok((cuda::storage(dev, dx), Shape::from((rows, inp))))
        })
    }
}

/// `dW = g^T x`: `(out, rows) x (rows, in)`.
struct GradWeight(Products);

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = xl.shape().dims2()?;
        with_real!("linear-grad-weight", gs, T => {
            let g = slice::<T>("linear-grad-weight", gs, gl)?;
            let x = slice::<T>("linear-grad-weight", xs, xl)?;
            let (g, x) = (MatRef::row_major(g, rows, out), MatRef::row_major(x, rows, inp));
            // A wide dW (the FFN's down projection: 384 x 1536) is computed as its transpose
            // `x^T g` and transposed back: the same chains (an FMA's product commutes), and the
            // GEMM runs that product's shape at 440-470 GFLOP/s where the wide one ran at 330-350.
            let dw = match out < inp {
                true => transposed(&product_new(x.t(), g, Threads::Pool, self.0), inp, out),
                false => product_new(g.t(), x, Threads::Pool, self.0),
            };
            Ok((T::to_cpu_storage_owned(dw), Shape::from((out, inp))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (_, inp) = xl.shape().dims2()?;
        let dev = cuda::device(gs);
        cuda::with_float!("linear-grad-weight", gs, T => {
            let g = cuda::input::<T>("linear-grad-weight", gs, gl)?;
            let x = cuda::input::<T>("linear-grad-weight", xs, xl)?;
            let product = cuda::Product { ta: true, ..cuda::Product::new(out, inp, rows) };
            let dw = product.output(dev, &g, &x)?;
            Ok((cuda::storage(dev, dw), Shape::from((out, inp))))
        })
    }
}

/// `db = sum over rows of g`, in fixed row blocks.
struct GradBias;

impl CustomOp1 for GradBias {
    fn name(&self) -> &'static str {
        "linear-grad-bias"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, out) = gl.shape().dims2()?;
        with_real!("linear-grad-bias", gs, T => {
            let g = slice::<T>("linear-grad-bias", gs, gl)?;
            let partials: Vec<Vec<T>> = g
                .par_chunks(ROW_BLOCK * out)
                .map(|block| {
                    let mut acc = vec![T::zero(); out];
                    for row in block.chunks(out) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                })
                .collect();
            let mut db = vec![T::zero(); out];
            for p in &partials {
                for (a, &v) in db.iter_mut().zip(p) {
                    *a += v;
                }
            }
            Ok((T::to_cpu_storage_owned(db), Shape::from(out)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let dev = cuda::device(gs);
        cuda::with_float!("linear-grad-bias", gs, T => {
            let g = cuda::input::<T>("linear-grad-bias", gs, gl)?;
            let mut db = cuda::alloc::<T>(dev, out)?;
            cuda::column_sums(dev, &g, rows, out, &mut db.as_view_mut())?;
            Ok((cuda::storage(dev, db), Shape::from(out)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[allow(clippy::disallowed_methods)] // candle as the reference
    #[test]
    fn matches_matmul_plus_bias() -> Result<()> {
        let (x, w, b) = (input(&[70, 5], 1), input(&[3, 5], 2), input(&[3], 3));
        let got = linear(&x, &w, &b, Products::Full)?;
        let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (x, w, b) = (input(&[70, 5], 1), input(&[3, 5], 2), input(&[3], 3));
        check_grad(&x, |x| linear(x, &w, &b, Products::Full).unwrap());
        check_grad(&w, |w| linear(&x, w, &b, Products::Full).unwrap());
        check_grad(&b, |b| linear(&x, &w, b, Products::Full).unwrap());
    }

    /// The fused op equals the activation followed by the linear layer, bit for bit (f32), forward
    /// and every gradient; and its gradients match finite differences (f64).
    #[test]
    fn activated_linear_is_activation_then_linear() -> Result<()> {
        use candle_core::{DType, Var};
        let f32 = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let (z, w, b) = (f32(input(&[70, 5], 1)), f32(input(&[3, 5], 2)), f32(input(&[3], 3)));
        let probe = input(&[70, 3], 4).to_dtype(DType::F32)?;
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let fused = activated_linear(&z, act, &w, &b, Products::Full)?;
            let composed = linear(&crate::ops::activation(&z, act)?, &w, &b, Products::Full)?;
            assert_eq!(bits(&fused), bits(&composed), "{act:?} forward");
            let (gf, gc) =
                ((fused * &probe)?.sum_all()?.backward()?, (composed * &probe)?.sum_all()?.backward()?);
            for (name, v) in [("z", &z), ("weight", &w), ("bias", &b)] {
                assert_eq!(bits(gf.get(v).unwrap()), bits(gc.get(v).unwrap()), "{act:?}: {name}'s gradient");
            }
        }
        let (z, w, b) = (input(&[70, 5], 1), input(&[3, 5], 2), input(&[3], 3));
        check_grad(&z, |z| activated_linear(z, Activation::Gelu, &w, &b, Products::Full).unwrap());
        check_grad(&w, |w| activated_linear(&z, Activation::Gelu, w, &b, Products::Full).unwrap());
        check_grad(&b, |b| activated_linear(&z, Activation::Gelu, &w, b, Products::Full).unwrap());
        Ok(())
    }
}
