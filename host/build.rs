//! A `cuda` build links the CUDA runtime (libcudart.so.13: candle's kernels need it). The binary
//! looks for it beside itself first, where tools/cuda-build.sh puts it, so that it starts on a
//! machine without a CUDA install (and then runs on the CPU).
fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    }
}
