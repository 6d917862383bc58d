//! `graft compare --config compare.toml`: several strategies (plugins, or config variants of one
//! plugin) trained on the same data, seed, noise, timesteps, step budget and sample prompts, one
//! after another in one process on a model loaded once, and a report side by side.
//!
//! - [`config`]: the compare config (`graft compare --help` shows an example).
//! - [`run`]: the runs, with the base weights put back between strategies.
//! - [`report`]: `report.md`, a self-contained `report.html`, the loss plot, the sample grid.
//! - [`memory`]: peak memory per strategy.
//! - [`stats`]: mean ± std over the seeds of `seeds = [..]`.
//! - [`style`]: the style score, samples against the training images (docs/STYLE_SCORE.md).
//! - [`grid`]: the sample grid with its header row (prompts) and column (models).
//! - [`font`]: a 5x7 bitmap font for the grid's labels.

pub mod config;
pub mod font;
pub mod grid;
pub mod memory;
pub mod report;
pub mod run;
pub mod stats;
pub mod style;

use std::path::PathBuf;

use crate::plugins::PluginDirArgs;
use config::{CompareConfig, EXAMPLE};
pub use run::{CompareOutcome, StrategyResult};

#[derive(clap::Args, Debug)]
#[command(after_long_help = format!(
    "The report folder (output_dir) gets report.html (self-contained), report.md, loss.png, grid.png, \
     summary.json, samples/ and strategies/<name>/ with each adapter and its loss log. A strategy that \
     fails is reported in the table; the others still run. With `seeds = [..]` every strategy runs once \
     per seed (strategies/<name>/seed-<n>/, samples/seed-<n>/) and the losses are mean ± std.\n\nExample config (compare.toml):\n\n{EXAMPLE}"
))]
pub struct CompareArgs {
    /// The compare config (TOML); `graft compare --help` shows an example.
    #[arg(long)]
    pub config: PathBuf,
    /// Override `steps` (the budget of every strategy).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override `output_dir` (the report folder).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
}

/// Runs a comparison from its config and writes the report; the library entry point of
/// `graft compare`.
pub fn compare(config: &CompareConfig, plugins: PluginDirArgs, cpu: bool) -> anyhow::Result<CompareOutcome> {
    let device = graft_runtime::device::pick(cpu)?;
    let mut outcome = run::run(config, &run::RunOptions { plugins, device })?;
    report::write(&mut outcome)?;
    Ok(outcome)
}

/// Reads the config with the command line's overrides.
pub fn config_from_args(args: &CompareArgs) -> anyhow::Result<CompareConfig> {
    let mut config = CompareConfig::from_file(&args.config)?;
    if let Some(s) = args.steps {
        config.options.steps = s;
    }
    if let Some(d) = &args.output_dir {
        config.output_dir = d.clone();
    }
    config.validate().map_err(|e| e.context(args.config.display().to_string()))?;
    Ok(config)
}

/// Prints the table's gist and where the report is.
pub fn print_summary(outcome: &CompareOutcome) {
    for r in &outcome.strategies {
        if let Some(s) = &r.stats {
            let f = |m: Option<stats::MeanStd>| m.map(|m| m.format(4)).unwrap_or_else(|| "–".into());
            let status = if r.ok() { "ok" } else { "FAILED" };
            println!(
                "{:<24} {status:<7} {} seeds  mean loss {}  eval {} -> {}{}",
                r.name,
                r.runs.len(),
                f(s.mean_loss),
                f(s.eval_loss_start),
                f(s.eval_loss_end),
                s.validation_loss.map(|m| format!("  validation {}", m.format(4))).unwrap_or_default()
            );
            if let Some(e) = &r.error {
                println!("{:<24}         {}", "", e.lines().next().unwrap_or_default());
            }
            print_style(r);
            continue;
        }
        match &r.error {
            None => println!(
                "{:<24} ok      mean loss {:.4}  eval {:.4} -> {:.4}{}  {:.3} s/step",
                r.name,
                r.mean_loss.unwrap_or(f64::NAN),
                r.eval_loss_start.unwrap_or(f64::NAN),
                r.eval_loss_end.unwrap_or(f64::NAN),
                r.validation_loss.map(|v| format!("  validation {v:.4}")).unwrap_or_default(),
                r.seconds_per_step.unwrap_or(f64::NAN)
            ),
            Some(e) => println!("{:<24} FAILED  {}", r.name, e.lines().next().unwrap_or_default()),
        }
        print_style(r);
    }
    if let Some(n) = &outcome.style_note {
        println!("{n}");
    }
    println!("report: {}", outcome.output_dir.join(report::REPORT_HTML).display());
    println!("        {}", outcome.output_dir.join(report::REPORT_MD).display());
}

/// `style 0.512 -> 0.430 (lower is closer)` under a strategy's line.
fn print_style(r: &StrategyResult) {
    let f = |s: Option<f64>| s.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into());
    let after = match r.stats.as_ref().and_then(|s| s.style_after.as_ref()).and_then(|s| s.total) {
        Some(m) => m.format(3),
        None => f(r.style.after.map(|s| s.total)),
    };
    if r.style.before.is_some() || r.style.after.is_some() {
        println!("{:<24}         style {} -> {after} (lower is closer to the training images)", "", f(r.style.before.map(|s| s.total)));
    }
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let config = config_from_args(&args)?;
    let outcome = compare(&config, args.plugins, args.cpu)?;
    print_summary(&outcome);
    Ok(())
}
