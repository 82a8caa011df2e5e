//! Records which commit the binary was built from (`PIPE_GIT_COMMIT`, with `-dirty` when tracked
//! files had uncommitted changes), for run records: a difference in bits between two machines is
//! first explained by a difference in code.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let dirty =
                git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{hash}-dirty") } else { hash }
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=PIPE_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves or the index changes (commits, checkouts, staged edits).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head_ref}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
    }
}

/// Compiles `src/ops/cuda/kernels.cu` to PTX with nvcc (the `cuda` feature; scripts/cuda-env.sh
/// sets up a compiler from PyPI). PTX for compute capability `CUDA_COMPUTE_CAP` (default 80) runs
/// on that architecture and every later one: the driver compiles it for the GPU at load.
fn compile_kernels() {
    let source = "src/ops/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("pipe_kernels.ptx");
    let nvcc = std::env::var("CUDA_HOME").map_or_else(|_| "nvcc".into(), |home| format!("{home}/bin/nvcc"));
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), source, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({nvcc}: {e}); see scripts/cuda-env.sh"));
    assert!(status.success(), "nvcc failed to compile {source}");
}
