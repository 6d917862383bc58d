//! How frozen weights are held in memory, and which matrix-product kernel runs on them.
//!
//! Weights (matrices and conv kernels) may stay in half precision; everything else (biases, norm
//! weights, activations, adapter parameters, gradients, optimizer state) is f32. A matrix product
//! with a bf16 weight runs the bf16 kernel of `graft-gemm` (AMX or AVX-512 BF16, f32
//! accumulation) when the CPU has one, as torch's bf16 autocast does. An fp16 weight, or a bf16
//! one on a CPU without a bf16 unit, is widened exactly to f32 for the product: the memory saving
//! stays, the product is the f32 one (so an fp16 model gives the results of its f32 conversion).
//!
//! On a GPU, bf16 weights make the activations bf16 too ([`activation_dtype`]): every product then
//! runs on the tensor cores, as diffusers does with `torch_dtype=torch.bfloat16`. Norms and
//! softmax still compute in f32, and adapters in f32 (the host widens their inputs).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The precision frozen weights are kept in (`dtype` in configs, `--dtype` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// As stored in the model files (an fp16 file stays fp16, an f32 file f32).
    #[default]
    File,
    Fp32,
    Bf16,
    Fp16,
}

impl WeightDtype {
    pub const NAMES: &'static str = "file, fp32, bf16 or fp16";

    /// The in-memory dtype of a weight of `rank` stored as `stored`. Vectors (biases, norms) are
    /// always f32: they are small, and the fused kernels read them as f32.
    pub fn for_weight(self, stored: DType, rank: usize) -> DType {
        if rank < 2 {
            return DType::F32;
        }
        match self {
            WeightDtype::File => match stored {
                DType::BF16 | DType::F16 => stored,
                _ => DType::F32,
            },
            WeightDtype::Fp32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::Fp16 => DType::F16,
        }
    }
}

impl WeightDtype {
    /// [`WeightDtype::for_weight`] for a tensor loaded onto a GPU (`on_gpu`): there bf16 models keep
    /// their vectors in bf16 as well, as the activations are (no fused kernel reads them as f32,
    /// and each product would otherwise convert its bias).
    pub fn for_tensor(self, stored: DType, rank: usize, on_gpu: bool) -> DType {
        if on_gpu && rank < 2 && self.for_weight(stored, 2) == DType::BF16 {
            DType::BF16
        } else {
            self.for_weight(stored, rank)
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "file" | "auto" => Ok(Self::File),
            "fp32" | "f32" | "float32" | "no" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            other => Err(format!("unknown dtype `{other}`: use {}", Self::NAMES)),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::File => "file",
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        })
    }
}

/// The dtype activations flow in for weights held as `weights` on `device`: bf16 for bf16 weights
/// on a GPU, else f32 (the CPU's fused kernels take f32 activations with half-precision weights;
/// an fp16 model is widened, since SDXL's VAE overflows fp16 activations); f64 for f64.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    match weights {
        DType::BF16 if !device.is_cpu() => DType::BF16,
        // f64 models (the gradient tests' finite differences) stay f64.
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The bf16 matrix-product kernel this process uses for half-precision weights, if any
/// (`GRAFT_GEMM_KERNEL=none` turns it off).
pub fn bf16_kernel() -> Option<graft_gemm::Kernel> {
    graft_gemm::kernel()
}

/// One line for logs: the weights' precision and the kernel their products run on.
pub fn describe(weights: DType, device: &Device) -> String {
    if !device.is_cpu() {
        return format!("weights {weights:?}, activations {:?}, on the GPU", activation_dtype(weights, device));
    }
    match (weights, bf16_kernel()) {
        (DType::BF16, Some(k)) => format!("weights bf16, bf16 matrix products on {k:?} with f32 accumulation"),
        (DType::BF16, None) => "weights bf16, widened to f32 for matrix products (this CPU has no bf16 unit)".to_string(),
        (w, _) => format!("weights {w:?}, f32 matrix products"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_stay_f32_and_matrices_follow_the_choice() {
        assert_eq!(WeightDtype::File.for_weight(DType::F16, 2), DType::F16);
        assert_eq!(WeightDtype::File.for_weight(DType::F32, 4), DType::F32);
        assert_eq!(WeightDtype::File.for_weight(DType::F16, 1), DType::F32);
        assert_eq!(WeightDtype::Bf16.for_weight(DType::F32, 2), DType::BF16);
        assert_eq!(WeightDtype::Fp32.for_weight(DType::BF16, 2), DType::F32);
        assert_eq!("BF16".parse::<WeightDtype>(), Ok(WeightDtype::Bf16));
        assert!("int8".parse::<WeightDtype>().unwrap_err().contains("bf16"));
        assert_eq!(WeightDtype::Bf16.for_tensor(DType::F32, 1, true), DType::BF16);
        assert_eq!(WeightDtype::Bf16.for_tensor(DType::F32, 1, false), DType::F32);
        assert_eq!(WeightDtype::File.for_tensor(DType::F16, 1, true), DType::F32);
    }
}
