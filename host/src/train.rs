//! `graft train`: the command around the training loop (progress, checkpoints, samples, exports).

use std::path::PathBuf;

use anyhow::Context;

use crate::plugins::PluginDirArgs;
use graft_trainer::config::{TrainConfig, EXAMPLE};
use graft_trainer::session::{Ended, Quiet, Session, SessionOptions};
use graft_trainer::trainer::{StepRecord, Trainer};

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
        let import = graft_trainer::kohya::import(path, &std::env::current_dir()?, args.ignore_unsupported)?;
        println!("# graft config made from {}\n{}", path.display(), import.toml);
        for note in &import.notes {
            println!("# {note}");
        }
        return Ok(());
    }
    // Ctrl-C / SIGTERM: stop after the step in progress and save.
    graft_runtime::stop::install();
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
        config.options.steps = s;
    }
    if let Some(d) = &args.output_dir {
        config.output_dir = d.clone();
    }
    if let Some(s) = args.seed {
        config.options.seed = s;
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
    let import = graft_trainer::kohya::import(path, &cwd, args.ignore_unsupported)?;
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
    let device = graft_runtime::device::pick(args.cpu)?;
    let mut plugins = args.plugins.manager()?;
    if args.watch {
        plugins.watch()?;
    }
    std::fs::create_dir_all(&config.output_dir).with_context(|| format!("cannot create output folder {}", config.output_dir.display()))?;
    let trainer = Trainer::new(config, plugins, &device)?;
    let options = SessionOptions { prompts, pause_on_failure: args.watch, resume: args.resume, progress: Some("training".into()) };
    let mut session = Session::start(trainer, options)?;
    if session.trainer.config.export_checkpoint && session.trainer.set.unfrozen().is_empty() {
        anyhow::bail!(
            "export_checkpoint = true, but strategy `{}` trains no base weight: a checkpoint would be the base model \
             itself (use a strategy that unfreezes base weights, like `full`, or drop export_checkpoint)",
            session.trainer.config.strategy.plugin
        );
    }
    let ended = session.run(&mut Quiet);
    let exports = match &ended {
        Ok(Ended::Finished) => session.finish(&Quiet)?,
        Ok(Ended::Stopped) => {
            let saved = session.save_stopped(None, &Quiet);
            let step = session.trainer.step;
            anyhow::bail!("stopped by Ctrl-C or SIGTERM at step {step}; saved {} (continue with --resume)", saved.describe());
        }
        Ok(bad @ Ended::TooManyBad(why)) => {
            let saved = session.save_stopped(Some(bad), &Quiet);
            anyhow::bail!("{why}; the last good checkpoint is {} (continue with --resume once the cause is fixed)", saved.describe());
        }
        Err(_) => {
            let saved = session.save_stopped(None, &Quiet);
            let step = session.trainer.step;
            return Err(anyhow::Error::from(ended.unwrap_err()).context(format!("the run stopped at step {step}; saved {}", saved.describe())));
        }
    };
    let mut exports = exports;
    if session.trainer.config.export_checkpoint {
        exports.push(write_checkpoint(&session.trainer.config, &exports)?);
    }
    let t = &session.trainer;
    tracing::info!("done: {} steps ({} skipped); adapter in {}", t.step, t.skipped_total, t.config.output_dir.display());
    Ok(TrainOutcome {
        steps: t.step,
        skipped: t.skipped_total,
        last_checkpoint: session.last_checkpoint.take(),
        exports,
        samples: std::mem::take(&mut session.samples),
        records: std::mem::take(&mut session.records),
    })
}

/// `export_checkpoint`: the base model with the run's full-weight diff merged in (`graft merge`),
/// as the diffusers folder `{output_dir}/{output_name}-checkpoint`; each tensor keeps its dtype.
fn write_checkpoint(config: &TrainConfig, exports: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let diff = exports
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".diff.safetensors"))
        .with_context(|| format!("export_checkpoint: the run wrote no base-weight diff among {exports:?}"))?;
    let out = config.output_dir.join(format!("{}-checkpoint", config.output_name));
    let args = crate::tools::merge::MergeArgs {
        adapters: vec![diff.display().to_string()],
        model: Some(config.model.clone()),
        out: out.clone(),
        to: crate::tools::convert::Target::Kohya,
        rank: None,
        dtype: None,
        name: None,
        drop_unmatched: false,
        arch: crate::tools::ArchArgs { model_config: config.model_config.clone() },
        plugins: Default::default(),
    };
    let line = crate::tools::merge::merge(&args).context("export_checkpoint")?;
    tracing::info!("{line}");
    Ok(out)
}
