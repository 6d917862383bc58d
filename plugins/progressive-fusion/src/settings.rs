//! The strategy's configuration (JSON), its defaults (the method's numbers) and its checks.

use graft_sdk::{bail, config, ConfigKey, ConfigSchema, Result};
use serde::Deserialize;

/// Every key is optional; a misspelt key is an error (`deny_unknown_fields`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Length of stage 1 in optimizer steps: stage 1 is steps `[0, stage1_steps)`.
    pub stage1_steps: u64,
    /// Length of stage 2: steps `[stage1_steps, stage1_steps + stage2_steps)`. Stage 3 runs
    /// from there to the end of training.
    pub stage2_steps: u64,

    /// Stage 1 layers (patterns as in `LayerMatcher`): the UNet mid block's `proj_out`.
    pub stage1_targets: Vec<String>,
    pub stage1_rank: usize,
    pub stage1_alpha: f64,
    pub stage1_lr: f64,

    /// How many of the last layers of each text encoder get adapters in stage 2.
    pub stage2_text_layers: u32,
    /// The text encoders whose final layer does not count as one of "the last layers" because
    /// the pipeline never uses its output: SDXL conditions on CLIP-L's penultimate hidden state
    /// (and on bigG's pooled output, which does go through bigG's final layer). An adapter on
    /// CLIP-L's final layer would receive no gradient. `[]`: the literal last layers.
    pub stage2_skip_final_layer_of: Vec<String>,
    /// Module paths inside a text-encoder layer that get adapters (the name ends with
    /// `.<module>`).
    pub stage2_modules: Vec<String>,
    pub stage2_rank: usize,
    pub stage2_alpha: f64,
    pub stage2_lr: f64,
    /// Whether the stage-1 adapters keep training during stage 2 (else they are frozen).
    pub stage2_train_stage1: bool,

    /// Stage 3 layers: every UNet cross-attention projection.
    pub stage3_targets: Vec<String>,
    pub stage3_rank: usize,
    pub stage3_alpha: f64,
    /// The stage-3 group's planned learning rate, before `stage3_lr_scale`.
    pub stage3_lr: f64,
    /// The `lr_scale` directive sent at the start of stage 3 (effective lr = stage3_lr * scale).
    pub stage3_lr_scale: f64,

    /// AdamW weight decay of the three groups.
    pub weight_decay: f64,
}

impl Default for Config {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Self {
            stage1_steps: 500,
            stage2_steps: 500,
            stage1_targets: strings(&["unet.mid_block.*proj_out"]),
            stage1_rank: 4,
            stage1_alpha: 16.0,
            stage1_lr: 1e-4,
            stage2_text_layers: 2,
            stage2_skip_final_layer_of: strings(&["text_encoder"]),
            stage2_modules: strings(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]),
            stage2_rank: 12,
            stage2_alpha: 24.0,
            stage2_lr: 5e-5,
            stage2_train_stage1: true,
            stage3_targets: strings(&["unet.*.attn2.to_q", "unet.*.attn2.to_k", "unet.*.attn2.to_v", "unet.*.attn2.to_out.0"]),
            stage3_rank: 8,
            stage3_alpha: 16.0,
            stage3_lr: 1e-4,
            stage3_lr_scale: 0.3,
            weight_decay: 0.0,
        }
    }
}

/// Every key of `Config` with its default, for the host (`graft plugins check`, the serve UI's
/// form).
pub fn schema() -> ConfigSchema {
    let d = Config::default();
    let steps = |k: &str, v: u64, help: &str| ConfigKey::int(k, v as i64).min(0.0).help(help);
    let rank = |k: &str, v: usize| ConfigKey::int(k, v as i64).range(1.0, 4096.0).help("rank of this stage's adapters");
    let alpha = |k: &str, v: f64| ConfigKey::float(k, v).above(0.0).help("scale = alpha / rank of this stage's adapters");
    let lr = |k: &str, v: f64| ConfigKey::float(k, v).min(0.0).help("learning rate of this stage's optimizer group");
    ConfigSchema::new()
        .key(steps("stage1_steps", d.stage1_steps, "length of stage 1 in optimizer steps"))
        .key(steps("stage2_steps", d.stage2_steps, "length of stage 2; stage 3 runs from there to the end"))
        .key(ConfigKey::strings("stage1_targets", &d.stage1_targets).help("stage 1 layer patterns (the UNet mid block's proj_out)"))
        .key(rank("stage1_rank", d.stage1_rank))
        .key(alpha("stage1_alpha", d.stage1_alpha))
        .key(lr("stage1_lr", d.stage1_lr))
        .key(
            ConfigKey::int("stage2_text_layers", d.stage2_text_layers as i64)
                .min(0.0)
                .help("how many of the last layers of each text encoder get adapters in stage 2"),
        )
        .key(
            ConfigKey::strings("stage2_skip_final_layer_of", &d.stage2_skip_final_layer_of)
                .help("text encoders (text_encoder, text_encoder_2) whose final layer is not counted (unused by the pipeline)"),
        )
        .key(ConfigKey::strings("stage2_modules", &d.stage2_modules).help("modules inside a text-encoder layer that get adapters"))
        .key(rank("stage2_rank", d.stage2_rank))
        .key(alpha("stage2_alpha", d.stage2_alpha))
        .key(lr("stage2_lr", d.stage2_lr))
        .key(ConfigKey::bool("stage2_train_stage1", d.stage2_train_stage1).help("the stage-1 adapters keep training in stage 2 (else frozen)"))
        .key(ConfigKey::strings("stage3_targets", &d.stage3_targets).help("stage 3 layer patterns (every UNet cross-attention projection)"))
        .key(rank("stage3_rank", d.stage3_rank))
        .key(alpha("stage3_alpha", d.stage3_alpha))
        .key(ConfigKey::float("stage3_lr", d.stage3_lr).min(0.0).help("the stage-3 group's planned learning rate, before stage3_lr_scale"))
        .key(
            ConfigKey::float("stage3_lr_scale", d.stage3_lr_scale)
                .above(0.0)
                .help("lr_scale sent at the start of stage 3 (effective lr = stage3_lr * scale)"),
        )
        .key(ConfigKey::float("weight_decay", d.weight_decay).min(0.0).help("AdamW weight decay of the three groups"))
}

/// The example the manifest shows (the defaults, spelled out).
pub const EXAMPLE: &str = r#"{"stage1_steps": 500, "stage2_steps": 500, "stage1_targets": ["unet.mid_block.*proj_out"], "stage1_rank": 4, "stage1_alpha": 16, "stage1_lr": 0.0001, "stage2_text_layers": 2, "stage2_skip_final_layer_of": ["text_encoder"], "stage2_modules": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"], "stage2_rank": 12, "stage2_alpha": 24, "stage2_lr": 0.00005, "stage2_train_stage1": true, "stage3_targets": ["unet.*.attn2.to_q", "unet.*.attn2.to_k", "unet.*.attn2.to_v", "unet.*.attn2.to_out.0"], "stage3_rank": 8, "stage3_alpha": 16, "stage3_lr": 0.0001, "stage3_lr_scale": 0.3, "weight_decay": 0.0}"#;

impl Config {
    /// Parses and checks a configuration; the error names the key and what to give instead.
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = config::parse(crate::ID, json)?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        let id = crate::ID;
        for (key, rank) in [("stage1_rank", self.stage1_rank), ("stage2_rank", self.stage2_rank), ("stage3_rank", self.stage3_rank)] {
            if rank == 0 {
                bail!("{id}: `{key}` must be at least 1");
            }
        }
        for (key, alpha) in [("stage1_alpha", self.stage1_alpha), ("stage2_alpha", self.stage2_alpha), ("stage3_alpha", self.stage3_alpha)] {
            if !(alpha.is_finite() && alpha > 0.0) {
                bail!("{id}: `{key}` must be a finite number > 0, got {alpha}");
            }
        }
        for (key, lr) in
            [("stage1_lr", self.stage1_lr), ("stage2_lr", self.stage2_lr), ("stage3_lr", self.stage3_lr), ("weight_decay", self.weight_decay)]
        {
            if !(lr.is_finite() && lr >= 0.0) {
                bail!("{id}: `{key}` must be a finite number >= 0, got {lr}");
            }
        }
        if !(self.stage3_lr_scale.is_finite() && self.stage3_lr_scale > 0.0) {
            bail!("{id}: `stage3_lr_scale` must be a finite number > 0, got {}", self.stage3_lr_scale);
        }
        if self.stage1_targets.is_empty() {
            bail!("{id}: `stage1_targets` is empty: give at least one layer pattern");
        }
        if self.stage3_targets.is_empty() {
            bail!("{id}: `stage3_targets` is empty: give at least one layer pattern");
        }
        if self.stage2_text_layers > 0 && self.stage2_modules.is_empty() {
            bail!("{id}: `stage2_modules` is empty: name the text-encoder modules (e.g. \"self_attn.q_proj\") or set `stage2_text_layers` to 0");
        }
        for c in &self.stage2_skip_final_layer_of {
            if c != "text_encoder" && c != "text_encoder_2" {
                bail!("{id}: `stage2_skip_final_layer_of` lists `{c}`: expected `text_encoder` or `text_encoder_2`");
            }
        }
        if self.stage1_steps.checked_add(self.stage2_steps).is_none() {
            bail!("{id}: `stage1_steps` + `stage2_steps` overflows");
        }
        Ok(())
    }
}
