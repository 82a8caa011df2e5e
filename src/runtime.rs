//! Process-wide settings for training, applied once at start-up.
//!
//! Two things measured on the 2-core reference machine, each worth a quarter of a MiniLM step:
//!
//! - **Allocator.** A step allocates and frees tens of buffers of several MiB. glibc serves those
//!   with `mmap` and returns them with `munmap` at once, so every step pays page faults, page
//!   zeroing and TLB shoot-downs for memory it just gave back. Raising the mmap and trim thresholds
//!   keeps freed buffers in the heap for reuse.
//! - **candle's element-wise thread pool.** Besides rayon, candle 0.11 runs element-wise ops on a
//!   pool of its own whose idle workers spin before parking; on few cores they steal the CPU from
//!   the rayon workers that run the GEMMs and pipe's fused kernels. pipe's hot paths are its own
//!   rayon kernels, so candle's pool is set to the calling thread only (`CANDLE_NUM_THREADS=1`)
//!   unless the user chose otherwise.
//!
//! It also fixes the kernel path (`PIPE_KERNEL`, see [`crate::ops::cpu`]) before any kernel runs.

use crate::ops::cpu::{self, KernelPath, KernelPathError};

/// Applies the settings and returns the kernel path; an invalid `PIPE_KERNEL` is an error.
///
/// # Safety
///
/// Call first thing in `main`, before any other thread exists: it may set an environment variable,
/// which is unsound while another thread reads the environment.
pub unsafe fn configure() -> Result<KernelPath, KernelPathError> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        // Buffers up to 32 MiB (glibc's maximum for this knob on 64-bit) come from the heap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Keep up to 1 GiB of freed heap instead of returning it to the OS after every step.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // And nothing above 32 MiB from mmap either: the word embeddings' gradient (47 MiB for
        // BERT's vocabulary) and its accumulation buffers would otherwise fault in fresh pages
        // every step.
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
    cpu::configure_from_env()
}
