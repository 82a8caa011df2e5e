#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolchain from PyPI (no system CUDA, no GPU needed) for building pipe's
# `cuda` feature, and exports what candle's and cudarc's build scripts look for.
#
# Usage:  source scripts/cuda-env.sh [--compile-only]
#   then  cargo build --release --features cuda
#
# --compile-only fetches only the compiler and headers (enough for `cargo check`/`clippy`, which
# never link); without it the cuBLAS, cuRAND and NVRTC libraries come too (~560 MB of wheels) so
# the binary links. The driver library libcuda.so is never on PyPI: a stub with the same soname is
# generated from cudarc's own symbol list, as NVIDIA's toolkit ships under lib/stubs, each function
# answering CUDA_ERROR_NO_DEVICE (100). The real libcuda.so.1 comes from the GPU machine's driver at
# run time; on a machine without one, LD_LIBRARY_PATH=$CUDA_HOME/lib/stubs:$CUDA_HOME/lib lets a
# cuda build start and report that no GPU is visible.
#
# CUDA 13.0 matches the driver (580) on the GPU machines this project is lent; CUDA_COMPUTE_CAP=90
# builds for the H100/H200. Set PIPE_CUDA_HOME to choose where the toolkit goes.
(return 0 2>/dev/null) || { echo "error: source this script: source scripts/cuda-env.sh" >&2; exit 2; }

_pipe_cuda_setup() {
  local home=${PIPE_CUDA_HOME:-$HOME/.cache/pipe/cuda-13.0}
  local python
  python=$(command -v python3 || command -v python) || { echo "error: python3 with pip is needed" >&2; return 1; }
  local pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88)
  [ "${1:-}" = --compile-only ] || pkgs+=(nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
  local marker="$home/.installed-$(printf '%s\n' "${pkgs[@]}" | sha256sum | cut -c1-12)"
  if [ ! -f "$marker" ]; then
    echo "cuda-env: installing ${pkgs[*]} into $home" >&2
    "$python" -m pip install --quiet --no-deps --target "$home/py" --upgrade "${pkgs[@]}" || return 1
    touch "$marker"
  fi
  local root="$home/py/nvidia/cu13"
  [ -x "$root/bin/nvcc" ] || { echo "error: no nvcc under $root/bin" >&2; return 1; }
  # Unversioned names for the linker (the wheels carry only libfoo.so.N).
  local lib
  for lib in "$root"/lib/lib*.so.*; do
    [ -e "$lib" ] || continue
    local base=${lib##*/}
    ln -sf "$base" "$root/lib/${base%%.so.*}.so"
  done
  # The driver stub: every cu* symbol cudarc declares, as an empty function, soname libcuda.so.1.
  if [ ! -f "$root/lib/stubs/libcuda.so" ]; then
    mkdir -p "$root/lib/stubs"
    local sys
    # The `cuda` feature's crates are downloaded only when something builds it: on a fresh machine
    # cudarc's sources are not there until fetched.
    ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 >/dev/null 2>&1 || cargo fetch --locked --quiet || return 1
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys 2>/dev/null | head -1)
    [ -n "$sys" ] || { echo "error: cudarc 0.19.10 sources not found: run 'cargo fetch' first" >&2; return 1; }
    grep -rhoE 'fn cu[A-Za-z0-9_]+' "$sys" | sed 's/^fn //' | sort -u |
      sed 's/.*/int &(void) { return 100; }/' >"$root/lib/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda.c" || return 1
    ln -sf libcuda.so "$root/lib/stubs/libcuda.so.1"
  fi
  export CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  # candle-kernels compiles its CUDA sources on half the cores unless told otherwise.
  export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
  export PATH="$root/bin:$PATH"
  export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  echo "cuda-env: CUDA_HOME=$CUDA_HOME, compute capability $CUDA_COMPUTE_CAP" >&2
}
_pipe_cuda_setup "$@"
