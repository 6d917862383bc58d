//! Adapter file tools: `graft inspect`, `graft convert`, `graft merge`.
//!
//! - [`inspect`]: what a file is (format, strategy, layers, ranks, alphas, metadata, base model).
//! - [`convert`]: kohya (SGM or diffusers UNet names) <-> PEFT <-> LyCORIS <-> graft-native,
//!   where the math allows; `--rank` approximates other kinds by a LoRA.
//! - [`merge`]: adapters into a checkpoint (single file or diffusers folder, streamed tensor by
//!   tensor, see [`checkpoint`]), or several adapters into one (exactly by concatenating ranks, or
//!   by SVD to a chosen rank, see [`svd`]).
//!
//! Files are read against the layers of an architecture: the built-in SDXL base 1.0 unless
//! `--model-config DIR` (a diffusers folder's configs) says otherwise. No weights are loaded for
//! that: the hook points come from a shape-only build. graft-native files are turned into
//! kohya-family entries by their strategy plugin's own `export` (on a shape-only model: a
//! strategy whose export needs the base weights cannot be converted this way).

pub mod checkpoint;
pub mod convert;
pub mod inspect;
pub mod merge;
pub mod svd;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use graft_formats::adapter::AdapterWeights;
use graft_formats::{AdapterFile, KeyMap, ModuleWeights, StoreDtype};
use graft_sdxl::clip::ClipTextModel;
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::tokenizer::{ClipTokenizer, PadToken};
use graft_sdxl::unet::UNet;
use graft_sdxl::vae::Vae;
use graft_sdxl::varbuilder::shape_only;
use graft_sdxl::{Component, SdxlConfig, SdxlModel};

use crate::plugins::PluginDirArgs;
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::add_native;

/// Which architecture adapter files are read against.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ArchArgs {
    /// A diffusers folder whose config.json files give the model architecture (default: the
    /// built-in SDXL base 1.0).
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
}

impl ArchArgs {
    pub fn config(&self) -> anyhow::Result<SdxlConfig> {
        Ok(match &self.model_config {
            Some(dir) => SdxlConfig::from_diffusers_folder(dir)?,
            None => SdxlConfig::sdxl_base(),
        })
    }
}

/// The layer names of an architecture in every format, and its SGM layout.
pub fn key_map(config: &SdxlConfig) -> anyhow::Result<(KeyMap, SgmLayout)> {
    let layout = SgmLayout::from_configs(&config.unet, &config.vae, &config.text_encoder_2)?;
    let layers = graft_sdxl::model::layers_of(config)?;
    Ok((KeyMap::from_layers(&layers, &layout), layout))
}

/// A model of the architecture whose weights take no memory (every tensor a zero view): enough
/// for a strategy's plan and export, which do not read base weights.
pub fn shape_model(config: &SdxlConfig) -> anyhow::Result<SdxlModel> {
    let dev = Device::Cpu;
    Ok(SdxlModel {
        config: config.clone(),
        unet: UNet::new(shape_only(&dev).0, &config.unet)?,
        text_encoder: ClipTextModel::new(shape_only(&dev).0, &config.text_encoder, Component::TextEncoder, false)?,
        text_encoder_2: ClipTextModel::new(shape_only(&dev).0, &config.text_encoder_2, Component::TextEncoder2, true)?,
        vae: graft_sdxl::model::VaeSlot::new(Vae::new(shape_only(&dev).0, &config.vae)?, None),
        tokenizer: ClipTokenizer::builtin(PadToken::EndOfText),
        tokenizer_2: ClipTokenizer::builtin(PadToken::Exclamation),
        device: dev,
        source: PathBuf::new(),
        text_encoder_files: None,
    })
}

/// The entries of a graft-native file as its strategy exports them (`lora` or `diff` families).
/// A strategy whose export is graft-native only (a gated attention patch) is an error: its
/// adapter is not a weight difference.
pub fn native_to_modules(path: &Path, file: &AdapterFile, config: &SdxlConfig, plugins: &PluginDirArgs) -> anyhow::Result<Vec<ModuleWeights>> {
    let info = graft_formats::NativeInfo::from_metadata(&file.metadata, path)?.context("not a graft-native file")?;
    let manager = plugins.manager()?;
    let plugin = manager
        .require(&info.strategy)
        .with_context(|| format!("{}: reading this graft-native file needs strategy plugin `{}`", path.display(), info.strategy))?;
    let model = shape_model(config)?;
    let mut set = AdapterSet::new(&model, 0);
    let report = add_native(&mut set, plugin, &info.strategy, path, file, 1.0, 1.0)?;
    for w in &report.warnings {
        tracing::warn!("{}: {w}", path.display());
    }
    let exported = set.export(report.strategy).with_context(|| format!("{}: export by strategy `{}`", path.display(), info.strategy))?;
    let mut out = Vec::new();
    for (layer, e) in exported {
        let mut tensors: std::collections::BTreeMap<String, candle_core::Tensor> = e.tensors.into_iter().collect();
        let module = match e.family.as_str() {
            "lora" => {
                let (Some(down), Some(up)) = (tensors.remove("down"), tensors.remove("up")) else {
                    bail!("{layer}: the `lora` export lacks `down` / `up`");
                };
                let mut m = ModuleWeights::lora(layer.clone(), down, up, e.alpha.map(|a| a as f32));
                m.dora_scale = tensors.remove("dora_scale");
                m
            }
            "diff" => {
                let Some(diff) = tensors.remove("diff") else { bail!("{layer}: the `diff` export lacks `diff`") };
                ModuleWeights::full(layer.clone(), diff, tensors.remove("diff_b"))
            }
            other => bail!(
                "{}: strategy `{}` exports `{other}` tensors at `{layer}`: its adapter is not a LoRA or a weight \
                 difference, so it has no kohya / PEFT / LyCORIS form and cannot be merged into weights \
                 (apply it with `graft generate --adapter`)",
                path.display(),
                info.strategy
            ),
        };
        if let Some(k) = tensors.keys().next() {
            bail!("{layer}: the export has tensor `{k}`, which the `{}` family has no place for", e.family);
        }
        out.push(module);
    }
    if out.is_empty() {
        bail!("{}: strategy `{}` exported nothing", path.display(), info.strategy);
    }
    Ok(out)
}

/// Reads any adapter file against `keys`; graft-native files through their plugin. Keys that
/// match no layer are an error unless `allow_unmatched` (then a warning): a converted or merged
/// file must not silently lose part of an adapter.
pub fn read_entries(
    path: &Path,
    keys: &KeyMap,
    config: &SdxlConfig,
    plugins: &PluginDirArgs,
    allow_unmatched: bool,
) -> anyhow::Result<(AdapterFile, graft_formats::LoadReport, Vec<ModuleWeights>)> {
    let (file, report) = graft_formats::read_adapter(path, keys)?;
    if !report.unmatched_keys.is_empty() {
        let list = report.unmatched_keys.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ");
        if !allow_unmatched {
            bail!(
                "{}: {} keys match no layer of the model and would be lost:\n  {list}\n(use --model-config for another \
                 architecture, or --drop-unmatched to go on without them)",
                path.display(),
                report.unmatched_keys.len()
            );
        }
        tracing::warn!("{}: dropping {} keys that match no layer:\n  {list}", path.display(), report.unmatched_keys.len());
    }
    for w in &report.warnings {
        tracing::warn!("{}: {w}", path.display());
    }
    let modules = match file.format {
        graft_formats::AdapterFormat::Native => native_to_modules(path, &file, config, plugins)?,
        _ => file.modules.clone(),
    };
    Ok((file, report, modules))
}

/// `--dtype` values.
pub fn parse_dtype(s: &str) -> anyhow::Result<StoreDtype> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => StoreDtype::F32,
        "f16" | "fp16" | "float16" | "half" => StoreDtype::F16,
        "bf16" | "bfloat16" => StoreDtype::BF16,
        other => bail!("--dtype {other}: use f32, f16 or bf16"),
    })
}

/// The dtype most tensors of a safetensors file are stored in (F32 when unknown).
pub fn stored_dtype(path: &Path) -> StoreDtype {
    let Ok(header) = crate::generate::lora_dir::read_header(path) else { return StoreDtype::F32 };
    let count = |d: &str| header.tensors.values().filter(|t| t.dtype == d).count();
    let (f16, bf16, f32) = (count("F16"), count("BF16"), count("F32"));
    if f16 >= bf16 && f16 > f32 {
        StoreDtype::F16
    } else if bf16 > f32 {
        StoreDtype::BF16
    } else {
        StoreDtype::F32
    }
}

/// True for a plain LoRA entry of a linear layer (no DoRA, not a conv LoCon).
pub fn is_plain_lora(m: &ModuleWeights) -> bool {
    matches!(m.weights, AdapterWeights::Lora { .. }) && m.dora_scale.is_none() && !is_conv_entry(m)
}

/// True for a conv entry (LoCon, Tucker, or LoRA factors of a UNet convolution).
pub fn is_conv_entry(m: &ModuleWeights) -> bool {
    m.is_conv() || graft_formats::keys::is_unet_conv_name(&m.layer)
}

/// The name of a file without folder and extension (`.safetensors`, `.graft.safetensors`, `.peft.safetensors`).
pub fn file_stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for ext in [".graft.safetensors", ".peft.safetensors", ".safetensors"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s.to_string();
        }
    }
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or(name)
}
