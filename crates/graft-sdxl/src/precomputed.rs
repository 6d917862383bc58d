//! Ops with a hand-written backward on every device: the output is computed beforehand with
//! candle's tensor ops (so it runs wherever they run, the GPU included) from detached inputs,
//! and a custom op hands it on (a copy) and attaches the backward. The graph then keeps the
//! inputs and the output only, not the forward's temporaries.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// The gradient of one input from (input, output, output's gradient).
pub type Backward1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;

/// The gradients of three inputs from (inputs, output, output's gradient).
pub type Backward3 =
    Box<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// `out`, computed from `x` beforehand, with `backward` as its gradient.
pub fn with_backward1(name: &'static str, x: &Tensor, out: Tensor, backward: Backward1) -> Result<Tensor> {
    x.apply_op1(Precomputed1 { name, out: Mutex::new(Some(out)), backward })
}

/// `out`, computed from `a`, `b`, `c` beforehand, with `backward` as its gradient.
pub fn with_backward3(name: &'static str, a: &Tensor, b: &Tensor, c: &Tensor, out: Tensor, backward: Backward3) -> Result<Tensor> {
    a.apply_op3(b, c, Precomputed3 { name, out: Mutex::new(Some(out)), backward })
}

/// `out` is taken by the forward (which runs once), so the graph does not keep a second copy.
struct Precomputed1 {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
    backward: Backward1,
}

struct Precomputed3 {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
    backward: Backward3,
}

/// A copy of the precomputed output's storage (the op's output must be a storage of its own).
fn copy(out: &Mutex<Option<Tensor>>) -> Result<(Storage, Shape)> {
    let t = out.lock().map_err(|_| candle_core::Error::Msg("precomputed op: lock poisoned".into()))?.take();
    let Some(t) = t else { candle_core::bail!("precomputed op: the forward ran twice") };
    let (storage, layout) = t.storage_and_layout();
    let copied = match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        #[allow(unreachable_patterns)]
        _ => candle_core::bail!("precomputed op: unsupported device {:?}", t.device()),
    };
    Ok((copied, t.shape().clone()))
}

fn cpu(t: &Mutex<Option<Tensor>>) -> Result<(CpuStorage, Shape)> {
    match copy(t)? {
        (Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("precomputed op: the output is not on the CPU"),
    }
}

#[cfg(feature = "cuda")]
fn cuda(t: &Mutex<Option<Tensor>>) -> Result<(candle_core::CudaStorage, Shape)> {
    match copy(t)? {
        (Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("precomputed op: the output is not on the GPU"),
    }
}

impl CustomOp1 for Precomputed1 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(&self.out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda(&self.out)
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(x, out, grad)
    }
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(&self.out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda(&self.out)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.backward)(a, b, c, out, grad)
    }
}
