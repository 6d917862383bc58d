//! diffusers' `ResnetBlock2D` (time-scale-shift "default", output scale 1), shared by the UNet and
//! the VAE: GroupNorm, SiLU, conv 3x3, + time embedding, GroupNorm, SiLU, conv 3x3, + shortcut.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{conv2d, group_norm};

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: crate::nn::GroupNorm,
    conv1: crate::nn::Conv2d,
    time_emb_proj: Option<crate::nn::Linear>,
    norm2: crate::nn::GroupNorm,
    conv2: crate::nn::Conv2d,
    conv_shortcut: Option<crate::nn::Conv2d>,
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
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(crate::nn::Linear::new(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let conv_shortcut =
            if cin != cout { Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: group_norm(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `x` [b, c, h, w]; `temb` [b, t], the raw time embedding (SiLU is applied here, as diffusers
    /// does).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}
