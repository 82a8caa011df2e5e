//! The CUDA side of the ops: kernel loading and launching, typed access to candle's CUDA storage,
//! and matrix products through cuBLAS.
//!
//! Each op keeps its CPU and CUDA implementations side by side in its own file (`cpu_fwd` and
//! `cuda_fwd` of one candle `CustomOp`), so the shapes and strides are checked once; this module
//! holds what the CUDA halves share. The kernels themselves are in `kernels.cu`, compiled to PTX
//! by `build.rs` and loaded once per device.
//!
//! Bits: run after run, results are a function of the inputs alone (no atomics, fixed reduction
//! shapes, see `kernels.cu`; cuBLAS is deterministic on one stream). They are not the CPU's bits
//! (cuBLAS sums in its own order, `expf`/`erff` are CUDA's), and they depend on the GPU, cuBLAS,
//! the driver that compiles the PTX, and the PTX itself: a GPU stage's key names all of them
//! (see [`crate::device`] and [`kernels_digest`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{Gemm as _, GemmConfig, StridedBatchedConfig, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DeviceRepr, LaunchArgs, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};

pub(crate) use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::{Layout, Result, bail};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pipe_kernels.ptx"));
const MODULE: &str = "pipe_kernels";

/// The first 12 hex digits of the SHA-256 of pipe's PTX: part of a GPU stage's key, so that any
/// change to `kernels.cu` (even one that only moves where the driver fuses a multiply and an
/// add) gives new keys rather than other bits under an old one.
pub(crate) fn kernels_digest() -> String {
    crate::digest::bytes(PTX.as_bytes())[..12].to_string()
}

/// Threads per block for element-wise kernels and warp-per-row kernels (8 rows per block).
const BLOCK: u32 = 256;

/// A float type the kernels are instantiated for: its kernels' name suffix.
pub(crate) trait Float: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// Runs `$body` with `$t` bound to the storage's float type (f32 or bf16).
macro_rules! with_float {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {{
        match candle_core::backend::BackendStorage::dtype($storage) {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: {other:?} is not supported on CUDA (f32, bf16)", $op),
        }
    }};
}
pub(crate) use with_float;

/// A kernel of `kernels.cu` by name, ready for its arguments.
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

thread_local! {
    /// Loaded kernels by device, name and type suffix: a launch then costs no lock, no string
    /// and no driver lookup (a training step launches about a thousand kernels).
    static FUNCTIONS: RefCell<HashMap<(DeviceId, &'static str, &'static str), CudaFunction>> =
        RefCell::new(HashMap::new());
}

impl Kernel {
    /// The kernel `name` (without a type suffix).
    pub fn plain(dev: &CudaDevice, name: &'static str) -> Result<Self> {
        Self::load(dev, name, "")
    }

    /// The instantiation of kernel `name` for `T`.
    pub fn typed<T: Float>(dev: &CudaDevice, name: &'static str) -> Result<Self> {
        Self::load(dev, name, T::SUFFIX)
    }

    fn load(dev: &CudaDevice, name: &'static str, suffix: &'static str) -> Result<Self> {
        let key = (dev.id(), name, suffix);
        let func = match FUNCTIONS.with_borrow(|f| f.get(&key).cloned()) {
            Some(func) => func,
            None => {
                let full = if suffix.is_empty() { name.to_string() } else { format!("{name}_{suffix}") };
                let func = dev.get_or_load_custom_func(&full, MODULE, PTX)?.into_cuda_function();
                FUNCTIONS.with_borrow_mut(|f| f.insert(key, func.clone()));
                func
            }
        };
        Ok(Self { func, stream: dev.cuda_stream() })
    }

    pub fn args(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Launches with `config`, mapping the driver's error.
pub(crate) fn launch(mut args: LaunchArgs<'_>, config: LaunchConfig) -> Result<()> {
    // SAFETY: every kernel of kernels.cu bounds its indices by the sizes it is given, and callers
    // pass buffers of at least those sizes (each call site says which).
    unsafe { args.launch(config) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    Ok(())
}

/// Element-wise grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row over `rows` rows.
pub(crate) fn warp_rows(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil((BLOCK / 32) as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Blocks of `ROW_BLOCK` rows by tiles of `BLOCK` columns (column reductions).
pub(crate) fn row_blocks(rows: usize, cols: usize) -> (LaunchConfig, usize) {
    let blocks = rows.div_ceil(super::ROW_BLOCK).max(1);
    let config = LaunchConfig {
        grid_dim: (blocks as u32, cols.div_ceil(BLOCK as usize) as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    (config, blocks)
}

/// The contiguous elements behind an input's layout.
pub(crate) fn input<'a, T: Float>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: input must be contiguous") };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// A new uninitialised device buffer (every element is written before it is read).
pub(crate) fn alloc<T: Float>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: callers write every element before anything reads it.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// Copies host values to a new device buffer.
pub(crate) fn upload<T: DeviceRepr + Copy + 'static>(dev: &CudaDevice, values: &[T]) -> Result<CudaSlice<T>> {
    dev.clone_htod(values)
}

/// Wraps a buffer as candle storage.
pub(crate) fn storage<T: Float>(dev: &CudaDevice, slice: CudaSlice<T>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// The device of a storage.
pub(crate) fn device(storage: &CudaStorage) -> &CudaDevice {
    storage.device()
}

/// The device address of a contiguous f32 tensor's first element, for kernels that take many
/// tensors at once through an array of addresses. The caller keeps the tensor alive until the
/// launch is queued (frees are stream-ordered, so the kernel still sees the buffer).
pub(crate) fn address(t: &candle_core::Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else { bail!("expected a tensor on the GPU") };
    if !layout.is_contiguous() {
        bail!("expected a contiguous tensor");
    }
    let stream = cs.device.cuda_stream();
    Ok(slice_address(cs.as_cuda_slice::<f32>()?, &stream) + (layout.start_offset() * 4) as u64)
}

/// The device address of a buffer.
pub(crate) fn slice_address<T>(slice: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
    slice.device_ptr(stream).0
}

/// A row-major matrix product `c (m x n) = op(a) op(b)` (`+= ` when `accumulate`), repeated over
/// `batch` matrices stored one after another. `op(a)` is `a` stored `(m, k)`, or stored `(k, m)`
/// and transposed when `ta`; `op(b)` likewise `(k, n)` or `(n, k)` with `tb`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub batch: usize,
    pub accumulate: bool,
}

impl Product {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, ta: false, tb: false, batch: 1, accumulate: false }
    }

    /// The product into a new buffer of `batch * m * n` elements.
    pub fn output<T: Float>(
        self,
        dev: &CudaDevice,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
    ) -> Result<CudaSlice<T>>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let mut c = alloc::<T>(dev, self.batch * self.m * self.n)?;
        Product { accumulate: false, ..self }.run(dev, a, b, &mut c.as_view_mut())?;
        Ok(c)
    }

    /// Runs the product on cuBLAS (f32 in f32; bf16 in bf16 with f32 accumulation).
    pub fn run<T: Float>(
        self,
        dev: &CudaDevice,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut CudaViewMut<'_, T>,
    ) -> Result<()>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas:
            candle_core::cuda_backend::cudarc::cublas::Gemm<T>,
    {
        let Self { m, n, k, ta, tb, batch, accumulate } = self;
        if a.len() < batch * m * k || b.len() < batch * k * n || c.len() < batch * m * n {
            bail!("matrix product ({m}x{k})({k}x{n}) x {batch}: buffers too small");
        }
        let op = |t: bool| {
            if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N }
        };
        // cuBLAS is column-major: a row-major (r x c) matrix is a column-major (c x r) one, so
        // c^T = op(b)^T op(a)^T is the column-major product of b and a, in that order.
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds cuBLAS's range")))
        };
        let gemm = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: T::from_f32(1.0),
            lda: int(if tb { k } else { n })?,
            ldb: int(if ta { m } else { k })?,
            beta: T::from_f32(if accumulate { 1.0 } else { 0.0 }),
            ldc: int(n)?,
        };
        let config = StridedBatchedConfig {
            gemm,
            batch_size: int(batch)?,
            stride_a: (k * n) as i64,
            stride_b: (m * k) as i64,
            stride_c: (m * n) as i64,
        };
        let blas = dev.cublas_handle();
        // SAFETY: the buffers hold `batch` matrices of the stated sizes (checked above).
        let done = unsafe {
            if batch == 1 {
                // A single product through the plain call, as frameworks make it, so that cuBLAS
                // chooses among all its kernels for the shape (the choice is fixed by the shape,
                // so still deterministic).
                blas.gemm(gemm, b, a, c)
            } else {
                blas.gemm_strided_batched(config, b, a, c)
            }
        };
        done.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(())
    }
}

/// Column sums of a row-major `(rows, cols)` matrix into `out`, in fixed row blocks (`kernels.cu`).
pub(crate) fn column_sums<T: Float>(
    dev: &CudaDevice,
    g: &CudaView<'_, T>,
    rows: usize,
    cols: usize,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let (config, blocks) = row_blocks(rows, cols);
    let mut partials = alloc::<f32>(dev, blocks * cols)?;
    let kernel = Kernel::typed::<T>(dev, "col_sum_partials")?;
    let mut args = kernel.args();
    let (r, c) = (rows as i32, cols as i32);
    args.arg(g).arg(&mut partials).arg(&r).arg(&c);
    launch(args, config)?;
    finish_column_sums(dev, &partials, blocks, cols, out)
}

/// Sums `blocks` rows of partial column sums, in order, into `out`.
pub(crate) fn finish_column_sums<T: Float>(
    dev: &CudaDevice,
    partials: &CudaSlice<f32>,
    blocks: usize,
    cols: usize,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let kernel = Kernel::typed::<T>(dev, "col_sum_finish")?;
    let mut args = kernel.args();
    let (b, c) = (blocks as i32, cols as i32);
    args.arg(partials).arg(out).arg(&b).arg(&c);
    launch(args, elementwise(cols))
}
