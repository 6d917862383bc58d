//! The SDXL VAE: diffusers' `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D, one mid
//! attention). `encode` gives the latent distribution, `decode` takes unscaled latents (divide by
//! `scaling_factor` first). The VAE has no hook points.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::{self, conv2d, group_norm, Conv2d, GroupNorm, Linear};
use crate::resnet::{ResnetBlock2D, ResnetConfig};
use crate::rng::GraftRng;

/// The epsilon of every VAE norm (diffusers' `resnet_eps` default for the VAE blocks).
const NORM_EPS: f64 = 1e-6;

/// A diffusers `vae/config.json` (`AutoencoderKL`). Missing fields take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Latents for the UNet are `encode(x).sample() * scaling_factor` (0.13025 for SDXL).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted before scaling where set (not for SDXL).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_latent_channels() -> usize {
    4
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// The SDXL base 1.0 VAE.
    pub fn sdxl_base() -> Self {
        Self::from_json_str(include_str!("../configs/sdxl-base-1.0/vae/config.json"), "built-in sdxl-base-1.0 vae config")
            .expect("the built-in SDXL VAE config is valid")
    }

    /// Parses and validates a diffusers `vae/config.json`; `source` names it in errors.
    pub fn from_json_str(json: &str, source: &str) -> std::result::Result<Self, crate::ConfigError> {
        let config: Self = serde_json::from_str(json).map_err(|e| crate::ConfigError::new(source, format!("invalid VAE config ({e})")))?;
        config.validate().map_err(|e| crate::ConfigError::new(source, e))?;
        Ok(config)
    }

    /// Checks what the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("`block_out_channels` is empty".to_string());
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` must be positive".to_string());
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return Err(format!("`block_out_channels` entry {c} is not a positive multiple of `norm_num_groups` ({})", self.norm_num_groups));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("`in_channels`, `out_channels` and `latent_channels` must be positive".to_string());
        }
        if self.act_fn != "silu" {
            return Err(format!("`act_fn` \"{}\" is not supported (only \"silu\")", self.act_fn));
        }
        let check_types = |field: &str, types: &Option<Vec<String>>, expected: &str| match types {
            Some(t) if t.len() != self.block_out_channels.len() => {
                Err(format!("`{field}` has {} entries but `block_out_channels` has {}", t.len(), self.block_out_channels.len()))
            }
            Some(t) => match t.iter().find(|b| b.as_str() != expected) {
                Some(b) => Err(format!("`{field}` entry \"{b}\" is not supported (only \"{expected}\")")),
                None => Ok(()),
            },
            None => Ok(()),
        };
        check_types("down_block_types", &self.down_block_types, "DownEncoderBlock2D")?;
        check_types("up_block_types", &self.up_block_types, "UpDecoderBlock2D")
    }

    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig { in_channels, out_channels, temb_channels: None, groups: self.norm_num_groups, eps: NORM_EPS }
    }
}

/// The mid block's single-head spatial self-attention, with a residual. diffusers names its
/// linears `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, config: &VaeConfig) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), config.norm_num_groups, channels, NORM_EPS)?,
            to_q: Linear::new(vb.pp("to_q"), channels, channels, true)?,
            to_k: Linear::new(vb.pp("to_k"), channels, channels, true)?,
            to_v: Linear::new(vb.pp("to_v"), channels, channels, true)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), channels, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [b, c, h, w] -> [b, h*w, c]: one token per pixel.
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&nn::attention(&q, &k, &v, 1, false, self.to_q.weight.dtype())?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// resnet, attention, resnet (the attention is left out when `mid_block_add_attention` is false).
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, config: &VaeConfig) -> Result<Self> {
        let attention =
            if config.mid_block_add_attention { Some(SpatialAttention::new(vb.pp("attentions").pp("0"), channels, config)?) } else { None };
        let resnets = vb.pp("resnets");
        Ok(Self {
            resnet0: ResnetBlock2D::new(resnets.pp("0"), config.resnet(channels, channels))?,
            attention,
            resnet1: ResnetBlock2D::new(resnets.pp("1"), config.resnet(channels, channels))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnet0.forward(x, None)?;
        let h = match &self.attention {
            Some(a) => a.forward(&h)?,
            None => h,
        };
        self.resnet1.forward(&h, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except for the last block) a stride-2 conv.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        match &self.downsample {
            // diffusers pads right and bottom by one, then convolves without padding.
            Some(conv) => conv.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(h),
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then (except for the last block) nearest x2 and a conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, hh, ww) = h.dims4()?;
                conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)
            }
            None => Ok(h),
        }
    }
}

/// Image -> 2 x latent channels (mean and log-variance).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let last = channels.len() - 1;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let input = if i == 0 { channels[0] } else { channels[i - 1] };
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { input } else { out };
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), config.resnet(cin, out))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i < last { Some(conv2d(vb.pp("downsamplers").pp("0").pp("conv"), out, out, 3, 2, 0)?) } else { None };
            down_blocks.push(DownBlock { resnets, downsample });
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), channels[last], config)?,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), config.norm_num_groups, channels[last], NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), channels[last], 2 * config.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// Latents -> image. Channels run in the reverse order of the encoder's.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let last = reversed.len() - 1;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &out) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let input = if i == 0 { reversed[0] } else { reversed[i - 1] };
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { input } else { out };
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), config.resnet(cin, out))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i < last { Some(conv2d(vb.pp("upsamplers").pp("0").pp("conv"), out, out, 3, 1, 1)?) } else { None };
            up_blocks.push(UpBlock { resnets, upsample });
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), config.latent_channels, reversed[0], 3, 1, 1)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), reversed[0], config)?,
            up_blocks,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), config.norm_num_groups, reversed[last], NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), reversed[last], config.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The diagonal Gaussian `encode` returns (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// [b, latent_channels, h/8, w/8]
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// `mean + exp(0.5 * logvar) * noise`, the noise from the project's seeded generator.
    pub fn sample(&self, rng: &mut GraftRng) -> Result<Tensor> {
        let noise = rng.randn(self.mean.shape(), self.mean.device())?.to_dtype(self.mean.dtype())?;
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + (std * noise)?
    }

    /// The mean (diffusers' `mode()`).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers' `AutoencoderKL`. Weights under `encoder.*`, `decoder.*`, `quant_conv.*`,
/// `post_quant_conv.*`.
#[derive(Debug, Clone)]
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    /// The dtype it computes in ([`crate::precision::activation_dtype`]); outputs are f32.
    activations: candle_core::DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        config.validate().map_err(|e| candle_core::Error::Msg(format!("vae config: {e}")))?;
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv { Some(conv2d(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1, 0)?) } else { None };
        let post_quant_conv = if config.use_post_quant_conv { Some(conv2d(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?) } else { None };
        let decoder = Decoder::new(vb.pp("decoder"), config)?;
        let w = decoder.conv_in.weight();
        Ok(Self {
            activations: crate::precision::activation_dtype(w.dtype(), w.device()),
            config: config.clone(),
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            quant_conv,
            post_quant_conv,
            decoder,
        })
    }

    /// Computes in `dtype` from now on (default: [`crate::precision::activation_dtype`] of the
    /// weights); the outputs stay f32.
    pub fn set_activations(&mut self, dtype: candle_core::DType) {
        self.activations = dtype;
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `image` [b, in_channels, h, w] with values in [-1, 1].
    pub fn encode(&self, image: &Tensor) -> Result<LatentDist> {
        self.check_input("image", image, self.config.in_channels)?;
        let moments = self.encoder.forward(&image.to_dtype(self.activations)?)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        }
        .to_dtype(candle_core::DType::F32)?;
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?;
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// `latents` [b, latent_channels, h, w], unscaled (already divided by `scaling_factor`).
    /// Returns the image [b, out_channels, 8h, 8w] (for SDXL), roughly in [-1, 1], not clamped.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input("latents", latents, self.config.latent_channels)?;
        let latents = latents.to_dtype(self.activations)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&latents)?,
            None => latents,
        };
        self.decoder.forward(&z)?.to_dtype(candle_core::DType::F32)
    }

    fn check_input(&self, what: &str, x: &Tensor, channels: usize) -> Result<()> {
        match x.dims() {
            [b, c, h, w] if *c == channels && *b > 0 && *h > 0 && *w > 0 => Ok(()),
            dims => candle_core::bail!("vae: {what} must be [batch, {channels}, height, width], got {dims:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_config_parses() {
        let c = VaeConfig::sdxl_base();
        assert_eq!(c.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!((c.layers_per_block, c.norm_num_groups, c.latent_channels), (2, 32, 4));
        assert_eq!(c.scaling_factor, 0.13025);
    }

    #[test]
    fn bad_config_is_named() {
        let err = VaeConfig::from_json_str(r#"{"block_out_channels": [30], "norm_num_groups": 4}"#, "v.json").unwrap_err().to_string();
        assert!(err.contains("v.json") && err.contains("norm_num_groups"), "{err}");
    }
}
