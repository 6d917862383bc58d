#!/usr/bin/env bash
# Builds `graft` with `--features cuda` on a machine without a GPU or a CUDA install, into
# target/cuda/ (its own target folder, so the CPU build beside it is left alone).
#
# - nvcc and the CUDA headers come from NVIDIA's PyPI wheels, 13.0.x to match the GPU machines'
#   driver (580, CUDA 13.0), installed into a virtual environment under target/cuda/toolchain.
# - Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100 / H200).
# - candle-core asks cudarc to link libcuda, cuBLAS, cuRAND and NVRTC when the binary is built, and such
#   a binary does not start where those libraries are missing. This build hands cargo a copy of the
#   registry's cudarc whose build script loads them at run time instead (one line changed, below), so
#   the same binary starts on a CPU-only machine and says it runs on the CPU. Only the small CUDA
#   runtime (libcudart.so.13, which candle's kernels link) is needed at start: it is copied beside
#   the binary, which looks there first.
#
# Usage: tools/cuda-build.sh [extra cargo args]     prints the binary's path on its last line;
#        exit status 3 when PyPI cannot be reached for the compiler wheels
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cuda=$root/target/cuda
mkdir -p "$cuda"

# 1. The CUDA compiler and runtime headers, from PyPI.
venv=$cuda/toolchain
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# Every part pinned: nvcc's own requirements would otherwise bring a newer cicc, whose PTX the 13.0
# ptxas (and the 580 driver) cannot read.
"$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" ||
    { echo "cuda-build: could not install the CUDA 13.0 compiler wheels from PyPI (no network?)" >&2; exit 3; }
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "cuda-build: no nvcc under $cu after the install" >&2; exit 1; }
# The wheels ship libcudart.so.13 only; the linker asks for libcudart.so.
mkdir -p "$cuda/lib"
ln -sf "$cu/lib/libcudart.so.13" "$cuda/lib/libcudart.so"
export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" NVCC_CCBIN="${NVCC_CCBIN:-gcc}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -2

# 2. cudarc, loading the CUDA libraries at run time. Its sources only test the `dynamic-loading`
#    cfg; its build script links the libraries when `dynamic-linking` is on. Replace that call.
cargo fetch -q
cudarc_version=$(cargo metadata --format-version 1 --features graft-host/cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
src=$(echo "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version")
patched=$cuda/cudarc-$cudarc_version
if [ ! -f "$patched/.graft-patched" ]; then
    rm -rf "$patched" && cp -r "$src" "$patched"
    grep -q '    dynamic_linking(major, minor);' "$patched/build.rs" ||
        { echo "cuda-build: cudarc $cudarc_version's build.rs has changed; update this script" >&2; exit 1; }
    sed -i 's|    dynamic_linking(major, minor);|    println!("cargo:rustc-cfg=feature=\\"dynamic-loading\\"");|' "$patched/build.rs"
    touch "$patched/.graft-patched"
fi

# 3. The build. The patch goes on the command line only, so Cargo.lock is put back afterwards.
cp Cargo.lock "$cuda/Cargo.lock.orig"
trap 'cp "$cuda/Cargo.lock.orig" "$root/Cargo.lock"' EXIT
CARGO_TARGET_DIR=$cuda/target cargo build -p graft-host --features cuda \
    --config "patch.crates-io.cudarc.path='$patched'" "$@"
profile=debug
for a in "$@"; do [ "$a" = --release ] && profile=release; done
# The CUDA runtime goes beside the binary (its rpath is $ORIGIN, see host/build.rs).
cp -L "$cu/lib/libcudart.so.13" "$cuda/target/$profile/"
echo "$cuda/target/$profile/graft"
