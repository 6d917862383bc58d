//! diffusers' `ResnetBlock2D` (time-scale-shift "default", output scale 1), shared by the UNet and
//! the VAE: GroupNorm, SiLU, conv 3x3, + time embedding, GroupNorm, SiLU, conv 3x3, + shortcut.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::hooks::{BlockPosition, Component, HookRegistry, Hooks, LayerInfo, LayerKind, NoHooks};
use crate::nn::{conv2d, group_norm, HookedConv2d};

/// A resnet convolution: a hook point in the UNet, plain in the VAE.
#[derive(Debug, Clone)]
enum ResConv {
    Plain(crate::nn::Conv2d),
    Hooked(HookedConv2d),
}

impl ResConv {
    fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        match self {
            ResConv::Plain(c) => c.forward(x),
            ResConv::Hooked(c) => c.forward(x, hooks),
        }
    }
}

/// Where a UNet resnet registers its convolutions.
pub struct ResnetHooks<'r> {
    pub registry: &'r mut HookRegistry,
    pub block: BlockPosition,
}

/// A `LayerInfo` template for a UNet conv hook point; `HookedConv2d::new` fills the rest.
pub fn conv_info(block: BlockPosition) -> LayerInfo {
    LayerInfo {
        name: String::new(),
        kind: LayerKind::Conv,
        component: Component::Unet,
        in_features: 0,
        out_features: 0,
        block,
        attention: None,
        conv: None,
    }
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: crate::nn::GroupNorm,
    conv1: ResConv,
    time_emb_proj: Option<crate::nn::Linear>,
    norm2: crate::nn::GroupNorm,
    conv2: ResConv,
    conv_shortcut: Option<ResConv>,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for the VAE, which has no time embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        Self::build(vb, cfg, None)
    }

    /// A resnet whose convolutions are hook points (the UNet's), registered in forward order:
    /// `conv1`, `conv2`, `conv_shortcut`.
    pub fn new_hooked(vb: VarBuilder, cfg: ResnetConfig, hooks: ResnetHooks) -> Result<Self> {
        Self::build(vb, cfg, Some(hooks))
    }

    fn build(vb: VarBuilder, cfg: ResnetConfig, mut hooks: Option<ResnetHooks>) -> Result<Self> {
        let mut conv = |vb: VarBuilder, cin: usize, cout: usize, k: usize, pad: usize| -> Result<ResConv> {
            Ok(match hooks.as_mut() {
                Some(h) => ResConv::Hooked(HookedConv2d::new(vb, cin, cout, k, 1, pad, h.registry, conv_info(h.block))?),
                None => ResConv::Plain(conv2d(vb, cin, cout, k, 1, pad)?),
            })
        };
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let conv1 = conv(vb.pp("conv1"), cin, cout, 3, 1)?;
        let conv2 = conv(vb.pp("conv2"), cout, cout, 3, 1)?;
        let conv_shortcut = if cin != cout { Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 0)?) } else { None };
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(crate::nn::Linear::new(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1,
            time_emb_proj,
            norm2: group_norm(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2,
            conv_shortcut,
        })
    }

    /// `x` [b, c, h, w]; `temb` [b, t], the raw time embedding (SiLU is applied here, as diffusers
    /// does).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.forward_hooked(x, temb, &NoHooks)
    }

    /// [`ResnetBlock2D::forward`] with the hooks of its convolutions.
    pub fn forward_hooked(&self, x: &Tensor, temb: Option<&Tensor>, hooks: &dyn Hooks) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?, hooks)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?, hooks)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x, hooks)?,
            None => x.clone(),
        };
        shortcut + h
    }
}
