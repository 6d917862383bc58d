//! `graft train-vae`: train an SDXL VAE as an autoencoder (reconstruction + KL) on a folder of
//! images; see [`graft_trainer::vae_train`].

use std::path::PathBuf;

use candle_core::DType;
use graft_trainer::vae_train::{train_vae, VaeTrainOptions, VaeTrainOutcome};

#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "The loss is LDM's without its perceptual and adversarial terms: mean squared \
    reconstruction error plus kl_weight times the KL divergence of the latents to N(0, 1). Every weight is \
    trained in f32 with AdamW from the given VAE's weights, or from random weights when \
    the folder has only a config.json (to train a VAE of another size). At the end scaling_factor is measured \
    (1 / std of the latents over the dataset, as Stable Diffusion's was) and written into the output's \
    config.json, and reconstruction.png shows the first 8 images over their reconstructions. Example: graft train-vae --vae models/tiny/vae --data data/shapes --out out/vae --steps 2000")]
pub struct TrainVaeArgs {
    /// The VAE to start from: a VAE folder (config.json + weights; config.json alone: random weights) or a
    /// diffusers model folder (its vae/).
    #[arg(long, value_name = "DIR")]
    pub vae: PathBuf,
    /// A folder of images (captions are not needed).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The output VAE folder (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Square training size in pixels (a multiple of the VAE's downscale factor).
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Decay the learning rate to zero along a cosine; without it the rate stays constant.
    #[arg(long)]
    pub cosine: bool,
    /// Weight of the KL term (LDM used 1e-6 with its perceptual loss).
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Also measure the reconstruction error on the images of DIR, which are not trained on, and
    /// write their preview as reconstruction-<name of DIR>.png. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub check: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store the weights as f16 (half the size; training is f32 either way).
    #[arg(long)]
    pub f16: bool,
}

pub fn run(args: TrainVaeArgs) -> anyhow::Result<()> {
    let o = train(&args)?;
    println!(
        "VAE written to {}: reconstruction error {:.5} -> {:.5}, scaling_factor {:.5}",
        o.out.display(),
        o.reconstruction_before,
        o.reconstruction_after,
        o.scaling_factor
    );
    for c in &o.checks {
        println!("reconstruction error on {}: {:.5} ({})", c.data.display(), c.reconstruction, c.preview.display());
    }
    Ok(())
}

pub fn train(args: &TrainVaeArgs) -> anyhow::Result<VaeTrainOutcome> {
    let options = VaeTrainOptions {
        vae: args.vae.clone(),
        data: args.data.clone(),
        resolution: args.resolution,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        cosine: args.cosine,
        kl_weight: args.kl_weight,
        seed: args.seed,
        out: args.out.clone(),
        save_dtype: if args.f16 { DType::F16 } else { DType::F32 },
        check: args.check.clone(),
    };
    let bar = graft_runtime::progress::bar(args.steps, "training the VAE");
    let every = (args.steps / 20).max(1);
    let outcome = train_vae(&options, |s| {
        bar.inc(1);
        if s.step % every == 0 {
            tracing::info!("vae step {}: reconstruction {:.5}, kl {:.3}", s.step, s.reconstruction, s.kl);
        }
    })?;
    bar.finish_and_clear();
    Ok(outcome)
}
