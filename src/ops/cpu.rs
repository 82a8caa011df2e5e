//! Which CPU kernel path runs, the switch that forces one, and what the CPU is.
//!
//! Some kernels (the GEMM today) have variants for several instruction sets. Each variant computes
//! every output element with the same operations in the same order (see [`super::gemm`]), so the
//! choice changes speed, never bits. pipe picks the widest path the CPU supports; the environment
//! variable `PIPE_KERNEL=portable|avx2|avx512` forces one, which is how the tests prove on one
//! machine that every path gives the same bits (`tests/determinism.rs`). Forcing a path the CPU
//! lacks is an error, never a silent fallback, so a forced test cannot pass vacuously.

use std::sync::OnceLock;

/// A family of kernel variants, from the plain one to the widest SIMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelPath {
    /// Plain Rust with fused multiply-add (`mul_add`); runs on every CPU.
    Portable,
    /// x86-64 AVX2 with FMA (256-bit vectors).
    Avx2,
    /// x86-64 AVX-512F (512-bit vectors).
    Avx512,
    /// AVX-512 with the BF16 dot product (`VDPBF16PS`): the AVX-512 kernels, and bf16 products
    /// natively instead of emulated (see [`super::gemm`]'s bf16 contract).
    Avx512Bf16,
}

/// The environment variable that forces a kernel path.
pub const KERNEL_ENV: &str = "PIPE_KERNEL";

impl KernelPath {
    /// Every path, in order.
    pub const ALL: [Self; 4] = [Self::Portable, Self::Avx2, Self::Avx512, Self::Avx512Bf16];

    /// The name used by `PIPE_KERNEL` and run records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => Self::Avx512.supported() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512 | Self::Avx512Bf16 => false,
        }
    }

    /// The widest path this CPU supports.
    pub fn best() -> Self {
        Self::ALL.into_iter().rev().find(|p| p.supported()).unwrap_or(Self::Portable)
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `PIPE_KERNEL` value that names no path, or one this CPU cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelPathError {
    #[error("{KERNEL_ENV}={0:?}: expected one of portable, avx2, avx512, avx512bf16")]
    Unknown(String),
    #[error("{KERNEL_ENV}={0}: this CPU does not support it (it supports: {1})")]
    Unsupported(KernelPath, String),
}

impl std::str::FromStr for KernelPath {
    type Err = KernelPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| KernelPathError::Unknown(s.into()))
    }
}

static PATH: OnceLock<KernelPath> = OnceLock::new();

/// The path the kernels use: the one `PIPE_KERNEL` forced (see [`configure_from_env`]), else the
/// widest this CPU supports.
pub fn kernel_path() -> KernelPath {
    *PATH.get_or_init(KernelPath::best)
}

/// Reads `PIPE_KERNEL` and fixes the path for the rest of the process. Call before any kernel
/// runs; an unknown or unsupported value is an error (the binary exits 2 with it).
pub fn configure_from_env() -> Result<KernelPath, KernelPathError> {
    let Some(value) = std::env::var_os(KERNEL_ENV) else { return Ok(kernel_path()) };
    let value = value.to_string_lossy();
    let path: KernelPath = value.trim().parse()?;
    if !path.supported() {
        let supported: Vec<&str> =
            KernelPath::ALL.iter().filter(|p| p.supported()).map(|p| p.name()).collect();
        return Err(KernelPathError::Unsupported(path, supported.join(", ")));
    }
    Ok(*PATH.get_or_init(|| path))
}

/// What the CPU is, for run records: the facts that could explain a difference in bits if a
/// kernel ever depended on the machine (none should).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// The model name (`/proc/cpuinfo`'s `model name`), or the architecture where unknown.
    pub model: String,
    /// SIMD features that any kernel could use, as the CPU reports them.
    pub features: Vec<&'static str>,
    /// Data cache sizes per level, e.g. `L1d 32K, L2 1024K, L3 32768K` (Linux sysfs).
    pub caches: String,
}

impl CpuInfo {
    /// Reads the facts for this machine.
    pub fn detect() -> Self {
        Self { model: model_name(), features: features(), caches: caches() }
    }
}

fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(target_arch = "x86_64")]
fn features() -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! probe {
        ($($f:tt),*) => {$( if is_x86_feature_detected!($f) { out.push($f); } )*};
    }
    probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16");
    out
}

#[cfg(target_arch = "aarch64")]
fn features() -> Vec<&'static str> {
    let mut out = vec!["neon"];
    if std::arch::is_aarch64_feature_detected!("sve") {
        out.push("sve");
    }
    if std::arch::is_aarch64_feature_detected!("bf16") {
        out.push("bf16");
    }
    out
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn features() -> Vec<&'static str> {
    Vec::new()
}

/// Data and unified caches from sysfs (`/sys/devices/system/cpu/cpu0/cache/index*`).
fn caches() -> String {
    let base = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let read = |dir: &std::path::Path, f: &str| {
        std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_string())
    };
    let mut levels = Vec::new();
    for index in 0..8 {
        let dir = base.join(format!("index{index}"));
        let (Some(level), Some(kind), Some(size)) =
            (read(&dir, "level"), read(&dir, "type"), read(&dir, "size"))
        else {
            continue;
        };
        if kind == "Instruction" {
            continue;
        }
        let suffix = if kind == "Data" { "d" } else { "" };
        levels.push(format!("L{level}{suffix} {size}"));
    }
    if levels.is_empty() { "unknown".into() } else { levels.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_is_always_supported() {
        for p in KernelPath::ALL {
            assert_eq!(p.name().parse::<KernelPath>(), Ok(p));
        }
        assert!(KernelPath::Portable.supported());
        assert!(KernelPath::best().supported());
        assert!(matches!("sse".parse::<KernelPath>(), Err(KernelPathError::Unknown(_))));
    }
}
