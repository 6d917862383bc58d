//! `UNetConfig`: a diffusers `unet/config.json` (UNet2DConditionModel).
//!
//! Unknown keys are ignored (diffusers configs carry many bookkeeping fields); every key that
//! changes the computation is either honoured or refused by [`UNetConfig::validate`] with a message
//! naming it.

use candle_core::Result;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// A per-block setting that diffusers accepts either as one value for every block or as a list
/// with one value per down block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per down block; `field` names the config key in the error.
    pub fn resolve(&self, blocks: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => candle_core::bail!(
                "unet config: `{field}` has {} entries but there are {blocks} down blocks; give one value or one per block",
                v.len()
            ),
        }
    }
}

fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_blocks() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn default_up_blocks() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_one() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_silu() -> String {
    "silu".into()
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_positional() -> String {
    "positional".into()
}
fn default_scale_shift() -> String {
    "default".into()
}
fn default_kernel() -> usize {
    3
}
fn default_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// The fields of diffusers' `UNet2DConditionModel` config that graft reads. Names and defaults are
/// diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// diffusers' misnomer: for UNet2DConditionModel this is the number of heads per block.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// The number of heads; takes precedence over `attention_head_dim` when set.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "default_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

/// The settings of one down block (up blocks use them reversed), resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSettings {
    pub out_channels: usize,
    pub layers: usize,
    pub transformer_layers: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
}

impl UNetConfig {
    /// Stable Diffusion XL base 1.0.
    pub fn sdxl_base() -> Self {
        Self::from_json_str(include_str!("../../configs/sdxl-base-1.0/unet/config.json"), "built-in sdxl-base-1.0 unet config")
            .expect("the built-in SDXL UNet config is valid")
    }

    /// Parses and validates a diffusers `unet/config.json`; `source` names it in errors.
    pub fn from_json_str(json: &str, source: &str) -> std::result::Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json).map_err(|e| ConfigError::new(source, format!("invalid UNet config ({e})")))?;
        config.validate().map_err(|e| ConfigError::new(source, e.to_string()))?;
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> std::result::Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read ({e})")))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// The width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels.first().copied().unwrap_or(0) * 4)
    }

    pub fn groups(&self) -> Result<usize> {
        self.norm_num_groups.ok_or_else(|| candle_core::Error::Msg("unet config: `norm_num_groups` null is not supported".into()))
    }

    /// The `text_time` add-embedding's time-id width, `None` without one.
    pub fn text_time(&self) -> Option<usize> {
        match self.addition_embed_type.as_deref() {
            Some("text_time") => self.addition_time_embed_dim,
            _ => None,
        }
    }

    /// Per down block: channels, resnets, transformer depth, heads and cross-attention width.
    pub fn blocks(&self) -> Result<Vec<BlockSettings>> {
        let n = self.down_block_types.len();
        let layers = self.layers_per_block.resolve(n, "layers_per_block")?;
        let depth = self.transformer_layers_per_block.resolve(n, "transformer_layers_per_block")?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.resolve(n, "num_attention_heads")?,
            None => self.attention_head_dim.resolve(n, "attention_head_dim")?,
        };
        let cross = self.cross_attention_dim.resolve(n, "cross_attention_dim")?;
        if self.block_out_channels.len() != n {
            candle_core::bail!("unet config: `block_out_channels` has {} entries but `down_block_types` has {n}", self.block_out_channels.len())
        }
        Ok((0..n)
            .map(|i| BlockSettings {
                out_channels: self.block_out_channels[i],
                layers: layers[i],
                transformer_layers: depth[i],
                heads: heads[i],
                cross_attention_dim: cross[i],
            })
            .collect())
    }

    /// Refuses every setting graft does not implement, naming the key.
    pub fn validate(&self) -> Result<()> {
        fn refuse(field: &str, value: impl std::fmt::Debug, supported: &str) -> Result<()> {
            candle_core::bail!("unet config: `{field}` = {value:?} is not supported (supported: {supported})")
        }
        let n = self.down_block_types.len();
        if n == 0 {
            candle_core::bail!("unet config: `down_block_types` is empty")
        }
        if self.up_block_types.len() != n {
            candle_core::bail!("unet config: `up_block_types` has {} entries but `down_block_types` has {n}", self.up_block_types.len())
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                refuse("down_block_types", t, "DownBlock2D, CrossAttnDownBlock2D")?;
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                refuse("up_block_types", t, "UpBlock2D, CrossAttnUpBlock2D")?;
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            refuse("mid_block_type", &self.mid_block_type, "UNetMidBlock2DCrossAttn")?;
        }
        let groups = self.groups()?;
        let blocks = self.blocks()?;
        for (i, b) in blocks.iter().enumerate() {
            if groups == 0 || b.out_channels % groups != 0 {
                candle_core::bail!("unet config: block_out_channels[{i}] = {} is not a multiple of norm_num_groups = {groups}", b.out_channels)
            }
            if b.heads == 0 || b.out_channels % b.heads != 0 {
                candle_core::bail!("unet config: block {i}: {} channels cannot be split into {} attention heads", b.out_channels, b.heads)
            }
            if b.layers == 0 {
                candle_core::bail!("unet config: `layers_per_block` must be at least 1 (block {i})")
            }
        }
        if self.only_cross_attention.resolve(n, "only_cross_attention")?.iter().any(|&b| b) {
            refuse("only_cross_attention", true, "false")?;
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            refuse("reverse_transformer_layers_per_block", "set", "null")?;
        }
        if self.act_fn != "silu" {
            refuse("act_fn", &self.act_fn, "silu")?;
        }
        if self.dual_cross_attention {
            refuse("dual_cross_attention", true, "false")?;
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            refuse("class_embed_type", &self.class_embed_type, "null")?;
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() => {
                candle_core::bail!(
                    "unet config: `addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`"
                )
            }
            Some("text_time") => {}
            Some(other) => refuse("addition_embed_type", other, "text_time, null")?,
        }
        if self.resnet_time_scale_shift != "default" {
            refuse("resnet_time_scale_shift", &self.resnet_time_scale_shift, "default")?;
        }
        if self.resnet_skip_time_act {
            refuse("resnet_skip_time_act", true, "false")?;
        }
        if self.resnet_out_scale_factor != 1.0 {
            refuse("resnet_out_scale_factor", self.resnet_out_scale_factor, "1.0")?;
        }
        if self.mid_block_scale_factor != 1.0 {
            refuse("mid_block_scale_factor", self.mid_block_scale_factor, "1")?;
        }
        if self.time_embedding_type != "positional" {
            refuse("time_embedding_type", &self.time_embedding_type, "positional")?;
        }
        if self.time_embedding_act_fn.is_some() {
            refuse("time_embedding_act_fn", &self.time_embedding_act_fn, "null")?;
        }
        if self.timestep_post_act.is_some() {
            refuse("timestep_post_act", &self.timestep_post_act, "null")?;
        }
        if self.time_cond_proj_dim.is_some() {
            refuse("time_cond_proj_dim", self.time_cond_proj_dim, "null")?;
        }
        if self.encoder_hid_dim.is_some() {
            refuse("encoder_hid_dim", self.encoder_hid_dim, "null")?;
        }
        if self.cross_attention_norm.is_some() {
            refuse("cross_attention_norm", &self.cross_attention_norm, "null")?;
        }
        if self.mid_block_only_cross_attention == Some(true) {
            refuse("mid_block_only_cross_attention", true, "null, false")?;
        }
        if self.attention_type.as_deref().is_some_and(|t| t != "default") {
            refuse("attention_type", &self.attention_type, "default")?;
        }
        if self.conv_in_kernel % 2 != 1 || self.conv_out_kernel % 2 != 1 {
            candle_core::bail!("unet config: `conv_in_kernel` and `conv_out_kernel` must be odd")
        }
        if self.downsample_padding != 1 {
            refuse("downsample_padding", self.downsample_padding, "1")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_base_resolves() {
        let c = UNetConfig::sdxl_base();
        let b = c.blocks().unwrap();
        assert_eq!(b.iter().map(|b| b.heads).collect::<Vec<_>>(), vec![5, 10, 20]);
        assert_eq!(b.iter().map(|b| b.transformer_layers).collect::<Vec<_>>(), vec![1, 2, 10]);
        assert_eq!(c.time_embed_dim(), 1280);
        assert_eq!(c.text_time(), Some(256));
    }

    #[test]
    fn refuses_unknown_block_and_bad_lists() {
        let base = include_str!("../../configs/sdxl-base-1.0/unet/config.json");
        let bad = base.replace("\"UpBlock2D\"]", "\"AttnUpBlock2D\"]");
        let e = UNetConfig::from_json_str(&bad, "test").unwrap_err().to_string();
        assert!(e.contains("up_block_types"), "{e}");
        let bad = base.replace("[1, 2, 10]", "[1, 2]");
        let e = UNetConfig::from_json_str(&bad, "test").unwrap_err().to_string();
        assert!(e.contains("transformer_layers_per_block"), "{e}");
        let one = base.replace("[1, 2, 10]", "2");
        let c = UNetConfig::from_json_str(&one, "test").unwrap();
        assert_eq!(c.blocks().unwrap()[0].transformer_layers, 2);
    }
}
