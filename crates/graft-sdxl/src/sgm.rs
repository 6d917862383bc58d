//! Name map between diffusers parameter names and the original single-file SGM layout of SDXL
//! (the `.safetensors` checkpoints of A1111, ComfyUI and CivitAI).
//!
//! Everything here is a pure function over names and a few structure numbers ([`SgmLayout`]).
//! The only tensor code is [`Transform`], which turns an SGM tensor into the diffusers tensor and
//! back: the fused `in_proj` of OpenCLIP, the transposed `text_projection` and the VAE attention
//! weights stored as 1x1 convolutions.
//!
//! Component prefixes in a single file:
//! - UNet: `model.diffusion_model.`
//! - VAE: `first_stage_model.`
//! - CLIP-L (TE1): `conditioner.embedders.0.transformer.` then the transformers names (`text_model.…`)
//! - OpenCLIP bigG (TE2): `conditioner.embedders.1.model.` then open_clip names.
//!
//! Names on the diffusers side are relative to the component folder (`unet/`, `vae/`,
//! `text_encoder/`, `text_encoder_2/`), e.g. `down_blocks.1.attentions.0.proj_in.weight`.

mod text;
mod unet;
mod vae;

use candle_core::{Result, Tensor};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const TEXT_ENCODER_2_PREFIX: &str = "conditioner.embedders.1.model.";

/// A model inside a single-file checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SgmComponent {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

impl SgmComponent {
    pub const ALL: [SgmComponent; 4] = [SgmComponent::Unet, SgmComponent::Vae, SgmComponent::TextEncoder, SgmComponent::TextEncoder2];

    /// The key prefix of this component in a single file.
    pub fn prefix(self) -> &'static str {
        match self {
            SgmComponent::Unet => UNET_PREFIX,
            SgmComponent::Vae => VAE_PREFIX,
            SgmComponent::TextEncoder => TEXT_ENCODER_PREFIX,
            SgmComponent::TextEncoder2 => TEXT_ENCODER_2_PREFIX,
        }
    }

    /// The diffusers folder that holds this component.
    pub fn diffusers_folder(self) -> &'static str {
        match self {
            SgmComponent::Unet => "unet",
            SgmComponent::Vae => "vae",
            SgmComponent::TextEncoder => "text_encoder",
            SgmComponent::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How the diffusers tensor is obtained from the SGM tensor (the loader's own type, so that an
/// [`SgmKey`] feeds [`crate::varbuilder::Stored`] directly).
pub use crate::varbuilder::Transform;

impl Transform {
    /// The diffusers tensor from the SGM tensor.
    pub fn to_diffusers(&self, sgm: &Tensor) -> Result<Tensor> {
        match self {
            Transform::None => Ok(sgm.clone()),
            Transform::Rows { start, len } => {
                let (start, len) = (*start, *len);
                let rows = sgm.dims().first().copied().unwrap_or(0);
                if start + len > rows {
                    candle_core::bail!(
                        "sgm: fused in_proj tensor has {rows} rows, cannot take rows {start}..{}: \
                         the text encoder 2 hidden size of the layout does not match the file",
                        start + len
                    );
                }
                sgm.narrow(0, start, len)
            }
            Transform::Transpose => sgm.t()?.contiguous(),
            Transform::Conv1x1ToLinear => match sgm.dims() {
                [o, i, 1, 1] => sgm.reshape((*o, *i)),
                // Some converters already wrote the VAE attention as Linear.
                [_, _] => Ok(sgm.clone()),
                d => candle_core::bail!("sgm: expected a 1x1 conv weight [out, in, 1, 1], got shape {d:?}"),
            },
        }
    }

    /// The SGM tensor from the diffusers tensor. A fused `in_proj` ([`Transform::Rows`]) takes all
    /// three parts: use [`fuse_rows`] on the tensors of the names [`SgmLayout::from_sgm`] returns.
    pub fn to_sgm(&self, diffusers: &Tensor) -> Result<Tensor> {
        match self {
            Transform::None => Ok(diffusers.clone()),
            Transform::Rows { .. } => {
                candle_core::bail!("sgm: a fused in_proj needs q, k and v together: use sgm::fuse_rows")
            }
            Transform::Transpose => diffusers.t()?.contiguous(),
            Transform::Conv1x1ToLinear => match diffusers.dims() {
                [o, i] => diffusers.reshape((*o, *i, 1, 1)),
                d => candle_core::bail!("sgm: expected a Linear weight [out, in], got shape {d:?}"),
            },
        }
    }
}

/// Stacks q, k, v (in that order) into a fused OpenCLIP `in_proj_weight` / `in_proj_bias`.
pub fn fuse_rows(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 0)
}

/// An SGM key (full name, with the component prefix) and how to get the diffusers tensor from it.
#[derive(Debug, Clone, PartialEq)]
pub struct SgmKey {
    pub name: String,
    pub transform: Transform,
}

/// UNet structure numbers the block index arithmetic depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgmUnetLayout {
    /// Resnets per down block (diffusers order); `len()` is the number of blocks. Up block i has
    /// `layers[n-1-i] + 1` resnets (diffusers reverses the list for the up path).
    pub layers: Vec<usize>,
    /// Per down block (diffusers order): does it have attentions (`CrossAttnDownBlock2D`)?
    pub down_attention: Vec<bool>,
    /// Per up block (diffusers order): does it have attentions (`CrossAttnUpBlock2D`)?
    pub up_attention: Vec<bool>,
}

impl SgmUnetLayout {
    /// From the diffusers UNet config values: `layers_per_block` (one value for every block),
    /// `down_block_types` and `up_block_types` (a block has attentions when its type contains
    /// `CrossAttn`). The mid block is `UNetMidBlock2DCrossAttn` (resnet, attention, resnet), as in
    /// every SGM UNet.
    pub fn new<S: AsRef<str>>(layers_per_block: usize, down_block_types: &[S], up_block_types: &[S]) -> Result<Self> {
        Self::per_block(&vec![layers_per_block; down_block_types.len()], down_block_types, up_block_types)
    }

    /// As [`SgmUnetLayout::new`] with one `layers_per_block` value per down block.
    pub fn per_block<S: AsRef<str>>(layers: &[usize], down_block_types: &[S], up_block_types: &[S]) -> Result<Self> {
        let n = down_block_types.len();
        if n == 0 || up_block_types.len() != n || layers.len() != n {
            candle_core::bail!(
                "sgm: unet config has {n} down_block_types, {} up_block_types and {} layers_per_block values: \
                 they must be equal and non-empty",
                up_block_types.len(),
                layers.len()
            );
        }
        if layers.contains(&0) {
            candle_core::bail!("sgm: unet config layers_per_block must be at least 1, got {layers:?}");
        }
        let attn = |t: &[S]| t.iter().map(|s| s.as_ref().contains("CrossAttn")).collect();
        Ok(Self { layers: layers.to_vec(), down_attention: attn(down_block_types), up_attention: attn(up_block_types) })
    }

    /// From a parsed diffusers UNet config.
    pub fn from_config(config: &crate::unet::UNetConfig) -> Result<Self> {
        let layers: Vec<usize> = config.blocks()?.iter().map(|b| b.layers).collect();
        Self::per_block(&layers, &config.down_block_types, &config.up_block_types)
    }

    /// SDXL base / refiner-shaped UNet: 3 blocks, 2 layers, attention in down blocks 1, 2 and up 0, 1.
    pub fn sdxl() -> Self {
        Self { layers: vec![2; 3], down_attention: vec![false, true, true], up_attention: vec![true, true, false] }
    }

    pub fn num_blocks(&self) -> usize {
        self.layers.len()
    }
}

/// VAE structure numbers (`block_out_channels.len()`, `layers_per_block` of the VAE config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgmVaeLayout {
    pub num_blocks: usize,
    /// Resnets per encoder down block; decoder up blocks have one more.
    pub layers_per_block: usize,
}

impl SgmVaeLayout {
    /// From a parsed diffusers VAE config.
    pub fn from_config(config: &crate::vae::VaeConfig) -> Self {
        Self { num_blocks: config.block_out_channels.len(), layers_per_block: config.layers_per_block }
    }

    pub fn sdxl() -> Self {
        Self { num_blocks: 4, layers_per_block: 2 }
    }
}

/// Everything the name map needs to know about the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgmLayout {
    pub unet: SgmUnetLayout,
    pub vae: SgmVaeLayout,
    /// Hidden size of text encoder 2 (rows of each of q, k, v in the fused `in_proj`).
    pub te2_hidden_size: usize,
}

impl SgmLayout {
    pub fn new(unet: SgmUnetLayout, vae: SgmVaeLayout, te2_hidden_size: usize) -> Self {
        Self { unet, vae, te2_hidden_size }
    }

    /// SDXL base 1.0.
    pub fn sdxl() -> Self {
        Self::new(SgmUnetLayout::sdxl(), SgmVaeLayout::sdxl(), 1280)
    }

    /// From the parsed diffusers configs of the UNet, the VAE and text encoder 2.
    pub fn from_configs(unet: &crate::unet::UNetConfig, vae: &crate::vae::VaeConfig, text_encoder_2: &crate::clip::ClipConfig) -> Result<Self> {
        Ok(Self::new(SgmUnetLayout::from_config(unet)?, SgmVaeLayout::from_config(vae), text_encoder_2.hidden_size))
    }

    /// Diffusers parameter name (relative to the component folder) -> SGM key and transform.
    /// `None` for a name with no SGM counterpart (e.g. text encoder 2 `position_ids`) or one that
    /// does not fit the layout.
    pub fn to_sgm(&self, component: SgmComponent, diffusers_name: &str) -> Option<SgmKey> {
        let (name, transform) = match component {
            SgmComponent::Unet => (unet::to_sgm(&self.unet, diffusers_name)?, Transform::None),
            SgmComponent::Vae => vae::to_sgm(&self.vae, diffusers_name)?,
            SgmComponent::TextEncoder => (text::te1_to_sgm(diffusers_name)?, Transform::None),
            SgmComponent::TextEncoder2 => text::te2_to_sgm(self.te2_hidden_size, diffusers_name)?,
        };
        Some(SgmKey { name: format!("{}{name}", component.prefix()), transform })
    }

    /// SGM key (full name) -> component and the diffusers names it holds (three for a fused
    /// `in_proj`: q, k, v in stacking order). `None` for a key outside the map; see
    /// [`is_known_extra`] for keys that are expected and carry no weight.
    pub fn from_sgm(&self, sgm_name: &str) -> Option<(SgmComponent, Vec<String>)> {
        let component = SgmComponent::ALL.into_iter().find(|c| sgm_name.starts_with(c.prefix()))?;
        let rest = &sgm_name[component.prefix().len()..];
        let names = match component {
            SgmComponent::Unet => vec![unet::from_sgm(&self.unet, rest)?],
            SgmComponent::Vae => vec![vae::from_sgm(&self.vae, rest)?],
            SgmComponent::TextEncoder => vec![text::te1_from_sgm(rest)?],
            SgmComponent::TextEncoder2 => text::te2_from_sgm(rest)?,
        };
        Some((component, names))
    }

    /// Diffusers UNet module path (or parameter name) -> SGM path, without `model.diffusion_model.`:
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    /// `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (the kohya LoRA names use these).
    pub fn unet_module_to_sgm(&self, diffusers_module_path: &str) -> Option<String> {
        unet::to_sgm(&self.unet, diffusers_module_path)
    }

    /// The inverse of [`SgmLayout::unet_module_to_sgm`].
    pub fn unet_module_from_sgm(&self, sgm_module_path: &str) -> Option<String> {
        unet::from_sgm(&self.unet, sgm_module_path)
    }
}

/// Keys a real single file carries that hold no weight of the four models: `position_ids`
/// buffers, OpenCLIP's `logit_scale`, EMA copies (`model_ema.`) and the denoiser's sigma tables.
pub fn is_known_extra(sgm_name: &str) -> bool {
    sgm_name.ends_with(".position_ids")
        || sgm_name == "conditioner.embedders.1.model.logit_scale"
        || sgm_name.starts_with("model_ema.")
        || sgm_name.starts_with("denoiser.")
}

/// Which components an SGM single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SgmContents {
    pub unet: bool,
    pub vae: bool,
    pub text_encoder: bool,
    pub text_encoder_2: bool,
}

impl SgmContents {
    pub fn has(&self, component: SgmComponent) -> bool {
        match component {
            SgmComponent::Unet => self.unet,
            SgmComponent::Vae => self.vae,
            SgmComponent::TextEncoder => self.text_encoder,
            SgmComponent::TextEncoder2 => self.text_encoder_2,
        }
    }
}

/// Detects an SGM single file by its keys: `None` when no key starts with `model.diffusion_model.`
/// (not a single-file checkpoint), otherwise the components present.
pub fn detect<S: AsRef<str>>(keys: &[S]) -> Option<SgmContents> {
    let has = |prefix: &str| keys.iter().any(|k| k.as_ref().starts_with(prefix));
    if !has(UNET_PREFIX) {
        return None;
    }
    Some(SgmContents { unet: true, vae: has(VAE_PREFIX), text_encoder: has(TEXT_ENCODER_PREFIX), text_encoder_2: has(TEXT_ENCODER_2_PREFIX) })
}

/// Appends the remaining path segments (if any) to `head`.
fn join(head: &str, rest: &[&str]) -> String {
    if rest.is_empty() {
        head.to_string()
    } else {
        format!("{head}.{}", rest.join("."))
    }
}

/// A leaf module path ends here or with its parameter.
fn is_leaf_rest(rest: &[&str]) -> bool {
    matches!(rest, [] | ["weight"] | ["bias"])
}

/// A decimal index segment.
fn index(s: &str) -> Option<usize> {
    // Reject "+1", "01" and the like: only canonical decimal indices are names.
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits `path` after the leading segments that spell `head` (e.g. "time_embed.0").
fn strip_head<'a>(segs: &'a [&'a str], head: &str) -> Option<&'a [&'a str]> {
    let h: Vec<&str> = head.split('.').collect();
    if segs.len() >= h.len() && segs[..h.len()] == h[..] {
        Some(&segs[h.len()..])
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
