//! Activation functions (the feed-forward block's, the pooler's tanh) and gated units (SwiGLU,
//! GeGLU), with backward passes.

#[cfg(feature = "cuda")]
use super::cuda::{self, PushKernelArg as _};
use super::tape;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Real, slice, vectorized, with_real};

/// Elements per parallel work item (element-wise, so the split cannot change results).
const CHUNK: usize = 1 << 12;

/// The `hidden_act` values of Hugging Face BERT configs that pipe supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact form, `x * Phi(x)` with the error function.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `tanh` (BERT's pooler).
    Tanh,
    /// `silu` / `swish`: `x * sigmoid(x)` (the Llama family's gated feed-forward).
    Silu,
}

impl Activation {
    /// Parses a config's `hidden_act`.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "tanh" => Some(Self::Tanh),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// The activation's number in `kernels.cu`.
    #[cfg(feature = "cuda")]
    fn kernel_kind(self) -> i32 {
        match self {
            Self::Gelu => 0,
            Self::GeluTanh => 1,
            Self::Relu => 2,
            Self::Tanh => 3,
            Self::Silu => 4,
        }
    }

    /// The activation and its derivative at `x` (inlined, so a caller that uses one of the two
    /// computes only that one).
    #[inline(always)]
    fn value_and_slope<T: Real>(self, x: T) -> (T, T) {
        let half = T::from_f64(0.5);
        let one = T::one();
        match self {
            Self::Gelu => {
                let cdf = half * (one + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).portable_erf());
                let pdf = (-half * x * x).portable_exp() * T::from_f64(0.398_942_280_401_432_7);
                (x * cdf, cdf + x * pdf)
            }
            Self::GeluTanh => {
                let (c, a) = (T::from_f64((2.0 / std::f64::consts::PI).sqrt()), T::from_f64(0.044715));
                let inner = c * (x + a * x * x * x);
                let t = inner.portable_tanh();
                let d_inner = c * (one + T::from_f64(3.0) * a * x * x);
                (half * x * (one + t), half * (one + t) + half * x * (one - t * t) * d_inner)
            }
            Self::Tanh => {
                let t = x.portable_tanh();
                (t, one - t * t)
            }
            Self::Relu => {
                if x > T::zero() {
                    (x, one)
                } else {
                    (T::zero(), T::zero())
                }
            }
            Self::Silu => {
                // exp(-x) overflows to infinity for very negative x: sigmoid 0, value and slope 0.
                let sigmoid = (one + (-x).portable_exp()).recip();
                (x * sigmoid, sigmoid * (one + x * (one - sigmoid)))
            }
        }
    }
}

/// Runs `$body` with `$a` bound to the activation as a constant, so that each variant gets its own
/// branch-free loop (which the compiler vectorises) instead of a `match` per element.
macro_rules! each_variant {
    ($act:expr, $a:ident => $body:expr) => {
        match $act {
            Activation::Gelu => {
                const $a: Activation = Activation::Gelu;
                $body
            }
            Activation::GeluTanh => {
                const $a: Activation = Activation::GeluTanh;
                $body
            }
            Activation::Relu => {
                const $a: Activation = Activation::Relu;
                $body
            }
            Activation::Tanh => {
                const $a: Activation = Activation::Tanh;
                $body
            }
            Activation::Silu => {
                const $a: Activation = Activation::Silu;
                $body
            }
        }
    };
}

/// Applies `act` element-wise.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    tape::apply1(x, ActivationOp(act))
}

#[derive(Clone)]
struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        with_real!("activation", xs, T => {
            let x = slice::<T>("activation", xs, xl)?;
            Ok((T::to_cpu_storage_owned(self.0.apply(x)), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(xs);
        cuda::with_float!("activation", xs, T => {
            let x = cuda::input::<T>("activation", xs, xl)?;
            let n = x.len();
            let mut y = cuda::alloc::<T>(dev, n)?;
            let kernel = cuda::Kernel::typed::<T>(dev, "activation_fwd")?;
            let mut args = kernel.args();
            let kind = self.0.kernel_kind();
            args.arg(&kind).arg(&x).arg(&mut y).arg(&n);
            cuda::launch(args, cuda::elementwise(n))?;
            Ok((cuda::storage(dev, y), xl.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.backward(x, grad)?))
    }
}

impl Activation {
    /// The activation of every element of `x` (the CPU's forward), written once (no zero fill
    /// first: a pass over 25 MB per MiniLM layer at 4096 tokens).
    pub(super) fn apply<T: Real>(self, x: &[T]) -> Vec<T> {
        let mut out = Vec::<T>::with_capacity(x.len());
        out.spare_capacity_mut()[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(
            |(y, x)| {
                each_variant!(self, A => vectorized!({
                    for (y, &x) in y.iter_mut().zip(x) {
                        y.write(A.value_and_slope(x).0);
                    }
                }))
            },
        );
        // SAFETY: the loop above wrote all `x.len()` elements.
        unsafe { out.set_len(x.len()) };
        out
    }

    /// The gradient at `x` for the output's gradient `grad`, outside the graph.
    pub(super) fn backward(self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ActivationBackward(self))
    }

    /// The activation of `x` and [`Self::backward`] at once on the CPU, `(act(x), grad *
    /// act'(x))`: one pass that evaluates each element's activation and slope together (GELU's
    /// error function once, not once for each), with the same bits as the two. Outside the graph.
    pub(super) fn forward_and_backward(self, x: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let both = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ActivationBoth(self))?;
        Ok((both.get(0)?, both.get(1)?))
    }
}

/// The op behind [`Activation::forward_and_backward`]: `(2, ..x's shape)`, the values then the
/// gradient.
struct ActivationBoth(Activation);

impl CustomOp2 for ActivationBoth {
    fn name(&self) -> &'static str {
        "activation-forward-and-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("activation-forward-and-backward", xs, T => {
            let x = slice::<T>("activation-forward-and-backward", xs, xl)?;
            let g = slice::<T>("activation-forward-and-backward", gs, gl)?;
            if g.len() != x.len() {
                candle_core::bail!("activation-forward-and-backward: {} gradients for {} inputs", g.len(), x.len());
            }
            let n = x.len();
            let mut out = Vec::<T>::with_capacity(2 * n);
            let spare = &mut out.spare_capacity_mut()[..2 * n];
            let (values, grads) = spare.split_at_mut(n);
            let outputs = values.par_chunks_mut(CHUNK).zip(grads.par_chunks_mut(CHUNK));
            outputs.zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|((y, dx), (x, g))| {
                each_variant!(self.0, A => vectorized!({
                    for (((y, dx), &x), &g) in y.iter_mut().zip(dx.iter_mut()).zip(x).zip(g) {
                        let (value, slope) = A.value_and_slope(x);
                        y.write(value);
                        dx.write(g * slope);
                    }
                }))
            });
            // SAFETY: the loop above wrote all `2 * n` elements.
            unsafe { out.set_len(2 * n) };
            let mut dims = vec![2];
            dims.extend_from_slice(xl.dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}

struct ActivationBackward(Activation);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "activation-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_real!("activation-backward", xs, T => {
            let x = slice::<T>("activation-backward", xs, xl)?;
            let g = slice::<T>("activation-backward", gs, gl)?;
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(
                |(dx, (x, g))| {
                    each_variant!(self.0, A => vectorized!({
                        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                            *dx = g * A.value_and_slope(x).1;
                        }
                    }))
                },
            );
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = cuda::device(xs);
        cuda::with_float!("activation-backward", xs, T => {
            let x = cuda::input::<T>("activation-backward", xs, xl)?;
            let g = cuda::input::<T>("activation-backward", gs, gl)?;
            let n = x.len();
            if g.len() != n {
                candle_core::bail!("activation-backward: {} gradients for {n} inputs", g.len());
            }
            let mut dx = cuda::alloc::<T>(dev, n)?;
            let kernel = cuda::Kernel::typed::<T>(dev, "activation_bwd")?;
            let mut args = kernel.args();
            let kind = self.0.kernel_kind();
            args.arg(&kind).arg(&x).arg(&g).arg(&mut dx).arg(&n);
            cuda::launch(args, cuda::elementwise(n))?;
            Ok((cuda::storage(dev, dx), xl.shape().clone()))
        })
    }
}

/// A gated unit, `act(gate) * up` (SwiGLU with SiLU, the Llama family's; GeGLU with GELU,
/// ModernBERT's), for `gate_up` `(rows, 2 * inner)`: each row its gate's `inner` values, then its
/// up projection's (one product made both). Returns `(rows, inner)`.
///
/// On the CPU one op, forward and backward, whose gradient is `(rows, 2 * inner)` as the product
/// gave it; the bits are those of `activation(gate, act) * up` (each element's arithmetic in the
/// same order), without the halves' copies and the zero-padded gradients of `narrow`. On a GPU it
/// runs as those ops.
pub fn gated(gate_up: &Tensor, act: Activation) -> Result<Tensor> {
    let (_, width) = gate_up.dims2()?;
    if width == 0 || !width.is_multiple_of(2) {
        candle_core::bail!("gated unit: {width} columns do not split into gate and up halves");
    }
    let inner = width / 2;
    if !gate_up.device().is_cpu() {
        return activation(&gate_up.narrow(1, 0, inner)?, act)? * gate_up.narrow(1, inner, inner)?;
    }
    tape::apply1(gate_up, Gated(act))
}

#[derive(Clone)]
struct Gated(Activation);

impl CustomOp1 for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = xl.shape().dims2()?;
        let inner = width / 2;
        with_real!("gated", xs, T => {
            let x = slice::<T>("gated", xs, xl)?;
            let mut out = vec![T::zero(); rows * inner];
            out.par_chunks_mut(inner).zip(x.par_chunks(width)).for_each(|(y, x)| {
                let (gate, up) = x.split_at(inner);
                each_variant!(self.0, A => vectorized!({
                    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                        *y = A.value_and_slope(g).0 * u;
                    }
                }))
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((rows, inner))))
        })
    }

    fn bwd(&self, gate_up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gate_up.apply_op2_no_bwd(&grad.contiguous()?, &GatedBackward(self.0))?))
    }
}

struct GatedBackward(Activation);

impl CustomOp2 for GatedBackward {
    fn name(&self) -> &'static str {
        "gated-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = xl.shape().dims2()?;
        let inner = width / 2;
        with_real!("gated-backward", xs, T => {
            let x = slice::<T>("gated-backward", xs, xl)?;
            let g = slice::<T>("gated-backward", gs, gl)?;
            if g.len() != rows * inner {
                candle_core::bail!("gated-backward: {} gradients for {rows} x {inner} outputs", g.len());
            }
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(width).zip(x.par_chunks(width).zip(g.par_chunks(inner))).for_each(
                |(dx, (x, g))| {
                    let (gate, up) = x.split_at(inner);
                    let (d_gate, d_up) = dx.split_at_mut(inner);
                    each_variant!(self.0, A => vectorized!({
                        for ((((dg, du), &gt), &u), &g) in
                            d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(g)
                        {
                            // As the composed ops: the product's gradients, then the activation's.
                            let (value, slope) = A.value_and_slope(gt);
                            *dg = (g * u) * slope;
                            *du = g * value;
                        }
                    }))
                },
            );
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, input};

    #[test]
    fn exact_gelu_matches_known_values() -> Result<()> {
        let x = Tensor::new(&[-1.0f64, 0.0, 1.0, 2.0], &candle_core::Device::Cpu)?;
        let y = activation(&x, Activation::Gelu)?.to_vec1::<f64>()?;
        // torch.nn.functional.gelu(torch.tensor([-1., 0., 1., 2.], dtype=torch.float64))
        let want = [-0.15865525393145707, 0.0, 0.8413447460685429, 1.9544997361036416];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{y:?}");
        }
        Ok(())
    }

    #[test]
    fn silu_matches_known_values() -> Result<()> {
        let x = Tensor::new(&[-1.0f64, 0.0, 1.0, 2.0, -800.0], &candle_core::Device::Cpu)?;
        let y = activation(&x, Activation::Silu)?.to_vec1::<f64>()?;
        // torch.nn.functional.silu(torch.tensor([-1., 0., 1., 2., -800.], dtype=torch.float64))
        let want = [-0.2689414213699951, 0.0, 0.7310585786300049, 1.7615941559557646, -0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{y:?}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Tanh, Activation::Silu] {
            check_grad(&input(&[5, 7], 3), |x| activation(x, act).unwrap());
        }
    }

    #[test]
    fn gated_unit_gradients_match_finite_differences() {
        for act in [Activation::Silu, Activation::Gelu] {
            check_grad(&input(&[5, 8], 3), |x| gated(x, act).unwrap());
        }
    }

    /// The fused unit gives the bits of the composed ops, forward and backward, in f32.
    #[test]
    fn gated_unit_equals_the_composed_ops_bit_for_bit() -> Result<()> {
        let x = candle_core::Var::from_tensor(&input(&[37, 2 * 300], 5).to_dtype(candle_core::DType::F32)?)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        let w = input(&[37, 300], 6).to_dtype(candle_core::DType::F32)?;
        for act in [Activation::Silu, Activation::Gelu] {
            let fused = gated(&x, act)?;
            let composed = (activation(&x.narrow(1, 0, 300)?, act)? * x.narrow(1, 300, 300)?)?;
            assert_eq!(bits(&fused)?, bits(&composed)?, "{act:?}");
            let (gf, gc) = ((fused * &w)?.sum_all()?.backward()?, (composed * &w)?.sum_all()?.backward()?);
            assert_eq!(bits(gf.get(&x).unwrap())?, bits(gc.get(&x).unwrap())?, "{act:?}");
        }
        Ok(())
    }
}
