//! `graft layers`: the hook points of a model, from its configs alone.

use std::path::PathBuf;

use anyhow::Context;
use globset::Glob;
use graft_sdxl::model::layers_of;
use graft_sdxl::{LayerKind, SdxlConfig};

#[derive(clap::Args, Debug)]
pub struct LayersArgs {
    /// A diffusers SDXL folder (its configs are read) or a single-file checkpoint (the built-in SDXL
    /// base 1.0 architecture, or --model-config). Without it: the built-in SDXL base 1.0.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A diffusers folder whose config.json files give the architecture.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Only layers whose name matches this glob, e.g. `unet.*attn2.to_[qkv]`.
    #[arg(long)]
    pub filter: Option<String>,
    /// Print JSON (one LayerInfo per line) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn config_for(model: Option<&PathBuf>, model_config: Option<&PathBuf>) -> anyhow::Result<SdxlConfig> {
    Ok(match (model_config, model) {
        (Some(dir), _) => SdxlConfig::from_diffusers_folder(dir)?,
        (None, Some(m)) if m.is_dir() => SdxlConfig::from_diffusers_folder(m)?,
        (None, Some(m)) if !m.exists() => anyhow::bail!("{}: no such file or folder", m.display()),
        _ => SdxlConfig::sdxl_base(),
    })
}

pub fn run(args: LayersArgs) -> anyhow::Result<()> {
    let config = config_for(args.model.as_ref(), args.model_config.as_ref())?;
    let matcher = match &args.filter {
        Some(f) => Some(Glob::new(f).with_context(|| format!("invalid --filter glob `{f}`"))?.compile_matcher()),
        None => None,
    };
    let layers: Vec<_> = layers_of(&config)?.into_iter().filter(|l| matcher.as_ref().is_none_or(|m| m.is_match(&l.name))).collect();
    for l in &layers {
        if args.json {
            println!("{}", serde_json::to_string(l)?);
        } else {
            let kind = match (l.kind, l.conv) {
                (LayerKind::Linear, _) => "linear".to_string(),
                (LayerKind::Attention, _) => "attention".to_string(),
                (LayerKind::Conv, Some(c)) => format!("conv{}x{}", c.kernel.0, c.kernel.1),
                (LayerKind::Conv, None) => "conv".to_string(),
            };
            println!("{:<9} {:>5} -> {:<5} {}", kind, l.in_features, l.out_features, l.name);
        }
    }
    let count = |c: graft_sdxl::Component, k: LayerKind| layers.iter().filter(|l| l.component == c && l.kind == k).count();
    use graft_sdxl::Component::*;
    eprintln!(
        "{} hook points: UNet {} linears + {} convs + {} attention modules; text encoders {} + {} linears, {} + {} attention modules",
        layers.len(),
        count(Unet, LayerKind::Linear),
        count(Unet, LayerKind::Conv),
        count(Unet, LayerKind::Attention),
        count(TextEncoder, LayerKind::Linear),
        count(TextEncoder2, LayerKind::Linear),
        count(TextEncoder, LayerKind::Attention),
        count(TextEncoder2, LayerKind::Attention),
    );
    Ok(())
}
