//! The UNet's down, mid and up blocks (diffusers' `DownBlock2D` / `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`) and their resamplers.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{run1, Runner};
use crate::hooks::{BlockPosition, HookRegistry, Hooks};
use crate::nn::HookedConv2d;
use crate::resnet::{conv_info, ResnetBlock2D, ResnetConfig, ResnetHooks};

use super::transformer::{Transformer2DModel, TransformerConfig};

/// What every resnet and transformer of the UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
}

impl Common {
    fn resnet(
        &self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        registry: &mut HookRegistry,
        block: BlockPosition,
    ) -> Result<ResnetBlock2D> {
        let cfg = ResnetConfig { in_channels, out_channels, temb_channels: Some(self.temb_channels), groups: self.groups, eps: self.eps };
        ResnetBlock2D::new_hooked(vb, cfg, ResnetHooks { registry, block })
    }

    fn transformer(
        &self,
        vb: VarBuilder,
        channels: usize,
        attn: AttentionSettings,
        registry: &mut HookRegistry,
        block: BlockPosition,
    ) -> Result<Transformer2DModel> {
        let cfg = TransformerConfig {
            channels,
            heads: attn.heads,
            depth: attn.depth,
            context_dim: attn.context_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
        };
        Transformer2DModel::new(vb, cfg, registry, block)
    }
}

/// The transformers of a cross-attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSettings {
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
}

/// `downsamplers.0.conv`: conv 3x3, stride 2, padding 1 (a hook point).
#[derive(Debug, Clone)]
struct Downsample2D {
    conv: HookedConv2d,
}

impl Downsample2D {
    fn new(vb: VarBuilder, channels: usize, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        Ok(Self { conv: HookedConv2d::new(vb.pp("conv"), channels, channels, 3, 2, 1, registry, conv_info(block))? })
    }

    fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h % 2 == w % 2 {
            return self.conv.forward(x, hooks);
        }
        // candle 0.11's conv2d backward derives one output padding from the height and uses it for
        // the width: with one even and one odd side it fails. Pad explicitly instead, leaving out
        // the bottom / right padding row that a stride-2 conv over an even side never reads, so
        // that no output padding is needed. Same result as padding 1.
        // The hooks see this padded input with padding 0, for the same reason.
        let x = x.pad_with_zeros(2, 1, h % 2)?.pad_with_zeros(3, 1, w % 2)?;
        self.conv.forward_padded(&x, 0, hooks)
    }
}

/// `upsamplers.0.conv`: nearest-neighbour upsampling (x2, or to a given size) then conv 3x3
/// (a hook point).
#[derive(Debug, Clone)]
struct Upsample2D {
    conv: HookedConv2d,
}

impl Upsample2D {
    fn new(vb: VarBuilder, channels: usize, registry: &mut HookRegistry, block: BlockPosition) -> Result<Self> {
        Ok(Self { conv: HookedConv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1, registry, conv_info(block))? })
    }

    fn forward(&self, x: &Tensor, size: Option<(usize, usize)>, hooks: &dyn Hooks) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, th, tw)?, hooks)
    }
}

/// Nearest-neighbour resize of [b, c, h, w] to [b, c, th, tw] with torch's index rule
/// `min(floor(i * in / out), in - 1)` computed in f32 (the odd sizes of `forward_upsample_size`).
/// The exact x2 case uses candle's op; the other sizes gather rows and columns, which also keeps
/// them differentiable.
pub(super) fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if th == 2 * h && tw == 2 * w {
        return x.upsample_nearest2d(th, tw);
    }
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let idx: Vec<u32> = (0..output).map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Tensor::from_vec(idx, output, x.device())
    };
    x.index_select(&indices(h, th)?, 2)?.index_select(&indices(w, tw)?, 3)
}

/// A down block: `layers` resnets (each followed by a transformer in a cross-attention block),
/// then a downsampler unless it is the last block.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        index: usize,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attention: Option<AttentionSettings>,
        add_downsample: bool,
        common: &Common,
        registry: &mut HookRegistry,
    ) -> Result<Self> {
        let position = BlockPosition::Down(index);
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(common.resnet(vb.pp("resnets").pp(i.to_string()), cin, out_channels, registry, position)?);
            if let Some(attn) = attention {
                let vb = vb.pp("attentions").pp(i.to_string());
                attentions.push(common.transformer(vb, out_channels, attn, registry, position)?);
            }
        }
        let downsampler =
            if add_downsample { Some(Downsample2D::new(vb.pp("downsamplers").pp("0"), out_channels, registry, position)?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip connections it produced (one per resnet, one after the
    /// downsampler).
    pub fn forward<'a>(
        &'a self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hooks: &'a dyn Hooks,
        runner: &mut dyn Runner<'a>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = run1(runner, &[&h, temb], move |xs| resnet.forward_hooked(&xs[0], Some(&xs[1]), hooks))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward_with(&h, context, hooks, runner)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = run1(runner, &[&h], move |xs| down.forward(&xs[0], hooks))?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// resnet, then (transformer, resnet) once.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, channels: usize, attention: AttentionSettings, common: &Common, registry: &mut HookRegistry) -> Result<Self> {
        let resnet_0 = common.resnet(vb.pp("resnets").pp("0"), channels, channels, registry, BlockPosition::Mid)?;
        let attn_vb = vb.pp("attentions").pp("0");
        let attention = common.transformer(attn_vb, channels, attention, registry, BlockPosition::Mid)?;
        let resnet_1 = common.resnet(vb.pp("resnets").pp("1"), channels, channels, registry, BlockPosition::Mid)?;
        Ok(Self { resnet_0, attention, resnet_1 })
    }

    pub fn forward<'a>(
        &'a self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hooks: &'a dyn Hooks,
        runner: &mut dyn Runner<'a>,
    ) -> Result<Tensor> {
        let h = run1(runner, &[x, temb], move |xs| self.resnet_0.forward_hooked(&xs[0], Some(&xs[1]), hooks))?;
        let h = self.attention.forward_with(&h, context, hooks, runner)?;
        run1(runner, &[&h, temb], move |xs| self.resnet_1.forward_hooked(&xs[0], Some(&xs[1]), hooks))
    }
}

/// An up block: `layers` resnets over the input concatenated with a skip connection (each
/// followed by a transformer in a cross-attention block), then an upsampler unless it is the last.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel widths of an up block, as diffusers computes them.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Output width of the previous up block (the mid block for the first).
    pub prev_output: usize,
    /// Width of this block's output.
    pub out: usize,
    /// Width of the skip connection consumed by the last resnet (the matching down block's input).
    pub skip_in: usize,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        index: usize,
        channels: UpChannels,
        layers: usize,
        attention: Option<AttentionSettings>,
        add_upsample: bool,
        common: &Common,
        registry: &mut HookRegistry,
    ) -> Result<Self> {
        let position = BlockPosition::Up(index);
        let out = channels.out;
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { channels.skip_in } else { out };
            let cin = if i == 0 { channels.prev_output } else { out };
            resnets.push(common.resnet(vb.pp("resnets").pp(i.to_string()), cin + skip, out, registry, position)?);
            if let Some(attn) = attention {
                let vb = vb.pp("attentions").pp(i.to_string());
                attentions.push(common.transformer(vb, out, attn, registry, position)?);
            }
        }
        let upsampler = if add_upsample { Some(Upsample2D::new(vb.pp("upsamplers").pp("0"), out, registry, position)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// How many skip connections this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the last; `upsample_size` is the target of the upsampler when the
    /// latent size is not a multiple of the total downscale.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<'a>(
        &'a self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        hooks: &'a dyn Hooks,
        runner: &mut dyn Runner<'a>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = run1(runner, &[&h, skip, temb], move |xs| resnet.forward_hooked(&Tensor::cat(&[&xs[0], &xs[1]], 1)?, Some(&xs[2]), hooks))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward_with(&h, context, hooks, runner)?;
            }
        }
        match &self.upsampler {
            Some(up) => run1(runner, &[&h], move |xs| up.forward(&xs[0], upsample_size, hooks)),
            None => Ok(h),
        }
    }
}
