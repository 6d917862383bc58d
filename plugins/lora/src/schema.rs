//! The configuration's keys for the host (`graft plugins check`, the serve UI's form, the
//! host's check before training): one entry per field of `Config`, with its default.

use graft_sdk::{ConfigKey, ConfigSchema};

use crate::{CONV_TARGETS, UNET_TARGETS};

pub fn schema() -> ConfigSchema {
    ConfigSchema::new()
        .key(ConfigKey::strings("targets", &UNET_TARGETS).help("layer patterns (globs, `re:` regexes, `!` excludes); linear hook points only"))
        .key(ConfigKey::bool("train_text_encoder", false).help("also the self-attention projections of both text encoders"))
        .key(ConfigKey::int("rank", 8).range(1.0, 4096.0).help("r: the rank of up · down"))
        .key(ConfigKey::float("alpha", 32.0).min(0.0).help("scale = alpha / r; 0 means alpha = r"))
        .key(ConfigKey::bool("use_rslora", false).help("rsLoRA: scale = alpha / sqrt(r)"))
        .key(ConfigKey::float("multiplier", 1.0).help("m while training (the <lora:name:w> weight applies on top at generation)"))
        .key(ConfigKey::float("dropout", 0.0).min(0.0).below(1.0).help("dropout on down(x) (kohya neuron_dropout)"))
        .key(ConfigKey::float("rank_dropout", 0.0).min(0.0).below(1.0).help("drops rank channels per sample, scaling by 1/(1-p) (kohya)"))
        .key(ConfigKey::float("module_dropout", 0.0).min(0.0).below(1.0).help("skips a layer's adapter for a call with probability p (kohya)"))
        .key(
            ConfigKey::choice("init", &["kaiming_uniform", "gaussian", "kaiming"], "kaiming_uniform")
                .help("how `down` starts: kaiming_uniform (a = sqrt 5, kohya) or gaussian (N(0, 1/r), PEFT); kaiming = kaiming_uniform"),
        )
        .key(ConfigKey::float("unet_lr", 1e-4).min(0.0).help("learning rate of optimizer group `unet`"))
        .key(ConfigKey::float("text_encoder_lr", 5e-5).min(0.0).help("learning rate of optimizer group `text_encoder`"))
        .key(ConfigKey::float("weight_decay", 0.01).min(0.0).help("AdamW weight decay of both groups"))
        .key(ConfigKey::float_or_null("clip_norm", None).above(0.0).help("per-parameter gradient clip (L2 norm); null: none"))
        .key(ConfigKey::int("conv_rank", 0).range(0.0, 4096.0).help("rank of the conv adapters (LoCon, kohya's conv_dim); 0: none"))
        .key(ConfigKey::float("conv_alpha", 1.0).min(0.0).help("conv scale = conv_alpha / conv_rank; 0 means alpha = rank"))
        .key(ConfigKey::bool("use_tucker", false).help("LyCORIS Tucker: a k x k core between 1 x 1 down and up convs"))
        .key(ConfigKey::strings("conv_targets", &CONV_TARGETS).help("conv hook points adapted when conv_rank > 0 (patterns as targets)"))
}
