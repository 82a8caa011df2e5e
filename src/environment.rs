//! What a run record says about the machine and the binary that made it.
//!
//! On the CPU, results do not depend on any of this (the kernels sum in a fixed order on every CPU
//! and path, and never call the system's math library), so none of it is part of a stage key. A
//! GPU run's `gpu` line is also in its train key (see `crate::device`). It is recorded
//! so that `pipe reproduce` can name what differs between the recording machine and this one if
//! bits ever do: the CPU (model, SIMD features, caches), the kernel path used, the C library, the
//! pipe version and the commit it was built from, the stage versions and the thread count.

use serde_json::json;

use crate::device::{Precision, Target};
use crate::ops::cpu::{CpuInfo, kernel_path};
use crate::plan::StageKind;

/// The environment of this process computing on `target` in `precision`, as recorded in run
/// records.
pub fn current(target: &Target, precision: Precision) -> serde_json::Value {
    let cpu = CpuInfo::detect();
    let stage_versions: serde_json::Map<String, serde_json::Value> =
        StageKind::ALL.iter().map(|k| (k.name().to_string(), json!(k.version()))).collect();
    let mut env = json!({
        "pipe_version": env!("CARGO_PKG_VERSION"),
        "pipe_commit": env!("PIPE_GIT_COMMIT"),
        "stage_versions": stage_versions,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "libc": libc_version(),
        "cpu": cpu.model,
        "cpu_features": cpu.features.join(" "),
        "cpu_caches": cpu.caches,
        "kernel": kernel_path().name(),
        "threads": rayon::current_num_threads(),
    });
    let device = if target.device.is_cpu() { "cpu" } else { "cuda" };
    env["device"] = json!(device);
    env["dtype"] = json!(precision.name());
    if let Some(gpu) = &target.gpu {
        env["gpu"] = json!(gpu);
    }
    env
}

/// The C library the binary runs against (it no longer affects results: pipe calls none of its
/// math functions; recorded for completeness).
fn libc_version() -> String {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: gnu_get_libc_version returns a pointer to a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        format!("glibc {}", version.to_string_lossy())
    }
    #[cfg(all(target_os = "linux", target_env = "musl"))]
    {
        "musl".to_string()
    }
    #[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
    {
        std::env::consts::OS.to_string()
    }
}
