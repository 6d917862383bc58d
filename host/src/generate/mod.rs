//! `graft generate`: text to image.

pub mod png_out;

use std::path::PathBuf;

use anyhow::Context;
use graft_sdxl::pipeline::to_rgb8;
use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers SDXL folder or a single-file SDXL checkpoint (.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A diffusers folder whose config.json files give the architecture of a single-file checkpoint
    /// (default: the built-in SDXL base 1.0).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Empty or absent: SDXL's zeroed unconditional embeddings.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 8.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less: no guidance).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// euler (default), euler_a, ddim, dpmpp_2m, dpmpp_2m_karras.
    #[arg(long, default_value = "euler")]
    pub scheduler: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A safetensors file with one [1,4,H/8,W/8] tensor of unit-normal noise, used instead of the
    /// seed's (multiplied by the scheduler's init sigma, like diffusers' `latents=`).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Where to write the PNG (its parameters go into an A1111 `parameters` text chunk).
    #[arg(long, default_value = "graft.png")]
    pub out: PathBuf,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
}

/// Reads the one tensor of an `--init-latents` file.
pub fn read_init_latents(path: &PathBuf) -> anyhow::Result<candle_core::Tensor> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: cannot read init latents (a safetensors file with one tensor)", path.display()))?;
    match tensors.len() {
        1 => Ok(tensors.into_values().next().expect("one tensor")),
        n => anyhow::bail!("{}: holds {n} tensors; --init-latents needs exactly one [1,4,H/8,W/8] tensor", path.display()),
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    graft_sdxl::pipeline::check_size(args.width, args.height)?;
    graft_sdxl::schedulers::build_scheduler(&args.scheduler, &graft_sdxl::schedulers::SchedulerConfig::sdxl_base(), 1)?;
    let init_latents = args.init_latents.as_ref().map(read_init_latents).transpose()?;
    let device = crate::device::pick(args.cpu)?;
    let started = std::time::Instant::now();
    let model = SdxlModel::load(&args.model, args.model_config.as_deref(), &device)?;
    tracing::info!("loaded {} in {:.1}s", args.model.display(), started.elapsed().as_secs_f64());
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        seed: args.seed,
        init_latents,
    };
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("denoising");
    let out = model.generate(&params, PipelineHooks::none(), &mut |step, _| bar.set_position(step as u64))?;
    bar.finish_and_clear();
    let (w, h, rgb) = to_rgb8(&out.image.get(0)?)?;
    let text = png_out::a1111_parameters(&params, &model_name(&args.model));
    png_out::write_png(&args.out, w, h, &rgb, &text)?;
    println!("{}", args.out.display());
    tracing::info!("wrote {} in {:.1}s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn model_name(path: &std::path::Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
