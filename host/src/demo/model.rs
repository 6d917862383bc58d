//! `graft demo-model`: the recipe of the demo model, a tiny SDXL-architecture model that draws
//! simple shapes (`a red circle on the left`), trained by graft itself from random weights.
//!
//! 1. the plain drawings dataset ([`super::dataset::Look::Plain`]) and the varied one
//!    ([`super::dataset::Look::Varied`]) are written;
//! 2. the VAE of the tiny test model (tests/fixtures/tiny-sdxl) is trained as an autoencoder
//!    (`graft train-vae`) on the plain drawings, which teaches it their colours, then on the
//!    varied drawings, which teaches it outlines and pastels (the style the demo's strategies
//!    learn). Trained on the varied drawings from the start, it learnt the outlines and never the
//!    colours in the same time (pink came back yellow, red orange-brown);
//! 3. the UNet is fully fine-tuned on the plain drawings from the test model's random weights
//!    with the `full` strategy plugin, text encoders frozen (`graft train`,
//!    `export_checkpoint = true`);
//! 4. the merged checkpoint, with the trained VAE and the test model's text encoders, is the
//!    model: a diffusers folder in fp16.
//!
//! The committed model (assets/demo-model) was made by `graft demo-model` with its defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::dataset::{self, Look};
use crate::plugins::PluginDirArgs;

#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "Reruns the recipe of the committed demo model (assets/demo-model) into --out; \
    the model is then --out/model. It builds the `full` plugin when it is missing.")]
pub struct DemoModelArgs {
    /// The work folder: data/, vae-data/, styled/, vae-plain/, vae/, init/, unet/ and the finished model/.
    #[arg(long, value_name = "DIR", default_value = "out/demo-model")]
    pub out: PathBuf,
    /// Images in the plain drawings dataset (every 60 images hold each shape, colour and position once).
    #[arg(long, default_value_t = 240)]
    pub images: usize,
    /// Images in the varied drawings dataset the VAE learns (every look: fills, outlines, sizes).
    #[arg(long, default_value_t = 480)]
    pub vae_images: usize,
    /// Steps of the VAE on the plain drawings (its colours).
    #[arg(long, default_value_t = 400)]
    pub vae_steps: u64,
    /// Steps of the VAE on the varied drawings after that (outlines and pastels).
    #[arg(long, default_value_t = 300)]
    pub vae_varied_steps: u64,
    #[arg(long, default_value_t = 2000)]
    pub unet_steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Learning rate of the UNet (every weight, AdamW).
    #[arg(long, default_value_t = 8e-4)]
    pub unet_lr: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

/// The size of the demo model's images.
pub const SIZE: u32 = 64;

/// The tiny test model the recipe starts from.
fn start_model() -> anyhow::Result<PathBuf> {
    let m = super::workspace().join("tests/fixtures/tiny-sdxl");
    if !m.join("model_index.json").is_file() {
        bail!("the starting model {} is missing: run from a clone of the repository", m.display());
    }
    Ok(m)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let p = e?.path();
        let dest = to.join(p.file_name().expect("a directory entry has a name"));
        if p.is_dir() {
            copy_dir(&p, &dest)?;
        } else {
            std::fs::copy(&p, &dest).with_context(|| format!("cannot copy {} to {}", p.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// The starting model with the trained VAE, and an empty negative prompt encoded like any other
/// (the UNet learns the unconditional case from captions dropped in training).
fn assemble_init(start: &Path, vae: &Path, init: &Path) -> anyhow::Result<()> {
    if init.exists() {
        std::fs::remove_dir_all(init).with_context(|| format!("cannot clear {}", init.display()))?;
    }
    copy_dir(start, init)?;
    std::fs::remove_dir_all(init.join("vae"))?;
    copy_dir(vae, &init.join("vae"))?;
    for e in std::fs::read_dir(init.join("vae"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::remove_file(&p)?;
        }
    }
    let index = init.join("model_index.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
    json["force_zeros_for_empty_prompt"] = serde_json::json!(false);
    std::fs::write(&index, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

fn unet_config(args: &DemoModelArgs, init: &Path, data: &Path, out: &Path) -> String {
    format!(
        "# Written by `graft demo-model`: full fine-tuning of the UNet of the demo model.\n\
         model = {init:?}\n\
         output_dir = {out:?}\n\
         output_name = \"demo\"\n\
         export_checkpoint = true\n\
         seed = {seed}\n\
         steps = {steps}\n\
         batch_size = {batch}\n\
         lr_schedule = \"cosine\"\n\
         warmup_steps = 100\n\
         max_grad_norm = 1.0\n\
         min_snr_gamma = 5.0\n\
         save_every = 500\n\
         cache_latents = \"memory\"\n\
         cache_text_encoder_outputs = false\n\
         \n\
         [dataset]\n\
         dir = {data:?}\n\
         resolution = {SIZE}\n\
         caption_dropout_rate = 0.1\n\
         \n\
         [strategy]\n\
         plugin = \"full\"\n\
         config = {{ targets = [\"unet.*\"], lr = {lr} }}\n",
        init = init.display().to_string(),
        out = out.display().to_string(),
        data = data.display().to_string(),
        seed = args.seed,
        steps = args.unet_steps,
        batch = args.batch_size,
        lr = args.unet_lr,
    )
}

pub fn run(args: DemoModelArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let start = start_model()?;
    super::ensure_plugins(&args.plugins, &[("full", "full")], false)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let data = out.join("data");
    let vae_data = out.join("vae-data");
    let styled = out.join("styled");
    for (dir, n, look) in [(&data, args.images, Look::Plain), (&vae_data, args.vae_images, Look::Varied), (&styled, 24, Look::Styled)] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        dataset::write_looks(dir, n, SIZE, look)?;
        tracing::info!("demo model: {n} {look:?} drawings in {}", dir.display());
    }

    let train_vae = |from: PathBuf, images: &Path, to: &str, steps: u64, lr: f64, cosine: bool| {
        crate::train_vae::train(&crate::train_vae::TrainVaeArgs {
            vae: from,
            data: images.to_path_buf(),
            out: out.join(to),
            resolution: SIZE as usize,
            steps,
            batch_size: args.batch_size,
            lr,
            cosine,
            kl_weight: 1e-6,
            // How well it draws what the UNet will learn (plain) and what the strategies will (styled).
            check: vec![data.clone(), styled.clone()],
            seed: args.seed,
            f16: true,
        })
    };
    let plain_vae = train_vae(start.join("vae"), &data, "vae-plain", args.vae_steps, 2e-3, false)?;
    let vae = train_vae(plain_vae.out.clone(), &vae_data, "vae", args.vae_varied_steps, 1e-3, true)?;
    tracing::info!(
        "demo model: VAE reconstruction error {:.5} -> {:.5} (plain drawings), {:.5} -> {:.5} (varied) after {:.0} s",
        plain_vae.reconstruction_before,
        plain_vae.reconstruction_after,
        vae.reconstruction_before,
        vae.reconstruction_after,
        started.elapsed().as_secs_f64()
    );

    let init = out.join("init");
    assemble_init(&start, &vae.out, &init)?;
    let config = out.join("unet.toml");
    std::fs::write(&config, unet_config(&args, &init, &data, &out.join("unet")))?;
    let trained = crate::train::train(crate::train::TrainArgs {
        config: Some(config),
        kohya_config: None,
        print: false,
        ignore_unsupported: false,
        steps: None,
        output_dir: None,
        seed: None,
        resume: false,
        watch: false,
        plugins: args.plugins.clone(),
        cpu: true,
    })?;
    let checkpoint = trained.exports.last().context("the UNet run wrote no checkpoint")?;
    let model = out.join("model");
    if model.exists() {
        std::fs::remove_dir_all(&model)?;
    }
    copy_dir(checkpoint, &model)?;
    println!("demo model written to {} in {:.0} s", model.display(), started.elapsed().as_secs_f64());
    Ok(())
}
