//! AdamW fused over the raw parameter buffers, numerically `torch.optim.AdamW`.
//!
//! `candle_nn::AdamW` builds about ten tensor ops per parameter per step, each allocating a new
//! buffer; on MiniLM's 22.7M parameters that costs about a second, more than forward and backward
//! together. Here each parameter is updated by one in-place kernel that reads the gradient once and
//! writes the weight and both moments once, in parallel over fixed-size chunks (element-wise, so the
//! result does not depend on the thread count). Gradient clipping is folded into the same pass as a
//! scale on the gradient.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use schemars::JsonSchema;

use crate::ops::math::powi;
use serde::{Deserialize, Serialize};

/// Elements per parallel work item; fixed so that work splitting never depends on the thread count.
const CHUNK: usize = 1 << 14;

/// The optimizer algorithm. Only AdamW for now; the enum keeps the pipeline file explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    /// Adam with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`.
    Adamw,
}

/// `[optimizer]`: AdamW's hyper-parameters. Defaults are `torch.optim.AdamW`'s, with the
/// fine-tuning learning rate 5e-5 of the reference recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Algorithm name.
    pub name: OptimizerName,
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// Decoupled weight decay coefficient.
    pub weight_decay: f64,
    /// Exponential decay rates of the first and second moment estimates.
    pub betas: [f64; 2],
    /// Term added to the denominator for numerical stability.
    pub eps: f64,
    /// Apply weight decay to biases and LayerNorm weights too (torch's default, and the reference
    /// recipe's). `false` excludes them, as Hugging Face's Trainer does.
    pub decay_bias_and_norm: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            name: OptimizerName::Adamw,
            lr: 5e-5,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            decay_bias_and_norm: true,
        }
    }
}

/// The optimizer's resumable state: step count and both moments per parameter, in parameter order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdamWState {
    /// Optimizer steps taken so far.
    pub step: u64,
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
}

/// AdamW over a fixed, ordered list of named f32 parameters.
pub struct AdamW {
    config: OptimizerConfig,
    params: Vec<(String, Var)>,
    decays: Vec<bool>,
    step: u64,
    /// Each parameter's moments, on the parameter's device.
    moments: Vec<Moments>,
}

/// One parameter's first and second moments, kept where the parameter lives so that an update
/// never crosses the bus.
enum Moments {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        m: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        v: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        device: candle_core::cuda_backend::CudaDevice,
    },
}

impl Moments {
    fn new(m: Vec<f32>, v: Vec<f32>, device: &candle_core::Device) -> candle_core::Result<Self> {
        match device {
            candle_core::Device::Cpu => Ok(Self::Host { m, v }),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(device) => Ok(Self::Cuda {
                m: device.clone_htod(&m)?,
                v: device.clone_htod(&v)?,
                device: device.clone(),
            }),
            #[allow(unreachable_patterns)]
            other => candle_core::bail!("adamw: no optimizer for device {other:?}"),
        }
    }

    fn to_host(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Self::Host { m, v } => Ok((m.clone(), v.clone())),
            #[cfg(feature = "cuda")]
            Self::Cuda { m, v, device } => Ok((device.clone_dtoh(m)?, device.clone_dtoh(v)?)),
        }
    }
}

impl AdamW {
    /// An optimizer for `params` (name, variable), in the order given; state starts at zero.
    pub fn new(config: OptimizerConfig, params: Vec<(String, Var)>) -> candle_core::Result<Self> {
        let mut moments = Vec::with_capacity(params.len());
        for (name, var) in &params {
            if var.dtype() != DType::F32 {
                candle_core::bail!("AdamW keeps f32 master weights; {name} is {:?}", var.dtype());
            }
            let zeros = vec![0f32; var.elem_count()];
            moments.push(Moments::new(zeros.clone(), zeros, var.device())?);
        }
        let decays =
            params.iter().map(|(name, _)| config.decay_bias_and_norm || !is_bias_or_norm(name)).collect();
        Ok(Self { config, params, decays, step: 0, moments })
    }

    /// The optimizer's hyper-parameters.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Current state, for checkpoints.
    pub fn state(&self) -> candle_core::Result<AdamWState> {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for moments in &self.moments {
            let (mi, vi) = moments.to_host()?;
            m.push(mi);
            v.push(vi);
        }
        Ok(AdamWState { step: self.step, m, v })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Restores a state saved from an optimizer over the same parameters.
    pub fn set_state(&mut self, state: AdamWState) -> candle_core::Result<()> {
        let fits = |moments: &[Vec<f32>]| {
            moments.len() == self.params.len()
                && moments.iter().zip(&self.params).all(|(m, (_, p))| m.len() == p.elem_count())
        };
        if !fits(&state.m) || !fits(&state.v) {
            candle_core::bail!("optimizer state does not match the model's parameters");
        }
        let mut moments = Vec::with_capacity(self.params.len());
        for ((m, v), (_, var)) in state.m.into_iter().zip(state.v).zip(&self.params) {
            moments.push(Moments::new(m, v, var.device())?);
        }
        self.moments = moments;
        self.step = state.step;
        Ok(())
    }

    /// One update with learning rate `lr`, the gradients (one per parameter, in order) scaled by
    /// `grad_scale` (the clipping coefficient, or 1). A parameter without a gradient is treated as
    /// having a zero gradient, as torch does for a parameter whose `.grad` was zeroed.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> candle_core::Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!("adamw: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let t = self.step;
        let [b1, b2] = self.config.betas;
        #[cfg(feature = "cuda")]
        if matches!(self.moments.first(), Some(Moments::Cuda { .. })) {
            return self.step_cuda(grads, lr, grad_scale);
        }
        for (i, (_, var)) in self.params.iter().enumerate() {
            let kernel = AdamWKernel {
                lr: lr as f32,
                weight_decay: if self.decays[i] { self.config.weight_decay as f32 } else { 0.0 },
                beta1: b1 as f32,
                beta2: b2 as f32,
                eps: self.config.eps as f32,
                step_size: (lr / (1.0 - powi(b1, t))) as f32,
                bias_correction2_sqrt: (1.0 - powi(b2, t)).sqrt() as f32,
                grad_scale: grad_scale as f32,
                moments: RefCell::new(&mut self.moments[i]),
            };
            let grad = match &grads[i] {
                Some(g) => g.contiguous()?,
                None => var.zeros_like()?,
            };
            var.as_tensor().inplace_op2(&grad, &kernel)?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl AdamW {
    /// The update of every parameter in one launch (`adamw_multi` in `ops/cuda/kernels.cu`, the
    /// CPU's arithmetic): a step's hundred parameters cost one kernel, not a hundred.
    fn step_cuda(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> candle_core::Result<()> {
        use crate::ops::cuda::{self, PushKernelArg as _};
        let Some(Moments::Cuda { device, .. }) = self.moments.first() else {
            candle_core::bail!("adamw: the moments are not on the GPU");
        };
        let device = device.clone();
        let stream = device.cuda_stream();
        let t = self.step;
        let [b1, b2] = self.config.betas;
        // The gradients (kept alive until the launch is queued; frees are stream-ordered) and
        // every buffer's address.
        let mut kept = Vec::with_capacity(grads.len());
        let (mut params, mut grad_ptrs, mut ms, mut vs, mut sizes, mut decays) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (_, var)) in self.params.iter().enumerate() {
            let grad = match &grads[i] {
                Some(g) => g.contiguous()?,
                None => var.zeros_like()?,
            };
            let Moments::Cuda { m, v, .. } = &self.moments[i] else {
                candle_core::bail!("adamw: parameters are on different devices");
            };
            params.push(cuda::address(var.as_tensor())?);
            grad_ptrs.push(cuda::address(&grad)?);
            ms.push(cuda::slice_address(m, &stream));
            vs.push(cuda::slice_address(v, &stream));
            sizes.push(var.elem_count() as u64);
            let weight_decay = if self.decays[i] { self.config.weight_decay as f32 } else { 0.0 };
            decays.push(1.0 - lr as f32 * weight_decay);
            kept.push(grad);
        }
        let upload = |v: &[u64]| cuda::upload(&device, v);
        let (params, grad_ptrs, ms, vs, sizes) =
            (upload(&params)?, upload(&grad_ptrs)?, upload(&ms)?, upload(&vs)?, upload(&sizes)?);
        let decays = cuda::upload(&device, &decays)?;
        let kernel = cuda::Kernel::plain(&device, "adamw_multi")?;
        let mut args = kernel.args();
        // As the CPU's kernel: the bias corrections in f64 from the f64 betas, then f32.
        let step_size = (lr / (1.0 - powi(b1, t))) as f32;
        let bc2_sqrt = (1.0 - powi(b2, t)).sqrt() as f32;
        let (b1, b2, eps, grad_scale) = (b1 as f32, b2 as f32, self.config.eps as f32, grad_scale as f32);
        args.arg(&params).arg(&grad_ptrs).arg(&ms).arg(&vs).arg(&sizes).arg(&decays);
        args.arg(&b1).arg(&b2).arg(&eps).arg(&step_size).arg(&bc2_sqrt).arg(&grad_scale);
        let config = cuda::LaunchConfig {
            grid_dim: (256, self.params.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        cuda::launch(args, config)?;
        drop(kept);
        Ok(())
    }
}

/// The global L2 norm of `grads`, computed in f64 over fixed chunks in a fixed order so that it
/// is bit-identical whatever the thread count. Missing gradients count as zero.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    if grads.iter().flatten().next().is_some_and(|g| g.device().is_cuda()) {
        return global_grad_norm_cuda(grads);
    }
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("global_grad_norm: gradients must all be on one device");
        };
        let values = crate::ops::slice::<f32>("global_grad_norm", cpu, layout)?;
        let partials: Vec<f64> = values
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        total += partials.iter().sum::<f64>();
    }
    Ok(total.sqrt())
}

/// The same sums on the GPU: one launch over every gradient's chunks (each chunk reduced by a
/// fixed tree), one read-back of the partials, added up as the CPU does (chunk by chunk within a
/// gradient, then gradient by gradient).
#[cfg(feature = "cuda")]
fn global_grad_norm_cuda(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    use crate::ops::cuda::{self, PushKernelArg as _};
    let kept: Vec<Tensor> =
        grads.iter().flatten().map(|g| g.contiguous()).collect::<candle_core::Result<_>>()?;
    let candle_core::Device::Cuda(device) = kept[0].device().clone() else {
        unreachable!("checked by the caller")
    };
    let (mut addresses, mut sizes, mut tensors, mut starts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, g) in kept.iter().enumerate() {
        addresses.push(cuda::address(g)?);
        sizes.push(g.elem_count() as u64);
        for start in (0..g.elem_count()).step_by(CHUNK) {
            tensors.push(i as u32);
            starts.push(start as u64);
        }
    }
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let mut partials = device.alloc_zeros::<f64>(tensors.len())?;
    let sizes_host = sizes;
    let (addresses, sizes) = (cuda::upload(&device, &addresses)?, cuda::upload(&device, &sizes_host)?);
    let (block_tensors, block_starts) = (cuda::upload(&device, &tensors)?, cuda::upload(&device, &starts)?);
    let kernel = cuda::Kernel::plain(&device, "sum_squares_partials")?;
    let mut args = kernel.args();
    let chunk = CHUNK;
    args.arg(&addresses).arg(&sizes).arg(&block_tensors).arg(&block_starts).arg(&chunk).arg(&mut partials);
    let config = cuda::LaunchConfig {
        grid_dim: (tensors.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    cuda::launch(args, config)?;
    let partials = device.clone_dtoh(&partials)?;
    drop(kept);
    let mut total = 0f64;
    for i in 0..sizes_host.len() {
        let first = tensors.partition_point(|&t| (t as usize) < i);
        let last = tensors.partition_point(|&t| (t as usize) <= i);
        total += partials[first..last].iter().sum::<f64>();
    }
    Ok(total.sqrt())
}

/// Biases and LayerNorm weights, which Hugging Face's Trainer exempts from weight decay.
fn is_bias_or_norm(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm")
}

/// The per-parameter update, applied in place to the weight with the gradient as source.
struct AdamWKernel<'a> {
    lr: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    grad_scale: f32,
    moments: RefCell<&'a mut Moments>,
}

impl InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, src) else {
            candle_core::bail!("adamw: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameters and gradients must be contiguous");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut moments = self.moments.borrow_mut();
        let (m, v) = match &mut **moments {
            Moments::Host { m, v } => (m, v),
            #[cfg(feature = "cuda")]
            Moments::Cuda { .. } => candle_core::bail!("adamw: the moments are not on the CPU"),
        };
        let decay = 1.0 - self.lr * self.weight_decay;
        let (b1, b2, eps, grad_scale) = (self.beta1, self.beta2, self.eps, self.grad_scale);
        let (step_size, bc2_sqrt) = (self.step_size, self.bias_correction2_sqrt);
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let g = g[i] * grad_scale;
                    // torch: param.mul_(1 - lr * wd); exp_avg.lerp_(grad, 1 - beta1);
                    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                    m[i] += (g - m[i]) * (1.0 - b1);
                    v[i] = v[i] * b2 + (1.0 - b2) * g * g;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] = p[i] * decay - step_size * m[i] / denom;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bias_and_norm_names_are_recognised() {
        assert!(is_bias_or_norm("bert.encoder.layer.0.output.dense.bias"));
        assert!(is_bias_or_norm("bert.embeddings.LayerNorm.weight"));
        assert!(!is_bias_or_norm("bert.encoder.layer.0.output.dense.weight"));
    }

    #[test]
    fn one_step_matches_the_closed_form() -> candle_core::Result<()> {
        // After one step from zero moments, m/(sqrt(v)) = sign(g): p1 = p0(1 - lr wd) - lr g/(|g| + eps').
        let var = Var::from_slice(&[1.0f32, -2.0, 0.5], 3, &Device::Cpu)?;
        let mut opt = AdamW::new(OptimizerConfig::default(), vec![("w".into(), var.clone())])?;
        let loss = (var.as_tensor() * Tensor::new(&[0.3f32, -0.1, 2.0], &Device::Cpu)?)?.sum_all()?;
        let grads = loss.backward()?;
        opt.step(&[grads.get(var.as_tensor()).cloned()], 1e-2, 1.0)?;
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want: Vec<f32> = [(1.0f32, 0.3f32), (-2.0, -0.1), (0.5, 2.0)]
            .iter()
            .map(|&(p, g)| p * (1.0 - 1e-2 * 0.01) - 1e-2 * g.signum())
            .collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}
