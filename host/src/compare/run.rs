//! Running the strategies of a comparison one after another on one loaded model.
//!
//! Every strategy gets the same training config apart from its `[strategy]` table, so the same
//! seed gives each the same data order, noise and timesteps at every step; its samples use the
//! same prompts and seeds. A strategy may unfreeze the model's base weights (attention-gate
//! trains the base projections) or fold into them, and the next one must start from the same
//! model: those are overrides its trainer's adapter set owns, taken out when the trainer is
//! dropped ([`graft_sdxl::overrides`]); between strategies the model is checked to be as loaded
//! (every stack of overrides empty). A strategy
//! that fails (unknown plugin, bad config, an error or a panic mid-run) is recorded with what it
//! had done, and the others still run.
//!
//! With `seeds = [..]` every strategy is trained once per seed, each run a session of its own on
//! the same model, into `strategies/<name>/seed-<n>/` with its samples in `samples/seed-<n>/`;
//! the row holds the runs and the mean ± std of their numbers ([`crate::compare::stats`]).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use graft_sdxl::SdxlModel;
use serde::{Deserialize, Serialize};

use crate::compare::config::{CompareConfig, StrategyEntry};
use crate::compare::memory::{Peak, PeakMeter};
use crate::compare::stats::{mean_std, SeedStats, StyleStats};
use crate::compare::style::{self, SetStats, SetSummary, StyleScore};
use crate::plugins::PluginDirArgs;
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::plugins::PluginManager;
use graft_trainer::losslog::LossEntry;
use graft_trainer::samples::{render_samples, SamplePrompt};
use graft_trainer::session::{export_for, Ended, Observer, Session, SessionOptions};
use graft_trainer::trainer::{StepRecord, Trainer};

/// The seed of the fixed evaluation loss ([`Trainer::eval_loss`]) reported for every strategy.
pub const EVAL_SEED: u64 = 0xe7a1;

/// At most this many training images are measured for the style score (evenly spread).
pub const STYLE_MAX_IMAGES: usize = 256;

/// What one strategy did. Fields a failed strategy never reached are `None` / empty.
///
/// With `seeds`, a row holds its runs (one per seed, each a result of its own with `seed` set)
/// and their [`SeedStats`]; the row's own losses and time per step are then the means over the
/// runs that finished, its `samples` the first seed's, its `exports` every run's, its `losses`
/// empty (they are in the runs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StrategyResult {
    pub name: String,
    pub plugin: String,
    pub plugin_version: Option<String>,
    /// The plugin's config (JSON).
    pub config: String,
    /// `None`: it ran to the end; `Some(message)`: it failed.
    pub error: Option<String>,
    /// Hook points in its plan (attached now or by a later stage).
    pub layers: Option<usize>,
    /// Every parameter it trains (adapter parameters and unfrozen base weights).
    pub trainable_params: Option<u64>,
    /// Of those, base-model weights it unfroze.
    pub base_params: Option<u64>,
    pub steps_done: u64,
    pub final_loss: Option<f64>,
    /// Mean loss over the last `loss_window` steps (fewer when fewer were done).
    pub mean_loss: Option<f64>,
    /// The fixed evaluation loss before and after training (same batch, noise and timesteps).
    pub eval_loss_start: Option<f64>,
    pub eval_loss_end: Option<f64>,
    /// The last validation loss (`validation_dir` / `validation_split`: after the last step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    pub seconds_per_step: Option<f64>,
    /// Wall time of the whole strategy: setup, training, samples, export.
    pub seconds_total: f64,
    pub peak_memory: Option<Peak>,
    /// Total size of its adapter files.
    pub adapter_bytes: Option<u64>,
    /// Adapter files, relative to the report folder.
    pub exports: Vec<PathBuf>,
    /// Sample images in prompt order, relative to the report folder.
    pub samples: Vec<PathBuf>,
    /// The loss log, step by step.
    pub losses: Vec<LossEntry>,
    /// The seed of this run (one run of `seeds`); `None` without `seeds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// With `seeds`: the row's run for each seed, in the order of `seeds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<StrategyResult>,
    /// With `seeds`: the mean and sample std of the row's numbers over the runs that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<SeedStats>,
    /// The style score of the base model's samples and of this strategy's ([`crate::compare::style`]);
    /// with `seeds`, the row's `after` is the mean over the runs that finished.
    #[serde(default)]
    pub style: Style,
}

/// The style score before training (the base model's samples) and after (the strategy's), each
/// against the training images; lower is closer. A missing score says why in `note`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Style {
    pub before: Option<StyleScore>,
    pub after: Option<StyleScore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The training images the style score is measured against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleReference {
    /// The dataset folder or config.
    pub source: String,
    /// Images in the dataset; at most [`STYLE_MAX_IMAGES`] of them, evenly spread, are measured.
    pub found: usize,
    pub stats: SetSummary,
    /// Training images shown in the grid's last row (one per prompt, evenly spread).
    #[serde(default)]
    pub examples: Vec<PathBuf>,
}

impl StrategyResult {
    /// The row of `entry`, before it ran.
    fn new(entry: &StrategyEntry) -> Self {
        StrategyResult { name: entry.name().to_string(), plugin: entry.plugin.clone(), config: entry.config_json(), ..Default::default() }
    }

    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What a whole comparison produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareOutcome {
    pub output_dir: PathBuf,
    pub model: String,
    /// `seed`, or the first of `seeds` (the prompts' and the base samples' seed).
    pub seed: u64,
    /// Every strategy's run seeds, when `seeds` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    pub steps: u64,
    pub loss_window: u64,
    pub device: String,
    /// Seconds to load the model (once).
    pub load_seconds: f64,
    /// The base model's samples, relative to the report folder.
    pub base_samples: Vec<PathBuf>,
    /// The prompts, in column order, with their seeds and sizes.
    pub prompts: Vec<PromptInfo>,
    pub strategies: Vec<StrategyResult>,
    /// Whether each strategy's peak memory is its own (`clear_refs` allowed) or the process's.
    pub peak_per_strategy: bool,
    /// Report files, relative to the report folder (set by the report writer).
    pub report_files: Vec<PathBuf>,
    /// The training images' style statistics; `None` when they could not be read (`style_note`
    /// says why) or there are no prompts.
    #[serde(default)]
    pub style_reference: Option<StyleReference>,
    /// Why there is no style score, when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptInfo {
    pub prompt: String,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
}

/// Where a comparison finds its plugins and runs.
pub struct RunOptions {
    pub plugins: PluginDirArgs,
    pub device: candle_core::Device,
}

/// Runs every strategy of `config` and returns what each did (the report is written by
/// [`crate::compare::report::write`]). Errors only for what stops the whole comparison: the
/// output folder, the prompts, the model, the base samples.
pub fn run(config: &CompareConfig, options: &RunOptions) -> anyhow::Result<CompareOutcome> {
    let out = &config.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create the report folder {}", out.display()))?;
    let prompts = config.prompts()?;
    let mut plugins = Some(watched(&options.plugins)?);

    let started = Instant::now();
    tracing::info!("loading {}", config.model.display());
    let model = SdxlModel::load_as(&config.model, config.model_config.as_deref(), &options.device, config.options.dtype)
        .with_context(|| format!("loading model {}", config.model.display()))?;
    let model = Arc::new(model);
    let load_seconds = started.elapsed().as_secs_f64();

    let base_samples = if prompts.is_empty() {
        Vec::new()
    } else {
        tracing::info!("sampling the base model");
        let set = AdapterSet::new(&model, config.first_seed());
        let paths = render_samples(&model, &set, &prompts, &out.join("samples"), "base").context("sampling the base model")?;
        relative(out, &paths)
    };
    let style = StyleContext::new(config, out, &base_samples, prompts.len());

    let mut strategies = Vec::new();
    let mut peak_per_strategy = true;
    for (i, entry) in config.strategies.iter().enumerate() {
        tracing::info!("strategy {}/{}: `{}` (plugin {})", i + 1, config.strategies.len(), entry.name(), entry.plugin);
        let result = match &config.seeds {
            None => {
                let mut r = run_strategy(config, entry, None, &model, &mut plugins, &options.plugins, &prompts);
                r.style = style.of(out, &r);
                r
            }
            Some(seeds) => {
                let mut runs = Vec::with_capacity(seeds.len());
                match clear_dir(&out.join("strategies").join(entry.name())) {
                    Ok(()) => {
                        for (k, &seed) in seeds.iter().enumerate() {
                            tracing::info!("`{}`: seed {seed} ({}/{})", entry.name(), k + 1, seeds.len());
                            let mut run = run_strategy(config, entry, Some(seed), &model, &mut plugins, &options.plugins, &prompts);
                            run.style = style.of(out, &run);
                            if let Some(e) = &run.error {
                                tracing::error!("strategy `{}` failed with seed {seed}: {e}", entry.name());
                            }
                            runs.push(run);
                        }
                    }
                    Err(e) => {
                        let mut r = StrategyResult::new(entry);
                        r.error = Some(format!("{e:#}"));
                        r.style = style.of(out, &r);
                        runs.push(r);
                    }
                }
                aggregate(entry, runs)
            }
        };
        if let Some(e) = &result.error {
            tracing::error!("strategy `{}` failed: {e}", entry.name());
        }
        peak_per_strategy &= result.peak_memory.is_none_or(|p| p.per_strategy);
        peak_per_strategy &= result.runs.iter().all(|r| r.peak_memory.is_none_or(|p| p.per_strategy));
        strategies.push(result);
    }

    Ok(CompareOutcome {
        output_dir: out.clone(),
        model: config.model.display().to_string(),
        seed: config.first_seed(),
        seeds: config.seeds.clone(),
        steps: config.options.steps,
        loss_window: config.loss_window,
        device: describe_device(&options.device),
        load_seconds,
        base_samples,
        prompts: prompts
            .iter()
            .map(|p| PromptInfo { prompt: p.prompt.clone(), seed: p.seed, width: p.width, height: p.height, steps: p.steps })
            .collect(),
        strategies,
        peak_per_strategy,
        report_files: Vec::new(),
        style_reference: style.reference.map(|(source, found, stats, examples)| StyleReference {
            source,
            found,
            stats: stats.summary(),
            examples,
        }),
        style_note: style.note,
    })
}

/// What every strategy's style score is measured against: the training images, and the base
/// model's samples (the same prompts and sample seeds as every strategy's, whatever the run's
/// seed: the prompts' seeds start at the first seed).
struct StyleContext {
    /// (source, images found, their statistics, examples for the grid).
    reference: Option<(String, usize, SetStats, Vec<PathBuf>)>,
    before: Option<StyleScore>,
    /// Why there is no score at all, or no `before`.
    note: Option<String>,
    prompts: usize,
}

impl StyleContext {
    fn new(config: &CompareConfig, out: &Path, base_samples: &[PathBuf], prompts: usize) -> Self {
        let mut ctx = StyleContext { reference: None, before: None, note: None, prompts };
        if prompts == 0 {
            ctx.note = Some("no style score: no sample prompts".into());
            return ctx;
        }
        let started = Instant::now();
        let reference = training_images(config).and_then(|(source, paths)| {
            let found = paths.len();
            // An image the dataset listed but cannot decode is left out (training skips it too).
            let mut images = Vec::new();
            for p in style::spread_pick(&paths, STYLE_MAX_IMAGES) {
                match image::open(&p) {
                    Ok(img) => images.push(style::image_stats(&img.to_rgb8())),
                    Err(e) => tracing::warn!("style score: training image {} left out: {e}", p.display()),
                }
            }
            let stats = SetStats::of(&images).context("no readable training image")?;
            Ok((source, found, stats, style::spread_pick(&paths, prompts)))
        });
        match reference {
            Ok(r) => {
                tracing::info!("style reference: {} of {} training images in {:.1} s", r.2.images, r.1, started.elapsed().as_secs_f64());
                ctx.reference = Some(r);
            }
            Err(e) => {
                tracing::warn!("no style score: {e:#}");
                ctx.note = Some(format!("no style score: {e:#}"));
                return ctx;
            }
        }
        match ctx.samples_score(out, base_samples) {
            Ok(s) => ctx.before = Some(s),
            Err(e) => {
                tracing::warn!("no style score for the base model: {e:#}");
                ctx.note = Some(format!("no score before training: {e:#}"));
            }
        }
        ctx
    }

    /// The score of the samples at `paths` (relative to `out`), one for each prompt.
    fn samples_score(&self, out: &Path, paths: &[PathBuf]) -> anyhow::Result<StyleScore> {
        let (_, _, reference, _) = self.reference.as_ref().context("no training images")?;
        if paths.len() < self.prompts {
            anyhow::bail!("{} of {} samples", paths.len(), self.prompts);
        }
        let files: Vec<PathBuf> = paths.iter().map(|p| out.join(p)).collect();
        let samples = style::stats_of_files(&files)?.context("no samples")?;
        Ok(style::score(&samples, reference))
    }

    /// The style of one run: the base model's score and that of the run's samples.
    fn of(&self, out: &Path, r: &StrategyResult) -> Style {
        let mut s = Style { before: self.before, after: None, note: self.note.clone() };
        if self.reference.is_none() {
            return s;
        }
        if r.samples.is_empty() {
            let why = if r.ok() { "no samples" } else { "no samples: the strategy failed" };
            s.note = Some(match s.note {
                Some(n) => format!("{n}; {why}"),
                None => why.into(),
            });
            return s;
        }
        match self.samples_score(out, &r.samples) {
            Ok(score) => {
                tracing::info!("style of `{}`{}: {}", r.name, r.seed.map(|s| format!(" seed {s}")).unwrap_or_default(), style::describe(&score));
                s.after = Some(score);
            }
            Err(e) => {
                tracing::warn!("no style score for `{}`: {e:#}", r.name);
                s.note = Some(format!("no score after training: {e:#}"));
            }
        }
        s
    }
}

/// The training images of the compare config's `[dataset]` (as `graft train` finds them, broken
/// files left out), sorted, and the dataset's name for the report.
fn training_images(config: &CompareConfig) -> anyhow::Result<(String, Vec<PathBuf>)> {
    use graft_trainer::dataset::{Dataset, DatasetConfig, DatasetSpec, OpenOptions, SubsetSpec};
    let d = &config.dataset;
    let (source, ds) = match (&d.config, &d.dir) {
        (Some(file), _) => (file.display().to_string(), DatasetConfig::from_toml_file(file)?),
        (None, Some(dir)) => {
            let spec = DatasetSpec::new(graft_trainer::buckets::Reso { width: d.resolution, height: d.resolution });
            let mut subset = SubsetSpec::new(dir.clone());
            subset.caption_extension = d.caption_extension.clone();
            (dir.display().to_string(), DatasetConfig::from_folder(dir, &spec, &subset)?)
        }
        (None, None) => anyhow::bail!("[dataset] has neither `dir` nor `config`"),
    };
    let dataset = Dataset::open(&ds, &OpenOptions { skip_bad: true, ..Default::default() })
        .with_context(|| format!("reading the training images of {source}"))?;
    let mut paths: Vec<PathBuf> = dataset.items().iter().map(|i| i.path.clone()).collect();
    paths.sort();
    paths.dedup();
    Ok((source, paths))
}

/// The plugin manager of a comparison, watching its folders: a rebuilt strategy plugin is taken
/// up at the next step of a strategy that uses it.
fn watched(args: &PluginDirArgs) -> anyhow::Result<PluginManager> {
    let mut manager = args.manager()?;
    if let Err(e) = manager.watch() {
        tracing::warn!("plugin folders are not watched (rebuilt plugins are not taken up): {e:#}");
    }
    Ok(manager)
}

fn describe_device(device: &candle_core::Device) -> String {
    if device.is_cuda() {
        "CUDA GPU".into()
    } else if device.is_metal() {
        "Metal GPU".into()
    } else {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        format!("CPU, {threads} threads")
    }
}

/// Paths relative to `base` (unchanged when not under it).
fn relative(base: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.iter().map(|p| p.strip_prefix(base).map(Path::to_path_buf).unwrap_or_else(|_| p.clone())).collect()
}

/// Removes `dir` when it is there: files of an earlier comparison would pass for this one's.
fn clear_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    Ok(())
}

/// The row of a strategy trained once per seed: its runs, and the mean ± std of their numbers
/// over the runs that finished (a failed run is named in the row's error).
pub fn aggregate(entry: &StrategyEntry, runs: Vec<StrategyResult>) -> StrategyResult {
    let finished: Vec<&StrategyResult> = runs.iter().filter(|r| r.ok()).collect();
    let stat = |f: fn(&StrategyResult) -> Option<f64>| mean_std(&finished.iter().filter_map(|r| f(r)).collect::<Vec<f64>>());
    let stats = SeedStats {
        final_loss: stat(|r| r.final_loss),
        mean_loss: stat(|r| r.mean_loss),
        eval_loss_start: stat(|r| r.eval_loss_start),
        eval_loss_end: stat(|r| r.eval_loss_end),
        validation_loss: stat(|r| r.validation_loss),
        seconds_per_step: stat(|r| r.seconds_per_step),
        // One base render serves every seed: `before` is a single measurement.
        style_before: runs.iter().find_map(|r| r.style.before).map(|s| StyleStats::of(&[s])),
        style_after: {
            let after: Vec<StyleScore> = finished.iter().filter_map(|r| r.style.after).collect();
            (!after.is_empty()).then(|| StyleStats::of(&after))
        },
    };
    let failures: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let e = r.error.as_ref()?;
            Some(match r.seed {
                Some(seed) => format!("seed {seed} (after {} steps): {e}", r.steps_done),
                None => e.clone(),
            })
        })
        .collect();
    let peak = runs.iter().filter_map(|r| r.peak_memory).max_by_key(|p| p.bytes);
    StrategyResult {
        plugin_version: runs.iter().find_map(|r| r.plugin_version.clone()),
        error: (!failures.is_empty()).then(|| failures.join("\n")),
        layers: runs.iter().find_map(|r| r.layers),
        trainable_params: runs.iter().find_map(|r| r.trainable_params),
        base_params: runs.iter().find_map(|r| r.base_params),
        steps_done: runs.iter().map(|r| r.steps_done).min().unwrap_or(0),
        final_loss: stats.final_loss.map(|m| m.mean),
        mean_loss: stats.mean_loss.map(|m| m.mean),
        eval_loss_start: stats.eval_loss_start.map(|m| m.mean),
        eval_loss_end: stats.eval_loss_end.map(|m| m.mean),
        validation_loss: stats.validation_loss.map(|m| m.mean),
        seconds_per_step: stats.seconds_per_step.map(|m| m.mean),
        seconds_total: runs.iter().map(|r| r.seconds_total).sum(),
        peak_memory: peak.map(|p| Peak { per_strategy: runs.iter().all(|r| r.peak_memory.is_none_or(|p| p.per_strategy)), ..p }),
        adapter_bytes: finished.first().and_then(|r| r.adapter_bytes),
        exports: runs.iter().flat_map(|r| r.exports.iter().cloned()).collect(),
        // The grid shows one run per row: the first seed's.
        samples: runs.first().map(|r| r.samples.clone()).unwrap_or_default(),
        style: row_style(&runs, &stats),
        stats: Some(stats),
        runs,
        ..StrategyResult::new(entry)
    }
}

/// The style of a row of seeds: `before` (the same for every run), `after` the means over the
/// runs that finished (their std is in `stats`), and which runs have no score.
fn row_style(runs: &[StrategyResult], stats: &SeedStats) -> Style {
    let before = runs.iter().find_map(|r| r.style.before);
    let after = stats.style_after.as_ref().and_then(|s| s.means());
    let missing: Vec<String> = runs
        .iter()
        .filter(|r| r.style.after.is_none() || !r.ok())
        .map(|r| format!("seed {}: {}", r.seed.unwrap_or_default(), r.style.note.as_deref().unwrap_or("failed")))
        .collect();
    let note = if after.is_none() && before.is_none() {
        runs.iter().find_map(|r| r.style.note.clone())
    } else if !missing.is_empty() {
        Some(format!("{} of {} runs not scored after training ({})", missing.len(), runs.len(), missing.join("; ")))
    } else {
        None
    };
    Style { before, after, note }
}

/// Runs one strategy (with `seed`: its run of that seed), catching its errors and panics;
/// dropping its trainer takes its base weight overrides out.
fn run_strategy(
    config: &CompareConfig,
    entry: &StrategyEntry,
    seed: Option<u64>,
    model: &Arc<SdxlModel>,
    plugins: &mut Option<PluginManager>,
    plugin_args: &PluginDirArgs,
    prompts: &[SamplePrompt],
) -> StrategyResult {
    let mut result = StrategyResult { seed, ..StrategyResult::new(entry) };
    let meter = PeakMeter::start();
    let started = Instant::now();
    // The session lives out here so that after a panic its plugin manager can be taken back.
    let mut slot: Option<Session> = None;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| train_one(config, entry, seed, model, plugins, prompts, &mut slot, &mut result)));
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(panic) => Some(format!("panicked: {}", panic_message(&panic))),
    };
    if let Some(Session { mut trainer, .. }) = slot.take() {
        *plugins = Some(std::mem::replace(&mut trainer.plugins, PluginManager::new(Vec::new())));
    }
    let mut error = error;
    // Nothing else holds an override: the next strategy starts from the model as loaded.
    let left = model.overridden();
    if !left.is_empty() {
        let e = format!("{} base weights were still overridden after the strategy (e.g. `{}`)", left.len(), left[0]);
        tracing::error!("strategy `{}`: {e}", entry.name());
        error.get_or_insert(e);
    }
    if plugins.is_none() {
        // The manager went down with a trainer that failed to start: find the plugins again.
        match watched(plugin_args) {
            Ok(m) => *plugins = Some(m),
            Err(e) => tracing::error!("cannot reload the plugins: {e:#}"),
        }
    }
    result.error = error;
    result.seconds_total = started.elapsed().as_secs_f64();
    result.peak_memory = meter.finish();
    result
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[allow(clippy::too_many_arguments)]
fn train_one(
    config: &CompareConfig,
    entry: &StrategyEntry,
    seed: Option<u64>,
    model: &Arc<SdxlModel>,
    plugins: &mut Option<PluginManager>,
    prompts: &[SamplePrompt],
    slot: &mut Option<Session>,
    result: &mut StrategyResult,
) -> anyhow::Result<()> {
    let report_dir = &config.output_dir;
    let mut dir = report_dir.join("strategies").join(entry.name());
    let mut samples_dir = report_dir.join("samples");
    if let Some(seed) = seed {
        dir = dir.join(seed_dir(seed));
        samples_dir = samples_dir.join(seed_dir(seed));
    }
    clear_dir(&dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let manager = plugins.as_ref().context("no plugin manager (the plugin folders could not be read)")?;
    // Checked here, while the manager is still ours: an unknown id costs nothing.
    let plugin = manager.require(&entry.plugin)?;
    result.plugin_version = Some(plugin.manifest.version.clone());

    let train_config = config.train_config_seeded(entry, &dir, seed)?;
    let manager = plugins.take().expect("checked above");
    let trainer = Trainer::with_model(train_config, model.clone(), manager)?;
    let progress = Some(match seed {
        Some(seed) => format!("{} seed {seed} training", entry.name()),
        None => format!("{} training", entry.name()),
    });
    let in_run = if config.options.sample_every > 0 { prompts.to_vec() } else { Vec::new() };
    let options = SessionOptions { prompts: in_run, progress, ..Default::default() };
    let session = slot.insert(Session::start(trainer, options)?);
    let trainer = &mut session.trainer;

    let active = &trainer.set.strategies()[trainer.strategy];
    result.layers = Some(active.plan.attachments.len());
    let params = trainer.parameters();
    result.trainable_params = Some(params.iter().map(|(_, v)| v.elem_count() as u64).sum());
    result.base_params = Some(trainer.base_parameter_count());
    result.eval_loss_start = Some(trainer.eval_loss(EVAL_SEED)?);

    let mut observer = Losses { result, window: config.loss_window, seconds: 0.0 };
    match session.run(&mut observer)? {
        Ended::Finished => {}
        Ended::Stopped => anyhow::bail!("stopped by Ctrl-C or SIGTERM at step {}", session.trainer.step),
        Ended::TooManyBad(why) => anyhow::bail!("{why}"),
    }
    let result = observer.result;
    result.eval_loss_end = Some(session.trainer.eval_loss(EVAL_SEED)?);

    if !prompts.is_empty() {
        let paths = session.render(prompts, &samples_dir, entry.name()).context("sampling")?;
        if let Some(e) = session.trainer.set.take_failures().into_iter().next() {
            anyhow::bail!("the strategy failed while sampling: {e}");
        }
        result.samples = relative(report_dir, &paths);
    }

    let exports = export_for(&session.trainer)?;
    let mut bytes = 0;
    for p in &exports {
        bytes += std::fs::metadata(p).with_context(|| format!("{}: cannot read the adapter file", p.display()))?.len();
    }
    result.adapter_bytes = Some(bytes);
    result.exports = relative(report_dir, &exports);
    Ok(())
}

/// The folder of one seed's run, under the strategy's folder and under `samples/`.
pub fn seed_dir(seed: u64) -> String {
    format!("seed-{seed}")
}

/// Keeps a strategy's losses and timings in its result as the steps come.
struct Losses<'a> {
    result: &'a mut StrategyResult,
    window: u64,
    seconds: f64,
}

impl Observer for Losses<'_> {
    fn on_step(&mut self, trainer: &Trainer, record: &StepRecord) {
        let r = &mut *self.result;
        r.losses.push(record.clone().into());
        r.steps_done = trainer.step;
        self.seconds += record.seconds;
        r.seconds_per_step = Some(self.seconds / trainer.step as f64);
        r.final_loss = Some(record.loss);
        r.mean_loss = mean_last(&r.losses, self.window);
        if record.val_loss.is_some() {
            r.validation_loss = record.val_loss;
        }
    }
}

/// The mean of the finite losses of the last `window` steps.
pub fn mean_last(losses: &[LossEntry], window: u64) -> Option<f64> {
    let tail = &losses[losses.len().saturating_sub(window as usize)..];
    let finite: Vec<f64> = tail.iter().filter(|e| !e.skipped && e.loss.is_finite()).map(|e| e.loss).collect();
    (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u64, loss: f64) -> LossEntry {
        LossEntry { step, loss, lr: 1e-4, grad_norm: 1.0, skipped: !loss.is_finite(), time: 0.1, ..Default::default() }
    }

    #[test]
    fn mean_of_the_last_steps() {
        let l: Vec<LossEntry> = [4.0, 3.0, f64::NAN, 1.0].iter().enumerate().map(|(i, &v)| entry(i as u64, v)).collect();
        assert_eq!(mean_last(&l, 3), Some(2.0));
        assert_eq!(mean_last(&l, 1), Some(1.0));
        assert_eq!(mean_last(&l, 100), Some(8.0 / 3.0));
        assert_eq!(mean_last(&[], 5), None);
        assert_eq!(mean_last(&l[2..3], 5), None);
    }
}
