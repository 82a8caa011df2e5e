//! Differentiable kernels for the training path: embeddings, linear layers, attention, layer norm,
//! activations, dropout, rotary position embeddings and the loss, each on the CPU and (with the `cuda` feature) on NVIDIA GPUs.
//!
//! candle 0.11's fast `layer_norm` and `softmax_last_dim` are built without a backward pass, so a
//! model that uses them trains only the layers after its last LayerNorm, silently. Every op here is
//! a candle `CustomOp` with a forward *and* a backward; its `cpu_fwd` is written for f32 and f64
//! (f64 for the finite difference tests), its `cuda_fwd` for f32 and bf16 (see `cuda`).
//!
//! On the CPU, results are a function of the inputs alone, never of the machine or the thread
//! count: kernels run rows in parallel with rayon, and any reduction across rows sums fixed blocks
//! in a fixed order; matrix products go through pipe's own [`gemm`], which sums each element in
//! one fixed order on every CPU and kernel path ([`cpu`] picks or forces the path); exponentials,
//! logarithms and tanh come from [`math`], never from the system's C library. On a GPU they are
//! the same run after run, for a key that names the GPU (see `crate::device`).

mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;
mod embedding;
mod gelu;
pub mod gemm;
mod layer_norm;
mod linear;
mod lm_loss;
mod loss;
pub mod math;
mod rope;
pub mod tape;

pub use attention::{AttentionShape, attention, first_token_attention};
pub use dropout::dropout;
pub use embedding::embedding;
pub use gelu::{Activation, activation, gated};
pub use gemm::Products;
pub use layer_norm::{layer_norm, residual_layer_norm, rms_norm};
pub use linear::{activated_linear, linear};
pub use lm_loss::lm_cross_entropy;
pub use loss::{IGNORE, cross_entropy};
pub use rope::{rope, rotary_tables};

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};

/// Rows per block in cross-row reductions (e.g. LayerNorm's weight gradient). Fixed, never derived
/// from the thread count, so the summation order is the same on every machine.
pub(crate) const ROW_BLOCK: usize = 32;

/// The float types the kernels are written for, with transcendentals that give the same bits on
/// every machine ([`math`]).
pub(crate) trait Real:
    num_traits::Float
    + WithDType
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::MulAssign
    + 'static
{
    fn portable_exp(self) -> Self;
    fn portable_ln(self) -> Self;
    fn portable_tanh(self) -> Self;
    fn portable_erf(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn portable_exp(self) -> Self {
        math::exp(self)
    }
    #[inline(always)]
    fn portable_ln(self) -> Self {
        math::ln(self)
    }
    #[inline(always)]
    fn portable_tanh(self) -> Self {
        math::tanh(self)
    }
    #[inline(always)]
    fn portable_erf(self) -> Self {
        math::erf(self)
    }
}

impl Real for f64 {
    fn portable_exp(self) -> Self {
        libm::exp(self)
    }
    fn portable_ln(self) -> Self {
        libm::log(self)
    }
    fn portable_tanh(self) -> Self {
        libm::tanh(self)
    }
    fn portable_erf(self) -> Self {
        libm::erf(self)
    }
}

/// Runs `$body` (a block), compiled for the widest vector instructions the kernel path allows
/// (AVX-512 or AVX2), else as plain code: for element-wise loops, which the compiler then
/// vectorises. The bits do not change, only the speed: additions, multiplications and divisions
/// round the same in any vector width, and Rust never fuses them into FMA. (Reductions stay
/// sequential: the compiler does not reorder float sums.) A macro, so that the body is always
/// inlined into the function compiled with those features: a closure called from it is not
/// (LLVM declines to inline large bodies, which then run as scalar code for the baseline CPU).
macro_rules! vectorized {
    ($body:block) => {
        $crate::ops::with_vector_features(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use vectorized;

/// See [`vectorized!`]: calls `body` from a function compiled with the kernel path's features.
#[inline(always)]
pub(crate) fn with_vector_features<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        let path = cpu::kernel_path();
        if path >= cpu::KernelPath::Avx512 {
            // SAFETY: the kernel path is AVX-512 only on CPUs with these features.
            return unsafe { avx512(body) };
        }
        if path >= cpu::KernelPath::Avx2 {
            // SAFETY: the kernel path is only AVX2 or wider on CPUs with AVX2 and FMA.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// The contiguous slice behind a storage and layout, or an error naming the op.
pub(crate) fn slice<'a, T: WithDType>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: input must be contiguous") };
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}

/// Runs `$body` with `$t` bound to the storage's float type (f32 or f64).
macro_rules! with_real {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {{
        #[allow(unused_imports)]
        use {
            candle_core::WithDType as _,
            num_traits::{Float as _, One as _, Zero as _},
        };
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $op),
        }
    }};
}
pub(crate) use with_real;

#[cfg(test)]
pub(crate) mod testing {
    //! Central finite differences for the ops' backward passes.
    use candle_core::{Device, Tensor};

    /// A deterministic pseudo-random f64 tensor in [-2, 2).
    pub fn input(shape: &[usize], salt: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ salt;
        let data: Vec<f64> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Checks d(sum(f(x) * w))/dx from backprop against central differences, for a fixed random w.
    pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
        let var = candle_core::Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor());
        let w = input(y.dims(), 7);
        let loss = |t: &Tensor| (f(t) * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let at = |v: Vec<f64>| Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            let numeric = (loss(&at(plus)) - loss(&at(minus))) / (2.0 * h);
            let err = (numeric - analytic[i]).abs() / numeric.abs().max(1.0);
            assert!(err < 1e-7, "element {i}: numeric {numeric} vs analytic {}", analytic[i]);
        }
    }
}
