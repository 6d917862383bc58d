//! One training step of the `lora` strategy on the tiny fixture, through graft's trainer: rank 8,
//! alpha 32 on every attention's to_q / to_k / to_v / to_out.0, v-prediction MSE, AdamW, latents
//! and text embeddings cached (as diffusers' script caches them).

use candle_core::Device;

use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

use super::measure::{measure, Measured};
use super::Ctx;

/// Eight 128x128 images with captions.
fn dataset(ctx: &Ctx) -> anyhow::Result<std::path::PathBuf> {
    let data = ctx.scratch.join("data");
    std::fs::create_dir_all(&data)?;
    for i in 0..8u32 {
        let img = image::RgbImage::from_fn(128, 128, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, (i * 30) as u8]));
        img.save(data.join(format!("{i}.png")))?;
        std::fs::write(data.join(format!("{i}.txt")), format!("image {i}, pastel line art"))?;
    }
    Ok(data)
}

fn trainer(ctx: &Ctx, batch: usize) -> anyhow::Result<Trainer> {
    let data = dataset(ctx)?;
    let text = format!(
        "model = {:?}\noutput_dir = {:?}\nseed = 1\nsteps = 1000\nbatch_size = {batch}\n\
         prediction_type = \"v_prediction\"\ncache_latents = \"memory\"\n\
         [dataset]\ndir = {:?}\nresolution = 128\n\
         [strategy]\nplugin = \"lora\"\nconfig = {{ rank = 8, alpha = 32 }}\n",
        std::fs::canonicalize(&ctx.fixture)?,
        ctx.scratch.join("out"),
        data
    );
    let path = ctx.scratch.join("train.toml");
    std::fs::write(&path, text)?;
    let plugins = ctx.plugin_dirs.manager()?;
    Ok(Trainer::new(TrainConfig::from_file(&path)?, plugins, &Device::Cpu)?)
}

fn step(ctx: &Ctx, batch: usize) -> anyhow::Result<Measured> {
    let mut t = trainer(ctx, batch)?;
    let m = measure(2, ctx.runs(10), || {
        let r = t.train_step()?;
        anyhow::ensure!(!r.skipped, "step {} skipped (loss {})", r.step, r.loss);
        Ok(())
    })?;
    let params: usize = t.set.store().params(None).iter().map(|(_, p)| p.var.elem_count()).sum();
    Ok(m.with("lora_parameters", params))
}

pub fn tiny_b1(ctx: &Ctx) -> anyhow::Result<Measured> {
    step(ctx, 1)
}

pub fn tiny_b4(ctx: &Ctx) -> anyhow::Result<Measured> {
    step(ctx, 4)
}
