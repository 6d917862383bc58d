//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s: the part of the
//! UNet where every linear and every attention module is a hook point.

use crate::checkpoint::{run1, Direct, Runner};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::hooks::{AttentionKind, BlockPosition, Component, HookRegistry, Hooks, LayerIndex, LayerInfo, LayerKind};
use crate::nn::{self, HookedLinear, LayerNorm};

/// A `LayerInfo` template for a UNet hook point; `HookedLinear::new` fills name and features.
fn info(kind: LayerKind, block: BlockPosition, attention: Option<AttentionKind>) -> LayerInfo {
    LayerInfo { name: String::new(), kind, component: Component::Unet, in_features: 0, out_features: 0, block, attention, conv: None }
}

fn hooked(
    vb: VarBuilder,
    in_features: usize,
    out_features: usize,
    bias: bool,
    registry: &mut HookRegistry,
    block: BlockPosition,
    attention: Option<AttentionKind>,
) -> Result<HookedLinear> {
    let template = info(LayerKind::Linear, block, attention);
    HookedLinear::new(vb, in_features, out_features, bias, registry, template)
}

/// Multi-head attention (`attn1` self, `attn2` cross): bias-free q/k/v, `to_out.0` with bias.
/// The module itself is an attention hook point.
#[derive(Debug, Clone)]
pub struct Attention {
    index: LayerIndex,
    to_q: HookedLinear,
    to_k: HookedLinear,
    to_v: HookedLinear,
    to_out: HookedLinear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        registry: &mut HookRegistry,
        block: BlockPosition,
    ) -> Result<Self> {
        let kind = if context_dim.is_some() { AttentionKind::CrossAttention } else { AttentionKind::SelfAttention };
        let mut module = info(LayerKind::Attention, block, Some(kind));
        module.name = format!("{}.{}", Component::Unet.prefix(), vb.prefix());
        module.in_features = dim;
        module.out_features = dim;
        let index = registry.register_attention(module);
        let kv_dim = context_dim.unwrap_or(dim);
        let a = Some(kind);
        Ok(Self {
            index,
            to_q: hooked(vb.pp("to_q"), dim, dim, false, registry, block, a)?,
            to_k: hooked(vb.pp("to_k"), kv_dim, dim, false, registry, block, a)?,
            to_v: hooked(vb.pp("to_v"), kv_dim, dim, false, registry, block, a)?,
            to_out: hooked(vb.pp("to_out").pp("0"), dim, dim, true, registry, block, a)?,
            heads,
        })
    }

    /// `x` [b, n, dim]; `context` [b, m, context_dim] for cross-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, hooks: &dyn Hooks) -> Result<Tensor> {
        let kv_input = context.unwrap_or(x);
        let q = self.to_q.forward(x, hooks)?;
        let k = self.to_k.forward(kv_input, hooks)?;
        let v = self.to_v.forward(kv_input, hooks)?;
        let out = nn::attention(&q, &k, &v, self.heads, false, self.to_q.weight_dtype())?;
        let out = self.to_out.forward(&out, hooks)?;
        if hooks.attached(self.index) {
            hooks.attention(self.index, x, context, out)
        } else {
            Ok(out)
        }
    }
}

/// `ff`: GEGLU (`net.0.proj`, value * gelu(gate), exact erf gelu) then `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: HookedLinear,
    proj_out: HookedLinear,
    inner: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: hooked(vb.pp("net").pp("0").pp("proj"), dim, 2 * inner, true, registry, block, None)?,
            proj_out: hooked(vb.pp("net").pp("2"), inner, dim, true, registry, block, None)?,
            inner,
        })
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let h = self.proj_in.forward(x, hooks)?;
        if crate::fused::supports_geglu(&h) {
            return self.proj_out.forward(&crate::fused::geglu(&h)?, hooks);
        }
        let last = h.rank() - 1;
        let value = h.narrow(last, 0, self.inner)?;
        let gate = h.narrow(last, self.inner, self.inner)?.gelu_erf()?;
        self.proj_out.forward(&(value * gate)?, hooks)
    }
}

/// LayerNorm -> self-attention, LayerNorm -> cross-attention, LayerNorm -> feed-forward, each
/// with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        // diffusers' default `norm_eps` of the transformer block; the UNet's is not passed down.
        let eps = 1e-5;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, eps)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, registry, block)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, eps)?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, registry, block)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(vb.pp("ff"), dim, registry, block)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, hooks)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context), hooks)? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?, hooks)? + &x
    }
}

/// `proj_in` / `proj_out`: a hooked linear over tokens (SDXL), or a hooked 1x1 conv over the
/// feature map (`use_linear_projection` false, as in SD 1.x).
#[derive(Debug, Clone)]
enum Projection {
    Linear(HookedLinear),
    Conv(nn::HookedConv2d),
}

impl Projection {
    fn new(vb: VarBuilder, channels: usize, linear: bool, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        if linear {
            Ok(Self::Linear(hooked(vb, channels, channels, true, registry, block, None)?))
        } else {
            Ok(Self::Conv(nn::HookedConv2d::new(vb, channels, channels, 1, 1, 0, registry, crate::resnet::conv_info(block))?))
        }
    }
}

/// Settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// GroupNorm, `proj_in`, `depth` transformer blocks over the h*w tokens, `proj_out`, + residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: crate::nn::GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: TransformerConfig, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        let c = cfg.channels;
        // diffusers fixes this GroupNorm's eps at 1e-6.
        let norm = nn::group_norm(vb.pp("norm"), cfg.groups, c, 1e-6)?;
        let proj_in = Projection::new(vb.pp("proj_in"), c, cfg.use_linear_projection, registry, block)?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i.to_string());
                BasicTransformerBlock::new(vb, c, cfg.context_dim, cfg.heads, registry, block)
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = Projection::new(vb.pp("proj_out"), c, cfg.use_linear_projection, registry, block)?;
        Ok(Self { norm, proj_in, blocks, proj_out })
    }

    /// `x` [b, c, h, w], `context` [b, m, context_dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        self.forward_with(x, context, hooks, &mut Direct)
    }

    /// [`Transformer2DModel::forward`] as segments (for checkpointing): the input projection,
    /// each transformer block, the output projection.
    pub fn forward_with<'a>(&'a self, x: &Tensor, context: &Tensor, hooks: &'a dyn Hooks, runner: &mut dyn Runner<'a>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = move |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_map = move |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let mut tokens = run1(runner, &[x], move |xs| {
            let normed = self.norm.forward(&xs[0])?;
            match &self.proj_in {
                Projection::Linear(l) => l.forward(&to_tokens(&normed)?, hooks),
                Projection::Conv(conv) => to_tokens(&conv.forward(&normed, hooks)?),
            }
        })?;
        for block in &self.blocks {
            tokens = run1(runner, &[&tokens, context], move |xs| block.forward(&xs[0], &xs[1], hooks))?;
        }
        run1(runner, &[&tokens, x], move |xs| {
            let out = match &self.proj_out {
                Projection::Linear(l) => to_map(&l.forward(&xs[0], hooks)?)?,
                Projection::Conv(conv) => conv.forward(&to_map(&xs[0])?.contiguous()?, hooks)?,
            };
            out + &xs[1]
        })
    }
}
