//! Adapters: the cost of a LoRA at inference (unfused and fused, against the base forward in
//! the same process), reading + attaching a LoRA file, and a strategy hot swap.

use std::path::PathBuf;

use candle_core::Device;
use graft_sdxl::clip::ClipTextModel;
use graft_sdxl::hooks::NoHooks;
use graft_sdxl::tokenizer::{ClipTokenizer, PadToken};
use graft_sdxl::unet::UNet;
use graft_sdxl::vae::Vae;
use graft_sdxl::varbuilder::shape_only;
use graft_sdxl::{Component, PipelineHooks, SdxlConfig, SdxlModel};

use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::FileAdapters;
use graft_runtime::plugins::{load_plugin, StrategyInstance};

use super::measure::{measure, measure_against, Measured, Timing};
use super::real::{empty_report, lora_file};
use super::tiny::{load, UnetInputs};
use super::Ctx;

/// The tiny model with a LoRA (rank 8, alpha 32) on every attention's q/k/v/out attached as a file.
fn with_lora(ctx: &Ctx) -> anyhow::Result<(SdxlModel, FileAdapters)> {
    let model = load(ctx)?;
    let mut files = FileAdapters::new(&model)?;
    let file = lora_file(model.unet.registry(), 3)?;
    files.add("bench", std::path::Path::new("bench"), file, empty_report(graft_formats::AdapterFormat::Peft), 1.0, 1.0)?;
    Ok((model, files))
}

pub fn tiny_unfused(ctx: &Ctx) -> anyhow::Result<Measured> {
    let (model, files) = with_lora(ctx)?;
    let inputs = UnetInputs::new(&model)?;
    let hooks = files.hooks(PipelineHooks::none());
    let m = measure_against(
        3,
        ctx.runs(20),
        || {
            inputs.forward(&model, &NoHooks)?;
            Ok(())
        },
        || {
            inputs.forward(&model, &hooks.unet)?;
            Ok(())
        },
    )?;
    Ok(m.with("lora_layers", files.adapters()[0].file.modules.len()))
}

pub fn tiny_fused(ctx: &Ctx) -> anyhow::Result<Measured> {
    let base = load(ctx)?;
    let (model, mut files) = with_lora(ctx)?;
    files.fuse()?;
    let inputs = UnetInputs::new(&model)?;
    let hooks = files.hooks(PipelineHooks::none());
    measure_against(
        3,
        ctx.runs(20),
        || {
            inputs.forward(&base, &NoHooks)?;
            Ok(())
        },
        || {
            inputs.forward(&model, &hooks.unet)?;
            Ok(())
        },
    )
}

/// The PEFT file of the LoRA fixtures (UNet and both text encoders, 228 layers).
fn peft_fixture(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let p = ctx.fixture.join("../lora/peft_diffusers.safetensors");
    anyhow::ensure!(p.is_file(), "{}: missing (the LoRA fixtures of tests/fixtures/lora)", p.display());
    Ok(p)
}

pub fn load_attach(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = load(ctx)?;
    let path = peft_fixture(ctx)?;
    let m = measure(3, ctx.runs(20), || {
        let mut files = FileAdapters::new(&model)?;
        files.load(&path, "peft", 1.0, 1.0)?;
        Ok(())
    })?;
    let mut files = FileAdapters::new(&model)?;
    files.load(&path, "peft", 1.0, 1.0)?;
    Ok(m.with("layers", files.adapters()[0].file.modules.len()))
}

/// SDXL base 1.0 with shape-only weights (no memory): its 722 + 264 linear hook points.
fn shape_only_sdxl() -> anyhow::Result<SdxlModel> {
    let config = SdxlConfig::sdxl_base();
    let dev = Device::Cpu;
    Ok(SdxlModel {
        unet: UNet::new(shape_only(&dev).0, &config.unet)?,
        text_encoder: ClipTextModel::new(shape_only(&dev).0, &config.text_encoder, Component::TextEncoder, false)?,
        text_encoder_2: ClipTextModel::new(shape_only(&dev).0, &config.text_encoder_2, Component::TextEncoder2, true)?,
        vae: graft_sdxl::model::VaeSlot::new(Vae::new(shape_only(&dev).0, &config.vae)?, None),
        tokenizer: ClipTokenizer::builtin(PadToken::EndOfText),
        tokenizer_2: ClipTokenizer::builtin(PadToken::Exclamation),
        device: dev,
        source: PathBuf::from("sdxl-base-1.0 (shape only)"),
        text_encoder_files: None,
        config,
    })
}

/// What `--watch` does when a plugin is rebuilt: load + check the new library (private copy,
/// layout check, manifest), then switch the running strategy to it (re-plan over every hook
/// point, keep the parameters that still match). The `lora` plugin with its defaults (rank 8 on
/// q/k/v/out of all 140 attention modules of SDXL's UNet).
pub fn hot_swap(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = shape_only_sdxl()?;
    let manager = ctx.plugin_dirs.manager()?;
    let plugin = manager.require("lora")?;
    let source = plugin.source.clone();
    let mut set = AdapterSet::new(&model, 1);
    let (s, _) = set.add(StrategyInstance::new(plugin, None, "{}")?, 1.0, 1.0)?;
    let private = ctx.scratch.join("private");
    // Loaded libraries are never unloaded (abi_stable keeps pointers into them): keep them.
    let mut kept = Vec::new();
    let mut generation = 1000;
    let mut replan = Vec::new();
    let m = measure(3, ctx.runs(20), || {
        generation += 1;
        let p = load_plugin(&source, &private, generation).map_err(|e| anyhow::anyhow!("{}: {e:?}", source.display()))?;
        let t = std::time::Instant::now();
        let diff = set.reload(s, &p)?;
        replan.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(diff.created.is_empty(), "a swap to the same build created parameters");
        kept.push(p);
        Ok(())
    })?;
    let attached = set.strategies()[0].plan.attachments.len();
    Ok(m.with("replan_ms", Timing::of(replan).median_ms).with("hook_points", set.layers().len()).with("attached", attached))
}
