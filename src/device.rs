//! Where a pipeline computes: its `device` and `dtype` settings resolved to a candle device, with
//! the GPU's identity for stage keys and run records.
//!
//! On the CPU, pipe's bits are the same on every machine (see `ops`). On a GPU they are the same
//! run after run, but they also depend on the GPU model and its multiprocessor count (cuBLAS picks
//! kernels by both), on cuBLAS's version, and on the driver, which compiles pipe's kernels from
//! PTX: a GPU stage's key names all of these and the digest of the kernels (not the GPU's
//! ordinal: `cuda:0` and `cuda:1` of one model share results).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How to compute: `f32`, or `bf16` mixed precision: f32 master weights, optimizer moments, loss
/// and reductions, with bf16 matrix products (on a GPU also bf16 activations; on the CPU, bf16
/// operands accumulated in f32 under one contract on every CPU, see `ops::gemm`).
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
}

/// A resolved device: the candle device, and for a GPU its identity.
#[derive(Debug, Clone)]
pub struct Target {
    pub device: Device,
    /// For a GPU, what its bits depend on (see [`identity`]); `None` for the CPU.
    pub gpu: Option<String>,
}

/// The ordinal of `cuda` / `cuda:N`, `None` for `cpu` (the config validates the spelling).
fn cuda_ordinal(device: &str) -> Option<usize> {
    match device {
        "cuda" => Some(0),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    }
}

/// Opens `device` (both precisions run on every device).
pub fn resolve(device: &str) -> Result<Target, DeviceError> {
    let Some(ordinal) = cuda_ordinal(device) else {
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
    let gpu = identity(dev).map_err(no_gpu)?;
    Ok(Target { device: cuda, gpu: Some(gpu) })
}

/// Everything a GPU run's bits depend on besides its inputs: the GPU model, its compute
/// capability and multiprocessor count (cuBLAS picks kernels by both), the driver (it compiles
/// pipe's PTX, and may fuse a multiply and an add differently from one version to the next),
/// cuBLAS's version, and the digest of pipe's own kernels.
#[cfg(feature = "cuda")]
fn identity(dev: &candle_core::cuda_backend::CudaDevice) -> Result<String, String> {
    use candle_core::cuda_backend::cudarc::{cublas, driver};
    let context = dev.cuda_stream().context().clone();
    let name = context.name().map_err(|e| e.to_string())?;
    let (major, minor) = context.compute_capability().map_err(|e| e.to_string())?;
    let sms = context
        .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| e.to_string())?;
    let mut version = 0;
    // SAFETY: the driver writes one int.
    unsafe { driver::sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| e.to_string())?;
    let driver = format!("{}.{}", version / 1000, version % 1000 / 10);
    let mut version = 0;
    // SAFETY: a live handle of this device; cuBLAS writes one int.
    let status = unsafe { cublas::sys::cublasGetVersion_v2(*dev.cublas_handle().handle(), &mut version) };
    if status != cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(format!("cuBLAS does not answer: {status:?}"));
    }
    let kernels = crate::ops::cuda::kernels_digest();
    Ok(format!("{name} (sm_{major}{minor}, {sms} SMs), driver {driver}, cuBLAS {version}, kernels {kernels}"))
}
