//! `graft train`: the command around the training loop (progress, checkpoints, samples, exports).

use std::path::PathBuf;

use anyhow::Context;

use crate::plugins::PluginDirArgs;
use crate::train::config::{TrainConfig, EXAMPLE};
use crate::train::samples::{render_samples, SamplePrompt};
use crate::train::trainer::{StepRecord, Trainer};
use crate::train::{checkpoint, export, losslog};

#[derive(clap::Args, Debug)]
#[command(after_long_help = format!("Example config (FILE.toml):\n\n{EXAMPLE}"))]
pub struct TrainArgs {
    /// The training config (TOML); `graft train --help` shows an example.
    #[arg(long)]
    pub config: PathBuf,
    /// Override `steps`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override `output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Override `seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the latest checkpoint in the output folder (bit-exact).
    #[arg(long)]
    pub resume: bool,
    /// Take up a rebuilt strategy plugin at the next step, keeping its trained parameters.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
}

/// What a finished (or stopped) run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    pub steps: u64,
    pub skipped: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub exports: Vec<PathBuf>,
    pub samples: Vec<PathBuf>,
    pub records: Vec<StepRecord>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let outcome = train(args)?;
    for p in &outcome.exports {
        println!("{}", p.display());
    }
    Ok(())
}

fn config_from_args(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut config = TrainConfig::from_file(&args.config)?;
    if let Some(s) = args.steps {
        config.steps = s;
    }
    if let Some(d) = &args.output_dir {
        config.output_dir = d.clone();
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    config.validate().with_context(|| args.config.display().to_string())?;
    Ok(config)
}

/// Runs a whole training from a config; the library entry point of `graft train`.
pub fn train(args: TrainArgs) -> anyhow::Result<TrainOutcome> {
    let config = config_from_args(&args)?;
    let prompts = config.sample_prompts_to_render()?;
    let device = crate::device::pick(args.cpu)?;
    let mut plugins = args.plugins.manager()?;
    if args.watch {
        plugins.watch()?;
    }
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("cannot create output folder {}", config.output_dir.display()))?;
    let mut trainer = Trainer::new(config, plugins, &device)?;
    let out_dir = trainer.config.output_dir.clone();
    let log_path = out_dir.join("loss.jsonl");
    let mut last_checkpoint = None;
    if args.resume {
        match checkpoint::latest(&out_dir)? {
            Some(dir) => {
                checkpoint::load(&mut trainer, &dir)?;
                tracing::info!("resumed from {} at step {}", dir.display(), trainer.step);
                last_checkpoint = Some(dir);
            }
            None => tracing::warn!("--resume: no checkpoint in {}; starting from step 0", out_dir.display()),
        }
    }
    let mut log = losslog::LossLog::open(&log_path, trainer.step)?;
    let total = trainer.config.steps;
    let bar = crate::progress::bar(total, "training");
    bar.set_position(trainer.step);
    let mut records = Vec::new();
    let mut samples = Vec::new();
    while trainer.step < total {
        if args.watch {
            trainer.poll_reloads()?;
        }
        let record = trainer.train_step()?;
        log.append(&record.clone().into())?;
        bar.set_position(trainer.step);
        bar.set_message(format!("training loss {:.4} lr {:.2e}", record.loss, record.lr));
        records.push(record);
        if trainer.bad_in_row >= trainer.config.max_bad_steps {
            bar.abandon();
            anyhow::bail!(
                "stopped at step {}: {} steps in a row were skipped ({}); the last good checkpoint is {}",
                trainer.step,
                trainer.bad_in_row,
                trainer.skip_reason(),
                last_checkpoint.as_ref().map_or("(none yet)".into(), |p: &PathBuf| p.display().to_string())
            );
        }
        let step = trainer.step;
        // Checkpoints are taken after good steps only: the last one is always a good one.
        let good = trainer.bad_in_row == 0;
        if good && trainer.config.save_every > 0 && step % trainer.config.save_every == 0 && step < total {
            last_checkpoint = Some(checkpoint::save(&trainer)?);
        }
        if !prompts.is_empty() && step % trainer.config.sample_every == 0 {
            samples.extend(sample(&mut trainer, &prompts)?);
        }
    }
    bar.finish_and_clear();
    if last_checkpoint.as_ref().is_none_or(|p| !p.ends_with(format!("step-{:06}", trainer.step))) {
        last_checkpoint = Some(checkpoint::save(&trainer)?);
    }
    let exports = export_for(&trainer)?;
    losslog::plot_loss_png(&losslog::read(&log_path)?, &out_dir.join("loss.png"))?;
    tracing::info!(
        "done: {} steps ({} skipped); adapter in {}",
        trainer.step,
        trainer.skipped_total,
        out_dir.display()
    );
    Ok(TrainOutcome { steps: trainer.step, skipped: trainer.skipped_total, last_checkpoint, exports, samples, records })
}

fn sample(trainer: &mut Trainer, prompts: &[SamplePrompt]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    trainer.set.set_training(false);
    let stem = format!("step{:06}", trainer.step);
    let dir = trainer.config.output_dir.join("samples");
    let paths = render_samples(&trainer.model, &trainer.set, prompts, &dir, &stem);
    trainer.set.set_training(true);
    paths
}

/// Writes the adapter files of a trainer's strategy into its output folder.
pub fn export_for(trainer: &Trainer) -> anyhow::Result<Vec<PathBuf>> {
    let model = &trainer.model;
    let meta = export::ExportMeta {
        steps: trainer.step,
        unet_lr: None,
        text_encoder_lr: None,
        base_model: model.source.display().to_string(),
        sgm_layout: graft_sdxl::sgm::SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2)?,
    };
    export::export_strategy(&trainer.set, trainer.strategy, &trainer.config.output_dir, &trainer.config.output_name, &meta)
}
