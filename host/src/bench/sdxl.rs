//! Whole SDXL at full size: the built-in base 1.0 architecture with random weights.
//!
//! The weights are written once as an fp16 diffusers folder (`target/bench/sdxl-random-fp16`,
//! 6.9 GB, reused when present), the layout of the published `stabilityai/stable-diffusion-xl-base-1.0`
//! `fp16` variant: `unet/diffusion_pytorch_model.fp16.safetensors`, `text_encoder/model.fp16.safetensors`,
//! ... with the built-in configs (`crates/graft-sdxl/configs/sdxl-base-1.0`), the SDXL scheduler
//! config and a `model_index.json`; no tokenizer folders (graft uses its built-in CLIP vocabulary).
//! The reference script reads the same folder.
//!
//! Each component's tensor names and shapes come from building it with shape-only weights, and
//! each file is streamed tensor by tensor, so writing it needs almost no memory. Values are
//! N(0, 0.02) (norm weights 1): windows at varying offsets into one pool of 16 M draws, converted
//! to fp16 once; their content does not change the timing.
//!
//! These workloads are slow (seconds to minutes a run) and need ~16 GB: `graft bench` runs them only
//! when named (`--workload real.train_step_1024_ckpt`, or a prefix such as `real.`), with no
//! warm-up for load and generate and one warm-up step for training.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use graft_sdxl::clip::ClipTextModel;
use graft_sdxl::rng::GraftRng;
use graft_sdxl::unet::UNet;
use graft_sdxl::vae::Vae;
use graft_sdxl::varbuilder::shape_only;
use graft_sdxl::{Component, GenerateParams, PipelineHooks, SdxlConfig, SdxlModel, WeightDtype};
use serde_json::{json, Map, Value};

use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

use super::measure::{measure_on, peak_mb, reset_peak, rss_mb, Measured, Timing};
use super::tiny::PROMPT;
use super::Ctx;

/// Where the random fp16 SDXL folder lives (under this workspace's `target/`).
pub fn model_dir() -> PathBuf {
    if let Ok(d) = std::env::var("GRAFT_BENCH_SDXL") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/sdxl-random-fp16")
}

const POOL: usize = 1 << 24;

const SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.42.1",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}
"#;

const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.42.1",
  "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": [null, null],
  "tokenizer_2": [null, null],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;

/// 16 M N(0, 0.02) draws as little-endian fp16 bytes.
fn random_pool() -> anyhow::Result<Vec<u8>> {
    let t = (GraftRng::new(2026).randn((POOL,), &Device::Cpu)? * 0.02)?.to_dtype(DType::F16)?;
    Ok(safetensors::View::data(&t).into_owned())
}

/// Streams one safetensors file of fp16 tensors: the header first (offsets in name order), then
/// each tensor's bytes from the pool (norm weights 1).
fn write_component(path: &Path, tensors: &BTreeMap<String, Vec<usize>>, pool: &[u8]) -> anyhow::Result<u64> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        header.insert(name.clone(), json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut text = serde_json::to_string(&Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let tmp = path.with_extension("partial");
    let mut w = BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    let one = half_one();
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n = shape.iter().product::<usize>();
        if name.contains("norm") && name.ends_with("weight") {
            for _ in 0..n {
                w.write_all(&one)?;
            }
            continue;
        }
        // A window starting at a different place for every tensor, wrapping around the pool.
        let mut start = (i.wrapping_mul(2_654_435_761) % POOL) * 2;
        let mut left = n * 2;
        while left > 0 {
            let take = left.min(pool.len() - start);
            w.write_all(&pool[start..start + take])?;
            left -= take;
            start = 0;
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(offset)
}

/// fp16 1.0, little-endian.
fn half_one() -> [u8; 2] {
    0x3C00u16.to_le_bytes()
}

/// The names and shapes a component asks for.
fn requests(build: impl Fn(candle_nn::VarBuilder<'static>) -> candle_core::Result<()>) -> anyhow::Result<BTreeMap<String, Vec<usize>>> {
    let (vb, req) = shape_only(&Device::Cpu);
    build(vb)?;
    let list = std::mem::take(&mut *req.lock().expect("requests lock"));
    Ok(list.into_iter().collect())
}

/// The random fp16 SDXL folder: written once, then reused.
pub fn ensure_model() -> anyhow::Result<PathBuf> {
    let dir = model_dir();
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let started = Instant::now();
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = SdxlConfig::sdxl_base();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/graft-sdxl/configs/sdxl-base-1.0");
    let pool = random_pool()?;
    type Shapes = BTreeMap<String, Vec<usize>>;
    let components: [(&str, &str, Shapes); 4] = [
        ("unet", "diffusion_pytorch_model", requests(|vb| UNet::new(vb, &cfg.unet).map(|_| ()))?),
        ("text_encoder", "model", requests(|vb| ClipTextModel::new(vb, &cfg.text_encoder, Component::TextEncoder, false).map(|_| ()))?),
        ("text_encoder_2", "model", requests(|vb| ClipTextModel::new(vb, &cfg.text_encoder_2, Component::TextEncoder2, true).map(|_| ()))?),
        ("vae", "diffusion_pytorch_model", requests(|vb| Vae::new(vb, &cfg.vae).map(|_| ()))?),
    ];
    let mut total = 0;
    for (sub, stem, tensors) in &components {
        let d = tmp.join(sub);
        std::fs::create_dir_all(&d)?;
        std::fs::copy(configs.join(sub).join("config.json"), d.join("config.json"))
            .with_context(|| format!("cannot copy the built-in {sub} config from {}", configs.display()))?;
        total += write_component(&d.join(format!("{stem}.fp16.safetensors")), tensors, &pool)?;
    }
    std::fs::create_dir_all(tmp.join("scheduler"))?;
    std::fs::write(tmp.join("scheduler/scheduler_config.json"), SCHEDULER)?;
    std::fs::write(tmp.join("model_index.json"), MODEL_INDEX)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    eprintln!("wrote a random fp16 SDXL ({:.2} GB) to {} in {:.1}s", total as f64 / 1e9, dir.display(), started.elapsed().as_secs_f64());
    Ok(dir)
}

/// One timed run of `f`, with the memory figures of [`measure`].
fn once<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Measured)> {
    let before = rss_mb();
    reset_peak();
    let t = Instant::now();
    let out = f()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let peak = peak_mb();
    Ok((out, Measured { timing: Timing::of(vec![ms]), peak_mb: peak, delta_mb: (peak - before).max(0.0), extra: Map::new() }))
}

/// Loads the 6.9 GB fp16 folder as stored (weights stay fp16).
pub fn load_fp16(ctx: &Ctx) -> anyhow::Result<Measured> {
    let dir = ensure_model()?;
    let (model, m) = once(|| Ok(SdxlModel::load_as(&dir, None, &ctx.device, WeightDtype::File)?))?;
    let dtype = format!("{:?}", model.weight_dtype());
    Ok(m.with("weights", dtype))
}

/// txt2img 1024x1024, one Euler step with CFG 5 (UNet batch 2), VAE decode; bf16 weights.
pub fn generate_1024_1step(ctx: &Ctx) -> anyhow::Result<Measured> {
    generate_1024(ctx, 1)
}

/// The same with 30 steps (the GPU workload).
pub fn generate_1024_30steps(ctx: &Ctx) -> anyhow::Result<Measured> {
    generate_1024(ctx, 30)
}

fn generate_1024(ctx: &Ctx, steps: usize) -> anyhow::Result<Measured> {
    let dir = ensure_model()?;
    let model = SdxlModel::load_as(&dir, None, &ctx.device, WeightDtype::Bf16)?;
    let params = GenerateParams { prompt: PROMPT.into(), width: 1024, height: 1024, steps, guidance: 5.0, ..Default::default() };
    // On a GPU one warm-up run (kernels load on first use), as the reference does.
    let warmup = usize::from(!ctx.device.is_cpu());
    let m = measure_on(&ctx.device, warmup, ctx.runs(1), || {
        model.generate(&params, PipelineHooks::none(), &mut |_, _| {})?;
        Ok(())
    })?;
    Ok(m.with("weights", graft_sdxl::precision::describe(model.weight_dtype(), &model.device)).with("device", format!("{:?}", ctx.device)))
}

/// One LoRA training step on the whole model: rank 16, alpha 16 on the UNet's attention
/// projections (the `lora` plugin's default targets), bf16 weights, batch 1, one image of
/// `res` x `res` with its latent and text embeddings cached (not timed), AdamW.
fn train_step(ctx: &Ctx, res: usize, checkpointing: bool) -> anyhow::Result<Measured> {
    let dir = ensure_model()?;
    let data = ctx.scratch.join("data");
    std::fs::create_dir_all(&data)?;
    let r = res as u32;
    let img = image::RgbImage::from_fn(r, r, |x, y| image::Rgb([(x * 255 / r) as u8, (y * 255 / r) as u8, 128]));
    img.save(data.join("0.png"))?;
    std::fs::write(data.join("0.txt"), "a red fox, watercolor painting")?;
    let text = format!(
        "model = {:?}\noutput_dir = {:?}\nseed = 1\nsteps = 1000\nbatch_size = 1\n\
         cache_latents = \"memory\"\ndtype = \"bf16\"\ngradient_checkpointing = {checkpointing}\n\
         [dataset]\ndir = {:?}\nresolution = {res}\n\
         [strategy]\nplugin = \"lora\"\nconfig = {{ rank = 16, alpha = 16 }}\n",
        dir,
        ctx.scratch.join("out"),
        data
    );
    let path = ctx.scratch.join("train.toml");
    std::fs::write(&path, text)?;
    let plugins = ctx.plugin_dirs.manager()?;
    let setup = Instant::now();
    let mut t = Trainer::new(TrainConfig::from_file(&path)?, plugins, &ctx.device)?;
    let setup_s = setup.elapsed().as_secs_f64();
    let warmup = std::env::var("GRAFT_BENCH_WARMUP").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut losses = Vec::new();
    let m = measure_on(&ctx.device, warmup, ctx.runs(1), || {
        let r = t.train_step()?;
        anyhow::ensure!(!r.skipped, "step {} skipped (loss {})", r.step, r.loss);
        losses.push(r.loss);
        Ok(())
    })?;
    let params: usize = t.set.store().params(None).iter().map(|(_, p)| p.var.elem_count()).sum();
    Ok(m.with("lora_parameters", params)
        .with("warmup_steps", warmup)
        .with("setup_s", setup_s)
        .with("loss", losses.last().copied().unwrap_or(f64::NAN))
        .with("checkpointing", checkpointing)
        .with("device", format!("{:?}", ctx.device)))
}

pub fn train_512(ctx: &Ctx) -> anyhow::Result<Measured> {
    train_step(ctx, 512, false)
}

pub fn train_512_ckpt(ctx: &Ctx) -> anyhow::Result<Measured> {
    train_step(ctx, 512, true)
}

pub fn train_1024(ctx: &Ctx) -> anyhow::Result<Measured> {
    train_step(ctx, 1024, false)
}

pub fn train_1024_ckpt(ctx: &Ctx) -> anyhow::Result<Measured> {
    train_step(ctx, 1024, true)
}
