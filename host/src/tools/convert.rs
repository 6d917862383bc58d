//! `graft convert`: one adapter file to another format.
//!
//! | to | holds | from |
//! |---|---|---|
//! | `kohya` | plain LoRA, SGM UNet names, `.alpha`, kohya metadata and hashes | any plain LoRA |
//! | `kohya-diffusers` | the same with diffusers UNet names (`lora_unet_down_blocks_1_...`) | any plain LoRA |
//! | `peft` | plain LoRA, `unet.` / `text_encoder.` keys, alpha in `lora_adapter_metadata` | any plain LoRA |
//! | `lycoris` | any linear entry (LoRA, LoHa, LoKr, full, DoRA) under kohya names | anything but graft-native-only strategies |
//! | `native` | graft-native file for the `lora` strategy plugin (one rank: smaller ones zero-padded) | any plain LoRA |
//!
//! graft-native sources are turned into entries by their strategy's `export`. LoHa, LoKr, full
//! differences and DoRA have no exact LoRA form: converting them to a LoRA format is an error
//! unless `--rank R` asks for the best rank-R approximation (SVD, see [`super::svd`]); `--rank`
//! on a LoRA resizes it. DoRA depends on the base weights and has no LoRA form at all. A full
//! difference with a bias difference has no LoRA form either.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Tensor;
use graft_formats::adapter::AdapterWeights;
use graft_formats::keys::{kohya_prefix, split_layer};
use graft_formats::metadata::kohya_hashes;
use graft_formats::write::{encode_body, encode_file, write_atomic};
use graft_formats::{KohyaMetadata, ModuleWeights, NativeInfo, StoreDtype};

use super::svd::{truncate_dense, truncate_factored};
use super::{file_stem, is_plain_lora, parse_dtype, read_entries, stored_dtype, ArchArgs};
use crate::plugins::PluginDirArgs;

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// kohya sd-scripts LoRA with SGM UNet module names (what kohya writes for SDXL).
    Kohya,
    /// kohya LoRA with diffusers UNet module names.
    KohyaDiffusers,
    /// PEFT / diffusers LoRA (`pipe.load_lora_weights`).
    Peft,
    /// LyCORIS (kohya names): LoRA, LoHa, LoKr, full diff, DoRA.
    Lycoris,
    /// graft-native file of the `lora` strategy plugin.
    Native,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The adapter file to convert (kohya, PEFT / diffusers, LyCORIS or graft-native).
    pub input: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    pub to: Target,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Approximate every entry by a LoRA of this rank (SVD): resizes a LoRA, and makes LoHa, LoKr
    /// and full differences writable as a LoRA.
    #[arg(long)]
    pub rank: Option<usize>,
    /// f32, f16 or bf16 (default: the dtype of the input file).
    #[arg(long)]
    pub dtype: Option<String>,
    /// `ss_output_name` of kohya files (default: the output file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Go on when keys of the input match no layer (they are left out, with a warning).
    #[arg(long)]
    pub drop_unmatched: bool,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let line = convert(&args)?;
    println!("{line}");
    Ok(())
}

/// Converts; returns a one-line summary.
pub fn convert(args: &ConvertArgs) -> anyhow::Result<String> {
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let config = args.arch.config()?;
    let (keys, layout) = super::key_map(&config)?;
    let (file, report, modules) = read_entries(&args.input, &keys, &config, &args.plugins, args.drop_unmatched)?;
    if report.format == graft_formats::AdapterFormat::Native && args.to == Target::Native {
        bail!("{}: already a graft-native file", args.input.display());
    }
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => stored_dtype(&args.input),
    };
    let name = args.name.clone().unwrap_or_else(|| file_stem(&args.out));
    let (modules, note) = match (args.to, args.rank) {
        (Target::Lycoris, None) => (modules, String::new()),
        (_, rank) => to_lora(modules, rank, &args.input)?,
    };
    let meta = carried_metadata(&file.metadata, &name);
    let written = match args.to {
        Target::Kohya => graft_formats::write_kohya(&args.out, &modules, &layout, &meta, dtype)?.tensors,
        Target::KohyaDiffusers => write_kohya_diffusers(&args.out, &modules, &meta, dtype)?,
        Target::Peft => graft_formats::write_peft(&args.out, &modules, dtype)?.tensors,
        Target::Lycoris => graft_formats::write_lycoris(&args.out, &modules, &layout, &meta, dtype)?.tensors,
        Target::Native => write_lora_native(&args.out, &modules, &args.plugins, dtype)?,
    };
    Ok(format!(
        "{} ({}, {} layers) -> {} ({:?}, {written} tensors, {dtype:?}){note}",
        args.input.display(),
        report.format,
        modules.len(),
        args.out.display(),
        args.to
    ))
}

/// Every entry as a plain LoRA: exact for LoRA entries (resized when `rank` is given), by SVD to
/// `rank` for the others, an error where the math does not allow it.
pub fn to_lora(modules: Vec<ModuleWeights>, rank: Option<usize>, path: &Path) -> anyhow::Result<(Vec<ModuleWeights>, String)> {
    let mut out = Vec::with_capacity(modules.len());
    let mut errors = Vec::new();
    for (i, m) in modules.into_iter().enumerate() {
        if m.dora_scale.is_some() {
            bail!(
                "{}: `{}` is a DoRA entry: its weight difference depends on the base weights, so it has no LoRA form \
                 (convert --to lycoris, or merge it into a checkpoint with `graft merge --model`)",
                path.display(),
                m.layer
            );
        }
        if super::is_conv_entry(&m) {
            if rank.is_none() && matches!(m.weights, AdapterWeights::Lora { mid: None, .. }) {
                out.push(m);
                continue;
            }
            bail!(
                "{}: `{}` is a conv (LoCon{}) entry: it has no PEFT / native form here and is not resized by SVD                  (convert --to kohya or --to lycoris without --rank)",
                path.display(),
                m.layer,
                if matches!(m.weights, AdapterWeights::Lora { mid: Some(_), .. }) { ", Tucker" } else { "" }
            );
        }
        if let AdapterWeights::Full { diff_b: Some(_), .. } = &m.weights {
            bail!("{}: `{}` has a bias difference (`diff_b`), which a LoRA cannot hold (convert --to lycoris)", path.display(), m.layer);
        }
        let Some(r) = rank else {
            if is_plain_lora(&m) {
                out.push(m);
                continue;
            }
            bail!(
                "{}: `{}` is a {} entry, not a LoRA: no exact LoRA form exists; write --to lycoris, or approximate it \
                 with --rank R",
                path.display(),
                m.layer,
                m.kind()
            );
        };
        let low = match &m.weights {
            AdapterWeights::Lora { down, up, .. } => truncate_factored(&(up * m.scale())?, down, r)?,
            _ => truncate_dense(&m.delta_weight(1.0)?, r, 0x5eed + i as u64)?,
        };
        errors.push(low.rel_error);
        let rank = low.down.dims()[0];
        out.push(ModuleWeights::lora(m.layer, low.down, low.up, Some(rank as f32)));
    }
    let note = if errors.is_empty() {
        String::new()
    } else {
        let max = errors.iter().cloned().fold(0.0, f64::max);
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        format!("; rank {} by SVD: relative error of the weight differences mean {mean:.2e}, max {max:.2e}", rank.unwrap_or(0))
    };
    Ok((out, note))
}

/// The source's training metadata (`ss_*`, `modelspec.*`) carried into a kohya-family file,
/// without what the writer computes.
pub fn carried_metadata(source: &BTreeMap<String, String>, name: &str) -> KohyaMetadata {
    const COMPUTED: [&str; 7] = [
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_module",
        "ss_network_args",
        "ss_output_name",
        "modelspec.title",
        "modelspec.architecture",
    ];
    let mut meta = KohyaMetadata::new(name);
    for (k, v) in source {
        if (k.starts_with("ss_") || k.starts_with("modelspec.")) && !COMPUTED.contains(&k.as_str()) {
            meta.extra.insert(k.clone(), v.clone());
        }
    }
    meta
}

/// A kohya LoRA file with the diffusers UNet module names (`lora_unet_down_blocks_1_attentions_0_...`),
/// as some tools write them: `.lora_down.weight`, `.lora_up.weight`, `.alpha`, kohya metadata and hashes.
pub fn write_kohya_diffusers(path: &Path, modules: &[ModuleWeights], meta: &KohyaMetadata, dtype: StoreDtype) -> anyhow::Result<usize> {
    if modules.is_empty() {
        bail!("{}: nothing to write", path.display());
    }
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut dims = Vec::new();
    for m in modules {
        let AdapterWeights::Lora { down, up, alpha, mid: None } = &m.weights else {
            bail!("{}: `{}` is a {} entry, not a LoRA", path.display(), m.layer, m.kind());
        };
        // Conv factors are kernels ([r, in, kh, kw] down, [out, r, 1, 1] up).
        let conv = super::is_conv_entry(m);
        let four = |t: &Tensor| match t.dims() {
            [a, b] if conv => t.reshape((*a, *b, 1, 1)),
            _ => Ok(t.clone()),
        };
        let (down, up) = (&four(down)?, &four(up)?);
        let (component, module) = split_layer(&m.layer).with_context(|| format!("`{}` is not a graft layer name", m.layer))?;
        let name = format!("{}{}", kohya_prefix(component), module.replace('.', "_"));
        let r = down.dims()[0];
        let a = match alpha {
            Some(a) if *a != 0.0 => *a,
            _ => r as f32,
        };
        tensors.insert(format!("{name}.lora_down.weight"), down.clone());
        tensors.insert(format!("{name}.lora_up.weight"), up.clone());
        tensors.insert(format!("{name}.alpha"), Tensor::new(a, &candle_core::Device::Cpu)?);
        dims.push((r, a));
    }
    let body = encode_body(&tensors, dtype)?;
    let mut metadata = meta.to_map(&dims);
    let (model_hash, legacy_hash) = kohya_hashes(&body, &metadata);
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    write_atomic(path, &encode_file(&body, &metadata))?;
    Ok(tensors.len())
}

/// A graft-native file for the `lora` strategy: one rank for every layer (the largest; smaller
/// ones are padded with zero rows of `down` and zero columns of `up`, which changes nothing), the
/// layer's alpha / r folded into `up` (config alpha = rank, scale 1), targets = the layers.
pub fn write_lora_native(path: &Path, modules: &[ModuleWeights], plugins: &PluginDirArgs, dtype: StoreDtype) -> anyhow::Result<usize> {
    let Some(rank) = modules.iter().filter_map(|m| m.rank()).max() else {
        bail!("{}: nothing to write", path.display());
    };
    let mut out = Vec::with_capacity(modules.len());
    for m in modules {
        let AdapterWeights::Lora { down, up, .. } = &m.weights else {
            bail!("{}: `{}` is not a LoRA entry", path.display(), m.layer);
        };
        if super::is_conv_entry(m) {
            bail!("{}: `{}` is a conv (LoCon) entry, which the native writer does not take", path.display(), m.layer);
        }
        let (r, inp) = down.dims2()?;
        let out_f = up.dims2()?.0;
        let up = (up.to_dtype(candle_core::DType::F32)? * m.scale())?;
        let (down, up) = if r < rank {
            let dev = down.device();
            (
                Tensor::cat(&[&down.to_dtype(candle_core::DType::F32)?, &Tensor::zeros((rank - r, inp), candle_core::DType::F32, dev)?], 0)?,
                Tensor::cat(&[&up, &Tensor::zeros((out_f, rank - r), candle_core::DType::F32, dev)?], 1)?,
            )
        } else {
            (down.clone(), up)
        };
        let mut t = BTreeMap::new();
        t.insert("down".to_string(), down);
        t.insert("up".to_string(), up);
        out.push(ModuleWeights { layer: m.layer.clone(), weights: AdapterWeights::Native { tensors: t }, dora_scale: None });
    }
    let targets: Vec<&str> = modules.iter().map(|m| m.layer.as_str()).collect();
    // The plugin's version when it can be found (the file is readable without it).
    let version = plugins.manager().ok().and_then(|m| m.get("lora").map(|p| p.manifest.version.clone())).unwrap_or_default();
    let info =
        NativeInfo { strategy: "lora".into(), version, config: serde_json::json!({"targets": targets, "rank": rank, "alpha": rank as f64}) };
    Ok(graft_formats::write_native(path, &info, &out, dtype)?.tensors)
}
