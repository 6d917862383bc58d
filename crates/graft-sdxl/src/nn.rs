//! Small building blocks shared by the models, all differentiable.
//!
//! candle-nn's `softmax_last_dim` and its fused `LayerNorm` path have no backward pass: gradients
//! upstream of them vanish silently. The forms here are written with plain tensor ops, or are ops
//! with their own backward, so that anything attached at a hook point receives its gradient.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::hooks::{HookRegistry, Hooks, LayerIndex, LayerInfo, LayerKind, LinearWeights, SharedLinear};
use crate::overrides::BaseWeight;

/// A `Linear` that is a hook point. Its weights are shared with the registry so the host can swap
/// them (fuse, unfreeze) between forwards.
#[derive(Debug, Clone)]
pub struct HookedLinear {
    index: LayerIndex,
    weights: SharedLinear,
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
        let weights = Arc::new(BaseWeight::new(info.name.clone(), LinearWeights { weight, bias }));
        let index = registry.register_linear(info, weights.clone());
        Ok(Self { index, weights })
    }

    pub fn index(&self) -> LayerIndex {
        self.index
    }

    /// The dtype the weight is held in now.
    pub fn weight_dtype(&self) -> DType {
        self.weights.read().expect("linear weights lock poisoned").weight.dtype()
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
        // Frozen weights off the CPU's f32 kernel (the GPU's path): candle-nn's one-pass kernel.
        if !self.weight.track_op() && !self.bias.track_op() && x.dtype() != DType::F64 {
            return frozen_layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        // Half activations are normalised in f32, as torch does.
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

/// LayerNorm with frozen weight and bias on any device: candle-nn's one-pass kernel (f32
/// statistics for half activations), and a backward for the input only, in f32, from the input
/// alone (the composed form keeps five input-sized tensors).
pub fn frozen_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let out = candle_nn::ops::layer_norm(&x.detach().contiguous()?, &weight.to_dtype(dt)?, &bias.to_dtype(dt)?, eps as f32)?;
    if !x.track_op() {
        return Ok(out);
    }
    let w = weight.detach().to_dtype(DType::F32)?;
    let backward = Box::new(move |x: &Tensor, _: &Tensor, g: &Tensor| -> Result<Option<Tensor>> {
        let x32 = x.to_dtype(DType::F32)?;
        let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xh = centred.broadcast_mul(&inv_std)?;
        let gw = g.to_dtype(DType::F32)?.broadcast_mul(&w)?;
        Ok(Some(normalised_input_grad(&xh, &gw, &inv_std)?.to_dtype(x.dtype())?))
    });
    crate::precomputed::with_backward1("graft-layer-norm", x, out, backward)
}

/// GroupNorm over [b, c, ...] with frozen weight and bias on any device, in f32 (half activations
/// included), with a backward for the input only from the input alone (candle-nn's composed form
/// keeps its f32 temporaries for the backward).
pub fn frozen_group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: input {dims:?} does not split into {groups} groups")
    }
    // Per-channel vectors shaped to broadcast over [b, c, ...].
    let mut channel_shape = vec![1; dims.len()];
    channel_shape[1] = dims[1];
    let (w, b) = (
        weight.detach().to_dtype(DType::F32)?.reshape(channel_shape.as_slice())?,
        bias.detach().to_dtype(DType::F32)?.reshape(channel_shape.as_slice())?,
    );
    let batch = dims[0];
    let grouped = move |t: &Tensor| t.reshape((batch, groups, ()));
    // (x - mean) / std per sample and group, and 1 / std.
    let normalise = move |x: &Tensor| -> Result<(Tensor, Tensor)> {
        let xg = grouped(&x.to_dtype(DType::F32)?)?;
        let centred = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1)?)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok((centred.broadcast_mul(&inv_std)?, inv_std))
    };
    let (xh, _) = normalise(&x.detach())?;
    let out = xh.reshape(x.shape())?.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(x.dtype())?;
    if !x.track_op() {
        return Ok(out);
    }
    let backward = Box::new(move |x: &Tensor, _: &Tensor, g: &Tensor| -> Result<Option<Tensor>> {
        let (xh, inv_std) = normalise(x)?;
        let gw = grouped(&g.to_dtype(DType::F32)?.broadcast_mul(&w)?)?;
        Ok(Some(normalised_input_grad(&xh, &gw, &inv_std)?.reshape(x.shape())?.to_dtype(x.dtype())?))
    });
    crate::precomputed::with_backward1("graft-group-norm", x, out, backward)
}

/// The input's gradient of a normalisation over the last dimension with a frozen scale `w`:
/// `(gw - mean(gw) - xh * mean(gw * xh)) * inv_std`, where `xh` is the normalised input,
/// `inv_std` 1 / std and `gw` the output's gradient times `w`.
fn normalised_input_grad(xh: &Tensor, gw: &Tensor, inv_std: &Tensor) -> Result<Tensor> {
    let centred = gw.broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?;
    (centred - xh.broadcast_mul(&(gw * xh)?.mean_keepdim(D::Minus1)?)?)?.broadcast_mul(inv_std)
}

/// Multi-head scaled dot-product attention. q [b, n, h*d], k/v [b, m, h*d] -> [b, n, h*d].
/// `causal` masks future positions (the text encoders). `weights` is the dtype of the layer's
/// projection weights: with bf16 weights the CPU runs the products in bf16 too, as torch's
/// autocast does.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, weights: DType) -> Result<Tensor> {
    if crate::fused::supports_attention(q) {
        let bf16 = if weights == DType::BF16 { crate::precision::bf16_kernel() } else { None };
        return crate::fused::attention(q, k, v, heads, causal, bf16);
    }
    crate::chunked_attention::attention(q, k, v, heads, causal)
}

/// The composed attention, whose gradients candle derives: what the attention kernels are
/// tested against.
#[cfg(test)]
pub(crate) fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let mut s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    if causal {
        let mask: Vec<f32> = (0..n).flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        s = s.broadcast_add(&Tensor::from_vec(mask, (n, m), s.device())?)?;
    }
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))
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
        if !self.weight.track_op() && !self.bias.track_op() && x.dtype() != DType::F64 {
            return frozen_group_norm(x, &self.weight, &self.bias, self.groups, self.eps);
        }
        // A trained affine (a VAE in training) on the CPU: the fused normalisation, then the
        // affine as two broadcast ops, which give the weight's and the bias's gradients.
        let c = self.weight.dim(0)?;
        let unit = (Tensor::ones(c, DType::F32, x.device())?, Tensor::zeros(c, DType::F32, x.device())?);
        if crate::fused::supports_group_norm(x, &unit.0, &unit.1) {
            let normalized = crate::fused::group_norm(x, &unit.0, &unit.1, self.groups, self.eps, false)?;
            let mut shape = vec![1; x.rank()];
            shape[1] = c;
            return normalized.broadcast_mul(&self.weight.reshape(shape.as_slice())?)?.broadcast_add(&self.bias.reshape(shape.as_slice())?);
        }
        self.inner.forward(x)
    }
}

/// A 2-d convolution with bias.
pub fn conv2d(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
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
        if c.groups != 1 || c.dilation != 1 {
            return self.0.forward(x);
        }
        conv2d_forward(x, self.weight(), self.bias(), c.padding, c.stride)
    }
}

/// `conv2d(x, w) + b` (groups 1, dilation 1) on the fastest path the tensors allow: the fused CPU
/// kernel, a frozen-kernel op, or candle's differentiable conv (a trained kernel).
pub fn conv2d_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    if crate::fused::supports_conv2d(x, w, b) {
        return crate::fused::conv2d(x, w, b, padding, stride);
    }
    let frozen = !w.track_op() && !b.is_some_and(|b| b.track_op());
    if frozen {
        return frozen_conv2d(x, w, b, padding, stride);
    }
    if crate::fused::supports_trained_conv2d(x, w) {
        return crate::fused::trained_conv2d(x, w, b, padding, stride);
    }
    // A trained kernel elsewhere (the GPU): candle's conv, in the activations' dtype.
    let y = x.conv2d(&w.to_dtype(x.dtype())?, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// A convolution that is a hook point (UNet resnets, resamplers, conv projections). Its kernel
/// [out, in, kh, kw] and bias are shared with the registry like a [`HookedLinear`]'s, so the host
/// can fuse or unfreeze them. With nothing attached it runs exactly [`Conv2d`]'s computation.
#[derive(Debug, Clone)]
pub struct HookedConv2d {
    index: LayerIndex,
    weights: SharedLinear,
    geometry: crate::hooks::ConvInfo,
}

impl HookedConv2d {
    /// Loads `weight` and `bias` under `vb` and registers the hook point, named by
    /// `info.component`'s prefix and `vb`'s path.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        registry: &mut HookRegistry,
        mut info: LayerInfo,
    ) -> Result<Self> {
        // Same loading (and shape-only init) as candle-nn's conv2d.
        let plain = conv2d(vb.clone(), in_channels, out_channels, kernel, stride, padding)?;
        let geometry = crate::hooks::ConvInfo { kernel: (kernel, kernel), stride, padding };
        info.name = format!("{}.{}", info.component.prefix(), vb.prefix());
        info.kind = LayerKind::Conv;
        info.in_features = in_channels;
        info.out_features = out_channels;
        info.conv = Some(geometry);
        let weights =
            Arc::new(BaseWeight::new(info.name.clone(), LinearWeights { weight: plain.weight().clone(), bias: plain.bias().cloned() }));
        let index = registry.register_conv(info, weights.clone());
        Ok(Self { index, weights, geometry })
    }

    pub fn index(&self) -> LayerIndex {
        self.index
    }

    /// The kernel and bias now (a fused or unfrozen kernel included).
    pub fn weights(&self) -> LinearWeights {
        self.weights.current()
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        self.forward_padded(x, self.geometry.padding, hooks)
    }

    /// The convolution of `x` with `padding` instead of the layer's (an input the caller padded).
    pub fn forward_padded(&self, x: &Tensor, padding: usize, hooks: &dyn Hooks) -> Result<Tensor> {
        let base = {
            let w = self.weights.read().expect("conv weights lock poisoned");
            conv2d_forward(x, &w.weight, w.bias.as_ref(), padding, self.geometry.stride)?
        };
        if hooks.attached(self.index) {
            hooks.conv(self.index, x, padding, base)
        } else {
            Ok(base)
        }
    }
}

/// A 2-d convolution (groups 1, dilation 1) with a frozen kernel and bias, on any device, whose
/// backward gives the input's gradient only: candle's conv backward also computes the kernel's
/// (a second convolution as large as the forward) whether or not it is trained.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let w = w.detach().to_dtype(x.dtype())?;
    let y = x.detach().conv2d(&w, padding, stride, 1, 1)?;
    let out = match b {
        Some(b) => y.broadcast_add(&b.detach().to_dtype(x.dtype())?.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    if !x.track_op() {
        return Ok(out);
    }
    let backward = Box::new(move |x: &Tensor, _: &Tensor, g: &Tensor| -> Result<Option<Tensor>> {
        let (_, _, h, w_in) = x.dims4()?;
        Ok(Some(conv2d_input_grad(&g.to_dtype(x.dtype())?, &w, (h, w_in), padding, stride)?))
    });
    crate::precomputed::with_backward1("graft-frozen-conv2d", x, out, backward)
}

/// The input's gradient of `conv2d(x, w, padding, stride)` for an input of `size` (h, w), as a
/// convolution (im2col and a matrix product on every device; candle's CUDA transposed
/// convolution is a naive kernel): `g` spread out by the stride and padded by k - 1 - padding
/// (plus the input rows and columns the forward's stride never reached), against the kernel
/// flipped, with its input and output channels swapped.
fn conv2d_input_grad(g: &Tensor, w: &Tensor, size: (usize, usize), padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if padding + 1 > kh.min(kw) {
        // A padding this wide leaves output pixels that see no input: the transposed convolution.
        let out_padding = size.0 - ((g.dim(2)? - 1) * stride + kh - 2 * padding);
        return g.conv_transpose2d(w, padding, out_padding, stride, 1);
    }
    let reversed = |n: usize| Tensor::from_vec((0..n as u32).rev().collect::<Vec<u32>>(), n, w.device());
    let flipped = w.transpose(0, 1)?.contiguous()?.index_select(&reversed(kh)?, 2)?.index_select(&reversed(kw)?, 3)?;
    let g = spread(g, stride)?;
    let (ph, pw) = (kh - 1 - padding, kw - 1 - padding);
    let (extra_h, extra_w) = ((size.0 + kh - 1) - (g.dim(2)? + 2 * ph), (size.1 + kw - 1) - (g.dim(3)? + 2 * pw));
    g.pad_with_zeros(2, ph, ph + extra_h)?.pad_with_zeros(3, pw, pw + extra_w)?.conv2d(&flipped, 0, 1, 1, 1)
}

/// `g` [b, c, h, w] with `stride - 1` zeros between neighbouring rows and columns.
fn spread(g: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(g.clone());
    }
    let (b, c, h, w) = g.dims4()?;
    let zeros = Tensor::zeros((b, c, h, w, stride - 1), g.dtype(), g.device())?;
    let wide = (w - 1) * stride + 1;
    let g = Tensor::cat(&[&g.unsqueeze(4)?, &zeros], 4)?.reshape((b, c, h, w * stride))?.narrow(3, 0, wide)?;
    let zeros = Tensor::zeros((b, c, h, stride - 1, wide), g.dtype(), g.device())?;
    Tensor::cat(&[&g.unsqueeze(3)?, &zeros], 3)?.reshape((b, c, h * stride, wide))?.narrow(2, 0, (h - 1) * stride + 1)
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

    /// A GroupNorm whose weight and bias are trained: value and every gradient as candle-nn's.
    #[test]
    fn trained_group_norm_matches_candle_nn() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::GraftRng::new(5);
        let x = Var::from_tensor(&rng.randn((2, 8, 5, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&rng.randn(8, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.randn(8, &dev).unwrap()).unwrap();
        let ours = GroupNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            groups: 4,
            eps: 1e-6,
            inner: candle_nn::GroupNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 8, 4, 1e-6).unwrap(),
        };
        let y = ours.forward(&x).unwrap();
        let r = ours.inner.forward(&x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&y, &r) < 1e-5);
        let up = rng.randn(y.shape(), &dev).unwrap();
        let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (r * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            assert!(diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-4, "grad {name}");
        }
    }
    use candle_core::{Device, Var};

    #[test]
    fn frozen_layer_norm_equals_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::GraftRng::new(4);
        let x = Var::from_tensor(&rng.randn((2, 5, 16), &dev)?.affine(3.0, 1.0)?)?;
        let (w, b) = ((rng.randn(16, &dev)? + 1.0)?, rng.randn(16, &dev)?);
        let g = rng.randn((2, 5, 16), &dev)?;
        let ours = frozen_layer_norm(&x, &w, &b, 1e-5)?;
        let composed = {
            let mean = x.mean_keepdim(D::Minus1)?;
            let c = x.broadcast_sub(&mean)?;
            let var = c.sqr()?.mean_keepdim(D::Minus1)?;
            c.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?.broadcast_add(&b)?
        };
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&ours, &composed)? < 1e-5);
        let g1 = (ours * &g)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
        let g2 = (composed * &g)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
        assert!(diff(&g1, &g2)? < 1e-5, "{}", diff(&g1, &g2)?);
        Ok(())
    }

    #[test]
    fn frozen_conv_equals_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::GraftRng::new(12);
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        for (k, padding, stride, h, w) in [(3, 1, 1, 6, 5), (3, 1, 2, 8, 6), (3, 1, 2, 7, 7), (3, 0, 2, 9, 7), (1, 0, 1, 4, 4), (3, 2, 1, 4, 5)]
        {
            let x = Var::from_tensor(&rng.randn((2, 3, h, w), &dev)?)?;
            let (kernel, bias) = (rng.randn((4, 3, k, k), &dev)?, rng.randn(4, &dev)?);
            let ours = frozen_conv2d(&x, &kernel, Some(&bias), padding, stride)?;
            let theirs = x.conv2d(&kernel, padding, stride, 1, 1)?.broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            assert!(diff(&ours, &theirs)? < 1e-5);
            let g = rng.randn(ours.shape(), &dev)?;
            let g1 = (ours * &g)?.sum_all()?.backward()?;
            let g2 = (theirs * &g)?.sum_all()?.backward()?;
            assert!(diff(g1.get(&x).expect("gradient"), g2.get(&x).expect("gradient"))? < 1e-5);
            assert!(g1.get(&kernel).is_none(), "the frozen kernel got a gradient");
        }
        Ok(())
    }

    #[test]
    fn frozen_group_norm_equals_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::GraftRng::new(8);
        let x = Var::from_tensor(&rng.randn((2, 6, 3, 5), &dev)?.affine(2.0, 0.5)?)?;
        let (w, b) = ((rng.randn(6, &dev)? + 1.0)?, rng.randn(6, &dev)?);
        let g = rng.randn((2, 6, 3, 5), &dev)?;
        let ours = frozen_group_norm(&x, &w, &b, 3, 1e-5)?;
        let theirs = candle_nn::GroupNorm::new(w.clone(), b.clone(), 6, 3, 1e-5)?.forward(&x)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&ours, &theirs)? < 1e-5);
        let g1 = (ours * &g)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
        let g2 = (theirs * &g)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
        assert!(diff(&g1, &g2)? < 1e-5, "{}", diff(&g1, &g2)?);
        Ok(())
    }
}
