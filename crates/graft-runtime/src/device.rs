//! Which device the tensors live on.

use candle_core::Device;

/// CUDA device 0 when built with the `cuda` feature and a GPU is there, else the CPU. Says which
/// in the log, and why not the GPU when this build has CUDA.
pub fn pick(cpu: bool) -> crate::Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    match cuda() {
        Ok(device) => {
            tracing::info!("running on CUDA GPU 0");
            return Ok(device);
        }
        Err(why) => tracing::warn!("built with CUDA, but {why}: running on the CPU"),
    }
    Ok(Device::Cpu)
}

/// Opens GPU 0. The CUDA libraries are loaded at run time (see tools/cuda-build.sh), so a machine
/// without a driver gets here too: look for the driver library first, and turn the panic that
/// cudarc raises for a missing library (cuBLAS, cuRAND) into an error.
#[cfg(feature = "cuda")]
fn cuda() -> Result<Device, String> {
    let found = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        // SAFETY: the NVIDIA driver library runs no code of concern when it is opened.
        unsafe { libloading::Library::new(*name) }.is_ok()
    });
    if !found {
        return Err("no NVIDIA driver (libcuda.so.1) was found".into());
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(0));
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(format!("GPU 0 could not be opened ({e})")),
        Err(panic) => {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!(
                "a CUDA library is missing ({}); install the CUDA 13 runtime libraries or put them on LD_LIBRARY_PATH",
                msg.unwrap_or_default()
            ))
        }
    }
}
