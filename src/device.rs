//! Where a pipeline computes: its `device` and `dtype` settings resolved to a candle device, with
//! the GPU's identity for stage keys and run records.
//!
//! On the CPU, pipe's bits are the same on every machine (see `ops`). On a GPU they are the same
//! run after run on one GPU model, but cuBLAS picks its kernels by architecture and size, so
//! another model may round differently: a GPU stage's key names the GPU model and compute
//! capability (not its ordinal: `cuda:0` and `cuda:1` of one model share results).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How tensors are stored while computing: `f32`, or `bf16` mixed precision (bf16 matrix products
/// and activations, f32 master weights, optimizer moments, loss and reductions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The dtype activations and matrix products use.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Why a device setting cannot be honoured (bad input: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device `{0}`: this pipe was built without CUDA support; build it with \
         `cargo build --release --features cuda` (see scripts/cuda-env.sh) or set device = \"cpu\""
    )]
    NotBuilt(String),
    #[error("device `{device}`: no usable CUDA GPU: {why}")]
    NoGpu { device: String, why: String },
    #[error("dtype = \"bf16\" needs device = \"cuda\": pipe's CPU kernels are f32 (device `{0}`)")]
    Bf16OnCpu(String),
}

/// A resolved device: the candle device, and for a GPU its identity.
#[derive(Debug, Clone)]
pub struct Target {
    pub device: Device,
    /// `"<name> (sm_<major><minor>)"` for a GPU, `None` for the CPU.
    pub gpu: Option<String>,
}

/// The ordinal of `cuda` / `cuda:N`, `None` for `cpu` (the config validates the spelling).
fn cuda_ordinal(device: &str) -> Option<usize> {
    match device {
        "cuda" => Some(0),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    }
}

/// Opens `device` for computing in `precision`.
pub fn resolve(device: &str, precision: Precision) -> Result<Target, DeviceError> {
    let Some(ordinal) = cuda_ordinal(device) else {
        if precision == Precision::Bf16 {
            return Err(DeviceError::Bf16OnCpu(device.into()));
        }
        return Ok(Target { device: Device::Cpu, gpu: None });
    };
    open_cuda(device, ordinal)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(device: &str, _ordinal: usize) -> Result<Target, DeviceError> {
    Err(DeviceError::NotBuilt(device.into()))
}

#[cfg(feature = "cuda")]
fn open_cuda(device: &str, ordinal: usize) -> Result<Target, DeviceError> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let no_gpu = |why: String| DeviceError::NoGpu { device: device.into(), why };
    let count = CudaContext::device_count().map_err(|e| no_gpu(format!("the CUDA driver reports {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(no_gpu(format!("{count} GPU(s) visible, none with ordinal {ordinal}")));
    }
    let cuda = Device::new_cuda(ordinal).map_err(|e| no_gpu(e.to_string()))?;
    let Device::Cuda(dev) = &cuda else { unreachable!("new_cuda returns a CUDA device") };
    // SAFETY: pipe does everything on the device's one stream (candle's ops, cuBLAS, its own
    // kernels, copies and stream-ordered frees), so every use of a buffer is already ordered;
    // cudarc's cross-stream events would only add driver calls to every launch. Nothing has been
    // allocated on the device yet.
    unsafe { dev.disable_event_tracking() };
    let context = dev.cuda_stream().context().clone();
    let name = context.name().map_err(|e| no_gpu(e.to_string()))?;
    let (major, minor) = context.compute_capability().map_err(|e| no_gpu(e.to_string()))?;
    Ok(Target { device: cuda, gpu: Some(format!("{name} (sm_{major}{minor})")) })
}
