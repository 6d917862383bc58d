//! `graft train`: the command around the training loop (progress, checkpoints, samples, exports).

use std::path::PathBuf;

use anyhow::Context;

use crate::plugins::PluginDirArgs;
use crate::train::config::{TrainConfig, EXAMPLE};
use crate::train::samples::{render_samples, SamplePrompt};
use crate::train::trainer::{StepOutcome, StepRecord, Trainer};
use crate::train::{checkpoint, export, losslog};

#[derive(clap::Args, Debug)]
#[command(after_long_help = format!("Example config (FILE.toml):\n\n{EXAMPLE}"))]
pub struct TrainArgs {
    /// The training config (TOML); `graft train --help` shows an example.
    #[arg(long, required_unless_present = "kohya_config", conflicts_with = "kohya_config")]
    pub config: Option<PathBuf>,
    /// Train from a kohya sd-scripts / kohya_ss config (`sdxl_train_network.py --config_file`,
    /// networks.lora) instead; relative paths in it are taken from the current folder. Every key
    /// is mapped, noted as changing nothing, or refused as unsupported (docs/KOHYA.md).
    #[arg(long, value_name = "FILE.toml")]
    pub kohya_config: Option<PathBuf>,
    /// With --kohya-config: print the graft config made from it, and the notes, and exit.
    #[arg(long, requires = "kohya_config")]
    pub print: bool,
    /// With --kohya-config: train without the settings graft does not support, instead of
    /// refusing the file.
    #[arg(long, requires = "kohya_config")]
    pub ignore_unsupported: bool,
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
    /// Take up a rebuilt strategy plugin at the next step, keeping its trained parameters. When
    /// the strategy fails (a panic or an error in the plugin), the run pauses until a rebuild is
    /// taken up, then tries the same step again.
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
    if args.print {
        let path = args.kohya_config.as_deref().expect("clap: --print requires --kohya-config");
        let import = crate::train::kohya::import(path, &std::env::current_dir()?, args.ignore_unsupported)?;
        println!("# graft config made from {}\n{}", path.display(), import.toml);
        for note in &import.notes {
            println!("# {note}");
        }
        return Ok(());
    }
    // Ctrl-C / SIGTERM: stop after the step in progress and save.
    crate::stop::install();
    let outcome = train(args)?;
    for p in &outcome.exports {
        println!("{}", p.display());
    }
    Ok(())
}

fn config_from_args(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let (mut config, source, imported) = match (&args.config, &args.kohya_config) {
        (Some(path), _) => (TrainConfig::from_file(path)?, path, None),
        (None, Some(path)) => {
            let (config, text) = from_kohya(path, args)?;
            (config, path, Some(text))
        }
        (None, None) => anyhow::bail!("give --config FILE.toml or --kohya-config FILE.toml"),
    };
    if let Some(s) = args.steps {
        config.steps = s;
    }
    if let Some(d) = &args.output_dir {
        config.output_dir = d.clone();
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    config.validate().with_context(|| source.display().to_string())?;
    if let Some(text) = imported {
        keep_imported_config(&config, source, &text)?;
    }
    Ok(config)
}

/// A kohya config as a graft config; logs the notes. Returns the graft config's text too.
fn from_kohya(path: &std::path::Path, args: &TrainArgs) -> anyhow::Result<(TrainConfig, String)> {
    let cwd = std::env::current_dir().context("the current folder")?;
    let import = crate::train::kohya::import(path, &cwd, args.ignore_unsupported)?;
    for note in &import.notes {
        tracing::info!("{}: {note}", path.display());
    }
    Ok((import.config, import.toml))
}

/// Keeps the graft config made from a kohya file beside the run's outputs, so the run can be
/// repeated with `--config`.
fn keep_imported_config(config: &TrainConfig, kohya: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let out = &config.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output folder {}", out.display()))?;
    let copy = out.join("graft-config.toml");
    let header = format!("# Made by `graft train --kohya-config {}` (before command-line overrides)\n", kohya.display());
    std::fs::write(&copy, header + text).with_context(|| format!("cannot write {}", copy.display()))?;
    tracing::info!("the graft config of this run: {}", copy.display());
    Ok(())
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
    let mut done = Produced { records: Vec::new(), samples: Vec::new(), last_checkpoint };
    let ended = run_steps(&mut trainer, args.watch, &prompts, &mut log, &bar, &mut done);
    let Produced { records, samples, mut last_checkpoint } = done;
    match ended {
        Ok(Ended::Finished) => {}
        Ok(Ended::Interrupted) => {
            bar.abandon();
            let saved = save_on_stop(&trainer);
            anyhow::bail!("stopped by Ctrl-C or SIGTERM at step {}; saved {} (continue with --resume)", trainer.step, saved.describe());
        }
        Ok(Ended::TooManyBad(why)) => {
            bar.abandon();
            // The skipped steps changed no parameter: save the state right after the last good step.
            let undone = trainer.rewind_to_last_good();
            tracing::info!("{undone} skipped steps undone: saving the state after step {}", trainer.step);
            let saved = save_on_stop(&trainer);
            anyhow::bail!("{why}; the last good checkpoint is {} (continue with --resume once the cause is fixed)", saved.describe());
        }
        Err(e) => {
            bar.abandon();
            let saved = save_on_stop(&trainer);
            return Err(e.context(format!("the run stopped at step {}; saved {}", trainer.step, saved.describe())));
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

/// How the step loop ended without an error.
enum Ended {
    Finished,
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// Too many bad steps in a row; why.
    TooManyBad(String),
}

/// What the step loop produced.
struct Produced {
    records: Vec<StepRecord>,
    samples: Vec<PathBuf>,
    last_checkpoint: Option<PathBuf>,
}

/// The steps of `graft train`, with checkpoints and samples, until the end, a stop request or
/// too many bad steps. With `watch`, a failing strategy pauses the run until a rebuild.
fn run_steps(
    trainer: &mut Trainer,
    watch: bool,
    prompts: &[SamplePrompt],
    log: &mut losslog::LossLog,
    bar: &indicatif::ProgressBar,
    done: &mut Produced,
) -> anyhow::Result<Ended> {
    let total = trainer.config.steps;
    while trainer.step < total {
        if crate::stop::requested() {
            return Ok(Ended::Interrupted);
        }
        let record = if watch {
            trainer.poll_reloads()?;
            match trainer.step_or_pause()? {
                StepOutcome::Trained(r) => r,
                StepOutcome::Paused(p) => {
                    bar.set_message(format!("paused: waiting for a rebuild of {}", p.plugin_file.display()));
                    if !trainer.wait_for_rebuild(&crate::stop::requested)? {
                        return Ok(Ended::Interrupted);
                    }
                    continue;
                }
            }
        } else {
            trainer.train_step()?
        };
        log.append(&record.clone().into())?;
        bar.set_position(trainer.step);
        bar.set_message(format!("training loss {:.4} lr {:.2e}", record.loss, record.lr));
        done.records.push(record);
        if trainer.bad_in_row >= trainer.config.max_bad_steps {
            return Ok(Ended::TooManyBad(format!(
                "stopped at step {}: {} steps in a row were skipped ({})",
                trainer.step,
                trainer.bad_in_row,
                trainer.skip_reason()
            )));
        }
        let step = trainer.step;
        // Checkpoints are taken after good steps only: the last one is always a good one.
        let good = trainer.bad_in_row == 0;
        if good && trainer.config.save_every > 0 && step.is_multiple_of(trainer.config.save_every) && step < total {
            done.last_checkpoint = Some(checkpoint::save(trainer)?);
        }
        if !prompts.is_empty() && step.is_multiple_of(trainer.config.sample_every) {
            done.samples.extend(sample(trainer, prompts)?);
        }
    }
    Ok(Ended::Finished)
}

/// What a stopped run wrote: its checkpoint and adapter files, and what could not be written.
#[derive(Debug, Default)]
pub struct StopSave {
    pub checkpoint: Option<PathBuf>,
    pub exports: Vec<PathBuf>,
    pub problems: Vec<String>,
}

impl StopSave {
    /// "CHECKPOINT (adapter: FILES)", for the stop message.
    pub fn describe(&self) -> String {
        let checkpoint = self.checkpoint.as_ref().map_or("(none)".to_string(), |p| p.display().to_string());
        let exports: Vec<String> = self.exports.iter().map(|p| p.display().to_string()).collect();
        let mut text = format!("{checkpoint} (adapter: {})", if exports.is_empty() { "none".to_string() } else { exports.join(", ") });
        if !self.problems.is_empty() {
            text.push_str(&format!("; not saved: {}", self.problems.join("; ")));
        }
        text
    }
}

/// Writes a checkpoint and the adapter files of a run that stops part way (error, bad steps,
/// Ctrl-C, stop in serve), so that no trained step is lost. Never fails: what cannot be
/// written is logged and listed in `problems`. Nothing is written before the first step.
pub fn save_on_stop(trainer: &Trainer) -> StopSave {
    let mut saved = StopSave::default();
    if trainer.step == 0 {
        saved.problems.push("nothing was trained yet".into());
        return saved;
    }
    match checkpoint::save(trainer) {
        Ok(dir) => {
            tracing::info!("stopped at step {}: checkpoint written to {}", trainer.step, dir.display());
            saved.checkpoint = Some(dir);
        }
        Err(e) => {
            tracing::error!("stopped at step {}: the checkpoint could not be written: {e:#}", trainer.step);
            saved.problems.push(format!("checkpoint: {e:#}"));
        }
    }
    match export_for(trainer) {
        Ok(files) => {
            for f in &files {
                tracing::info!("stopped at step {}: adapter written to {}", trainer.step, f.display());
            }
            saved.exports = files;
        }
        Err(e) => {
            tracing::error!("stopped at step {}: the adapter could not be exported: {e:#}", trainer.step);
            saved.problems.push(format!("export: {e:#}"));
        }
    }
    saved
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
