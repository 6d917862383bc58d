//! Which device the tensors live on.

use candle_core::Device;

/// CUDA device 0 when built with the `cuda` feature and a GPU is there, else the CPU.
pub fn pick(cpu: bool) -> anyhow::Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        if candle_core::utils::cuda_is_available() {
            return Ok(Device::new_cuda(0)?);
        }
        tracing::warn!("built with CUDA but no GPU is available: running on the CPU");
    }
    Ok(Device::Cpu)
}
