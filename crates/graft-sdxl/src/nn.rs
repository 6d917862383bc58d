//! Small building blocks shared by the models, all differentiable.
//!
//! candle-nn's `softmax_last_dim` and its fused `LayerNorm` path have no backward pass: gradients
//! upstream of them vanish silently. The forms here are written with plain tensor ops so that
//! anything attached at a hook point receives its gradient.

use std::sync::{Arc, RwLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor, D};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_nn::VarBuilder;

use crate::hooks::{HookRegistry, Hooks, LayerIndex, LayerInfo, LayerKind, LinearWeights};

/// A `Linear` that is a hook point. Its weights are shared with the registry so the host can swap
/// them (fuse, unfreeze) between forwards.
#[derive(Debug, Clone)]
pub struct HookedLinear {
    index: LayerIndex,
    weights: Arc<RwLock<LinearWeights>>,
}

impl HookedLinear {
    /// Loads `weight` (and `bias` if `bias`) under `vb` and registers the hook point. The name is
    /// `info.component`'s prefix followed by `vb`'s path.
    pub fn new(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        registry: &mut HookRegistry,
        mut info: LayerInfo,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        info.name = format!("{}.{}", info.component.prefix(), vb.prefix());
        info.kind = LayerKind::Linear;
        info.in_features = in_features;
        info.out_features = out_features;
        let weights = Arc::new(RwLock::new(LinearWeights { weight, bias }));
        let index = registry.register_linear(info, weights.clone());
        Ok(Self { index, weights })
    }

    pub fn index(&self) -> LayerIndex {
        self.index
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let base = {
            let w = self.weights.read().expect("linear weights lock poisoned");
            linear(x, &w.weight, w.bias.as_ref())?
        };
        if hooks.attached(self.index) {
            hooks.linear(self.index, x, base)
        } else {
            Ok(base)
        }
    }
}

/// `x @ w^T + b` for x of any rank >= 2.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // Biases are kept in f32: follow bf16 activations.
    if let Some(bias) = b.filter(|b| b.dtype() != x.dtype()) {
        return linear(x, w, Some(&bias.to_dtype(x.dtype())?));
    }
    // A weight kept in half precision (always frozen): a mixed-precision product for f32
    // activations on the CPU, else the weight converted for this call.
    if w.dtype() != x.dtype() {
        if x.device().is_cpu() && x.dtype() == DType::F32 && !b.is_some_and(|b| b.track_op()) {
            return crate::fused::frozen_linear(x, w, b);
        }
        return linear(x, &w.to_dtype(x.dtype())?, b);
    }
    // A frozen weight under an input that needs a gradient: skip the weight's gradient.
    if x.track_op() && !w.track_op() && !b.is_some_and(|b| b.track_op()) {
        return crate::fused::frozen_linear(x, w, b);
    }
    let y = match x.dims() {
        [b0, b1, _, _] => x.matmul(&w.broadcast_left((*b0, *b1))?.t()?)?,
        [bsize, _, _] => x.matmul(&w.broadcast_left(*bsize)?.t()?)?,
        _ => x.matmul(&w.t()?)?,
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A plain (not hooked) linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm over the last dimension, differentiable.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::supports_layer_norm(x, &self.weight, &self.bias) {
            return crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        // bf16 activations are normalised in f32, as torch does.
        if x.dtype() != self.weight.dtype() {
            return self.forward(&x.to_dtype(self.weight.dtype())?)?.to_dtype(x.dtype());
        }
        let n = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let x = x.broadcast_sub(&mean)?;
        let var = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension, differentiable (candle-nn's `softmax_last_dim` has no
/// backward). The forward is candle-nn's one-pass kernel on every device (f32 accumulation for
/// bf16); the backward, `p * (g - sum(g * p))`, needs only the probabilities, so the graph keeps
/// the scores and the probabilities instead of the composed form's four f32 temporaries.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let p = candle_nn::ops::softmax_last_dim(&x.detach())?;
    if !x.track_op() {
        return Ok(p);
    }
    x.apply_op2(&p, SoftmaxGrad)
}

/// Hands on the probabilities `p` computed from `x` and gives `x` their gradient.
struct SoftmaxGrad;

impl candle_core::CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "graft-softmax-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((p.try_clone(pl)?, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, p: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((p.try_clone(pl)?, pl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (p32, g32) = (p.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
        let dot = (&p32 * &g32)?.sum_keepdim(D::Minus1)?;
        let dx = (p32 * g32.broadcast_sub(&dot)?)?.to_dtype(x.dtype())?;
        Ok((Some(dx), None))
    }
}

/// Multi-head scaled dot-product attention. q [b, n, h*d], k/v [b, m, h*d] -> [b, n, h*d].
/// `causal` masks future positions (the text encoders).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    if crate::fused::supports_attention(q) {
        return crate::fused::attention(q, k, v, heads, causal);
    }
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    // q scaled first: the graph then keeps the scores once (in the softmax), not twice.
    let scores = (q * (1.0 / (d as f64).sqrt()))?.matmul(&k.t()?)?;
    let scores = if causal { apply_causal_mask(&scores)? } else { scores };
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))
}

fn apply_causal_mask(scores: &Tensor) -> Result<Tensor> {
    let (_, _, n, m) = scores.dims4()?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, m), scores.device())?.to_dtype(scores.dtype())?;
    scores.broadcast_add(&mask)
}

/// GroupNorm (candle-nn's is written with differentiable ops).
pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { weight, bias, groups, eps, inner })
}

/// candle-nn's `GroupNorm`; with frozen weights on the CPU it runs [`crate::fused::group_norm`]
/// (one pass, and its backward skips the weight and bias gradients).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    inner: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// `silu(norm(x))`, the resnets' norm and activation, in one pass when fused.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::supports_group_norm(x, &self.weight, &self.bias) {
            return crate::fused::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true);
        }
        self.forward(x)?.silu()
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::supports_group_norm(x, &self.weight, &self.bias) {
            return crate::fused::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false);
        }
        // bf16 activations are normalised in f32, as torch does.
        if x.dtype() != self.weight.dtype() {
            return self.inner.forward(&x.to_dtype(self.weight.dtype())?)?.to_dtype(x.dtype());
        }
        self.inner.forward(x)
    }
}

/// A 2-d convolution with bias.
pub fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
    Ok(Conv2d(candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?))
}

/// candle-nn's `Conv2d`; with a frozen kernel on the CPU it runs [`crate::fused::conv2d`]
/// (faster, and its backward skips the kernel's gradient).
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.0.config();
        if c.groups == 1 && c.dilation == 1 && crate::fused::supports_conv2d(x, self.weight(), self.bias()) {
            return crate::fused::conv2d(x, self.weight(), self.bias(), c.padding, c.stride);
        }
        if self.weight().dtype() != x.dtype() || self.bias().is_some_and(|b| b.dtype() != x.dtype()) {
            // Off the fused path, the kernel (half precision) or the bias (f32) in the
            // activations' dtype for this call.
            let bias = self.bias().map(|b| b.to_dtype(x.dtype())).transpose()?;
            let conv = candle_nn::Conv2d::new(self.weight().to_dtype(x.dtype())?, bias, *c);
            return conv.forward(x);
        }
        self.0.forward(x)
    }
}

/// Sinusoidal embedding as diffusers' `get_timestep_embedding`: `t` [n] -> [n, dim].
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    // Computed in f32 like diffusers, so that large timesteps give the same phases.
    let scale = -(10000f32.ln()) / (half as f32 - freq_shift as f32);
    let exponent: Vec<f32> = (0..half).map(|i| (i as f32 * scale).exp()).collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed softmax, whose gradient candle derives.
    fn composed(x: &Tensor) -> Result<Tensor> {
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn softmax_gradient_equals_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(crate::rng::GraftRng::new(5).randn((2, 3, 7), &dev)? * 3.0)?)?;
        let w = crate::rng::GraftRng::new(6).randn((2, 3, 7), &dev)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let theirs = composed(x.as_tensor())?;
        assert!((&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let g1 = (ours * &w)?.sum_all()?.backward()?.get(x.as_tensor()).cloned().expect("gradient");
        let g2 = (theirs * &w)?.sum_all()?.backward()?.get(x.as_tensor()).cloned().expect("gradient");
        assert!((&g1 - &g2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        // bf16 scores: the gradient in bf16, within its rounding.
        let xb = Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16)?)?;
        let gb = (softmax_last_dim(xb.as_tensor())?.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
        let gb = gb.get(xb.as_tensor()).expect("gradient").to_dtype(DType::F32)?;
        assert_eq!(gb.dtype(), DType::F32);
        let scale = g2.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!((gb - g2)?.abs()?.max_all()?.to_scalar::<f32>()? < 2e-2 * scale);
        Ok(())
    }
}
