//! One training session: the step loop that `graft train`, `graft compare` and `graft serve`
//! all drive, with its loss log, checkpoints, sample images, hot reload and the stop rules.
//!
//! What differs between the three is an [`Observer`] (how a stop or a pause is asked for, what
//! is shown after a step, whether the model is shared with other work) and [`SessionOptions`];
//! the loop itself, and what every option of [`TrainConfig`] means, is the same everywhere.
//!
//! [`TrainConfig`]: crate::config::TrainConfig

use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::ProgressBar;

use crate::error::{io, At, Result};
use crate::losslog::{self, LossLog};
use crate::samples::{render_samples, SamplePrompt};
use crate::trainer::{Pause, StepOutcome, StepRecord, Trainer};
use crate::{checkpoint, export};

/// How a session is run (the rest comes from the trainer's config).
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Rendered every `sample_every` steps; empty: no samples during the run.
    pub prompts: Vec<SamplePrompt>,
    /// A failing strategy pauses the run until a rebuild of its plugin is taken up (watch mode)
    /// instead of skipping steps until `max_bad_steps`.
    pub pause_on_failure: bool,
    /// Continue from the latest checkpoint in the output folder.
    pub resume: bool,
    /// The progress bar's label; `None`: no bar.
    pub progress: Option<String>,
}

/// What a driver is told during the loop, and how it asks for a stop or a pause.
pub trait Observer {
    /// True when the run should stop after the step in progress (and save).
    fn stop_requested(&self) -> bool {
        graft_runtime::stop::requested()
    }
    /// True while the run should wait between steps.
    fn paused(&self) -> bool {
        false
    }
    /// Runs `f`, which uses the model, with the model to itself: `graft serve` shares it with
    /// generate requests.
    fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
    /// A step was done (trained or skipped).
    fn on_step(&mut self, _trainer: &Trainer, _record: &StepRecord) {}
    /// Sample images of `step` were written.
    fn on_samples(&mut self, _step: u64, _paths: &[PathBuf]) {}
    /// The strategy failed and the run waits for a rebuild (`Some`), or goes on (`None`).
    fn on_wait(&mut self, _pause: Option<&Pause>) {}
}

/// An observer that only reads the Ctrl-C flag (`graft train`, `graft compare`).
pub struct Quiet;

impl Observer for Quiet {}

/// How the step loop ended without an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// Every step of the config was done.
    Finished,
    /// A stop was asked for (Ctrl-C, serve's stop).
    Stopped,
    /// Too many bad steps in a row; why.
    TooManyBad(String),
}

/// A trainer with its loss log and what the run wrote so far.
pub struct Session {
    pub trainer: Trainer,
    options: SessionOptions,
    log: LossLog,
    log_path: PathBuf,
    bar: Option<ProgressBar>,
    /// Every step of this session (a resumed run: from the resumed step on).
    pub records: Vec<StepRecord>,
    pub samples: Vec<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
}

impl Session {
    /// Opens the output folder and the loss log (after resuming, when asked: the log keeps the
    /// entries of the steps done).
    pub fn start(mut trainer: Trainer, options: SessionOptions) -> Result<Self> {
        let out = trainer.config.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(io(format!("cannot create output folder {}", out.display()), &out))?;
        let mut last_checkpoint = None;
        if options.resume {
            match checkpoint::latest(&out)? {
                Some(dir) => {
                    checkpoint::load(&mut trainer, &dir)?;
                    tracing::info!("resumed from {} at step {}", dir.display(), trainer.step);
                    last_checkpoint = Some(dir);
                }
                None => tracing::warn!("resume: no checkpoint in {}; starting from step 0", out.display()),
            }
        }
        let log_path = out.join("loss.jsonl");
        let log = LossLog::open(&log_path, trainer.step)?;
        let bar = options.progress.as_ref().map(|label| {
            let bar = graft_runtime::progress::bar(trainer.config.options.steps, label);
            bar.set_position(trainer.step);
            bar
        });
        Ok(Self { trainer, options, log, log_path, bar, records: Vec::new(), samples: Vec::new(), last_checkpoint })
    }

    /// The steps, with checkpoints every `save_every` good steps and samples every
    /// `sample_every`, until the end, a stop, too many bad steps in a row, or an error. A
    /// rebuilt strategy plugin is taken up between steps.
    pub fn run(&mut self, obs: &mut impl Observer) -> Result<Ended> {
        let ended = self.steps(obs);
        if let Some(bar) = &self.bar {
            match ended {
                Ok(Ended::Finished) => bar.finish_and_clear(),
                _ => bar.abandon(),
            }
        }
        self.log.sync()?;
        ended
    }

    fn steps(&mut self, obs: &mut impl Observer) -> Result<Ended> {
        let total = self.trainer.config.options.steps;
        while self.trainer.step < total {
            if obs.stop_requested() {
                return Ok(Ended::Stopped);
            }
            if obs.paused() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            self.trainer.poll_reloads()?;
            let pause_on_failure = self.options.pause_on_failure;
            let trainer = &mut self.trainer;
            let outcome = obs.exclusive(|| trainer.advance(pause_on_failure));
            let mut record = match outcome.at(|| format!("at step {}", self.trainer.step))? {
                StepOutcome::Trained(r) => r,
                StepOutcome::Paused(p) => {
                    if let Some(bar) = &self.bar {
                        bar.set_message(format!("paused: waiting for a rebuild of {}", p.plugin_file.display()));
                    }
                    obs.on_wait(Some(&p));
                    let resumed = self.trainer.wait_for_rebuild(&|| obs.stop_requested())?;
                    obs.on_wait(None);
                    if !resumed {
                        return Ok(Ended::Stopped);
                    }
                    continue;
                }
            };
            // The validation loss goes on the entry of the step after which it was measured.
            if self.trainer.validation.as_ref().is_some_and(|v| v.due(self.trainer.step, total)) {
                let trainer = &mut self.trainer;
                record.val_loss = obs.exclusive(|| trainer.validate()).at(|| format!("validation after step {}", self.trainer.step))?;
            }
            self.log.append(&record.clone().into())?;
            if let Some(bar) = &self.bar {
                bar.set_position(self.trainer.step);
                bar.set_message(format!("{} loss {:.4} lr {:.2e}", self.label(), record.loss, record.lr));
            }
            obs.on_step(&self.trainer, &record);
            self.records.push(record);
            let t = &self.trainer;
            if t.bad_in_row >= t.config.options.max_bad_steps {
                return Ok(Ended::TooManyBad(format!(
                    "stopped at step {}: {} steps in a row were skipped ({})",
                    t.step,
                    t.bad_in_row,
                    t.skip_reason()
                )));
            }
            let step = t.step;
            // Checkpoints are taken after good steps only: the last one is always a good one.
            let good = t.bad_in_row == 0;
            if good && t.config.options.save_every > 0 && step.is_multiple_of(t.config.options.save_every) && step < total {
                let trainer = &self.trainer;
                self.last_checkpoint = Some(obs.exclusive(|| checkpoint::save(trainer))?);
            }
            if !self.options.prompts.is_empty()
                && self.trainer.config.options.sample_every > 0
                && step.is_multiple_of(self.trainer.config.options.sample_every)
            {
                let paths = obs.exclusive(|| self.sample(&format!("step{step:06}")))?;
                obs.on_samples(step, &paths);
                self.samples.extend(paths);
            }
        }
        Ok(Ended::Finished)
    }

    fn label(&self) -> &str {
        self.options.progress.as_deref().unwrap_or("training")
    }

    /// The session's prompts into `output_dir/samples`, files named `{stem}-...`.
    fn sample(&mut self, stem: &str) -> Result<Vec<PathBuf>> {
        let dir = self.trainer.config.output_dir.join("samples");
        render_now(&mut self.trainer, &self.options.prompts, &dir, stem)
    }

    /// After [`Ended::Finished`]: the last checkpoint (unless this step has one), the adapter
    /// files and the loss chart. Returns the adapter files.
    pub fn finish(&mut self, obs: &impl Observer) -> Result<Vec<PathBuf>> {
        let t = &self.trainer;
        if self.last_checkpoint.as_ref().is_none_or(|p| !p.ends_with(format!("step-{:06}", t.step))) {
            self.last_checkpoint = Some(obs.exclusive(|| checkpoint::save(t))?);
        }
        let exports = obs.exclusive(|| export_for(t))?;
        self.plot_losses()?;
        Ok(exports)
    }

    /// After a stop, too many bad steps or an error: saves what was trained ([`save_on_stop`];
    /// after bad steps, the state right after the last good step) and draws the loss chart.
    pub fn save_stopped(&mut self, ended: Option<&Ended>, obs: &impl Observer) -> StopSave {
        if matches!(ended, Some(Ended::TooManyBad(_))) {
            // The skipped steps changed no parameter: save the state right after the last good step.
            let undone = self.trainer.rewind_to_last_good();
            tracing::info!("{undone} skipped steps undone: saving the state after step {}", self.trainer.step);
        }
        let saved = obs.exclusive(|| save_on_stop(&self.trainer));
        if self.trainer.step > 0 {
            if let Err(e) = self.plot_losses() {
                tracing::warn!("no loss chart: {e:#}");
            }
        }
        saved
    }

    fn plot_losses(&self) -> Result<()> {
        let out = self.trainer.config.output_dir.join("loss.png");
        losslog::plot_loss_png(&losslog::read(&self.log_path)?, &out)
    }

    /// Renders the session's prompts now, as `stem`, into `dir` (compare's end-of-run samples).
    pub fn render(&mut self, prompts: &[SamplePrompt], dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
        render_now(&mut self.trainer, prompts, dir, stem)
    }
}

/// Renders `prompts` with the adapters as trained now (dropout off for the images, back on after).
fn render_now(t: &mut Trainer, prompts: &[SamplePrompt], dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    t.set.set_training(false);
    let paths = render_samples(&t.model, &t.set, prompts, dir, stem);
    t.set.set_training(true);
    paths
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

/// Writes the adapter files of a trainer's strategy into its output folder.
pub fn export_for(trainer: &Trainer) -> Result<Vec<PathBuf>> {
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
