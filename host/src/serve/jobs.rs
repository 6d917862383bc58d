//! Training and compare runs: a queue served by one worker thread, one run at a time. A run
//! does not depend on any browser: it goes on until it ends or is stopped.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::compare::config::CompareConfig;
use crate::serve::state::{lock, App};
use crate::train::config::TrainConfig;
use crate::train::samples::render_samples;
use crate::train::trainer::{StepOutcome, Trainer};
use crate::train::losslog;

/// Pause and stop requests from the API to a running job.
#[derive(Debug, Default)]
pub struct Control {
    pub paused: AtomicBool,
    pub stop: AtomicBool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleImage {
    pub step: u64,
    pub url: String,
}

/// What the API shows of a job.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: u64,
    /// `train` or `compare`.
    pub kind: String,
    pub name: String,
    /// queued, running, paused, stopping, done, stopped, failed.
    pub status: String,
    pub step: u64,
    pub total: u64,
    pub lr: Option<f64>,
    pub loss: Option<f64>,
    pub it_per_s: Option<f64>,
    pub losses: Vec<LossPoint>,
    pub samples: Vec<SampleImage>,
    pub exports: Vec<String>,
    pub error: Option<String>,
    /// Set while a training run is paused because its strategy failed: why, and the plugin file
    /// whose rebuild it waits for (the run goes on by itself once the rebuild is taken up).
    pub waiting: Option<String>,
    pub output_dir: String,
    /// The compare report (compare jobs, once done).
    pub report_url: Option<String>,
    pub plugin: Option<String>,
    pub created: f64,
}

/// What a job runs.
#[derive(Debug, Clone)]
pub enum JobSpec {
    Train { config: TrainConfig },
    Compare { config: CompareConfig },
}

pub struct Job {
    pub info: JobInfo,
    pub control: Arc<Control>,
    pub spec: JobSpec,
}

#[derive(Default)]
pub struct JobBook {
    pub jobs: Vec<Job>,
    next_id: u64,
}

impl JobBook {
    pub fn get(&self, id: u64) -> Option<&Job> {
        self.jobs.iter().find(|j| j.info.id == id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.info.id == id)
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Folder-safe version of a run name.
pub fn safe_name(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if s.is_empty() { "run".into() } else { s }
}

/// Queues a job under an id from [`JobBook::next_id`]; returns its info.
// The job record's fields, one argument each: a struct for them would only repeat `JobInfo`.
#[allow(clippy::too_many_arguments)]
pub fn enqueue(app: &App, id: u64, kind: &str, name: &str, output_dir: PathBuf, total: u64, plugin: Option<String>, spec: JobSpec) -> JobInfo {
    let mut book = lock(&app.jobs);
    let info = JobInfo {
        id,
        kind: kind.into(),
        name: name.into(),
        status: "queued".into(),
        step: 0,
        total,
        lr: None,
        loss: None,
        it_per_s: None,
        losses: Vec::new(),
        samples: Vec::new(),
        exports: Vec::new(),
        error: None,
        waiting: None,
        output_dir: output_dir.display().to_string(),
        report_url: None,
        plugin,
        created: now(),
    };
    book.jobs.push(Job { info: info.clone(), control: Arc::new(Control::default()), spec });
    drop(book);
    app.wake.notify_all();
    app.emit("job", serde_json::to_value(&info).unwrap_or_default());
    info
}

/// Changes a job's info and tells the listeners.
pub fn update(app: &App, id: u64, f: impl FnOnce(&mut JobInfo)) {
    let info = {
        let mut book = lock(&app.jobs);
        let Some(job) = book.get_mut(id) else { return };
        f(&mut job.info);
        job.info.clone()
    };
    app.emit("job", serde_json::to_value(&info).unwrap_or_default());
}

/// The worker: takes the oldest queued job, runs it, repeats.
pub fn start_worker(app: Arc<App>) {
    let _ = std::thread::Builder::new().name("graft-serve-jobs".into()).spawn(move || loop {
        let (id, spec, control) = {
            let mut book = lock(&app.jobs);
            loop {
                if let Some(j) = book.jobs.iter_mut().find(|j| j.info.status == "queued") {
                    j.info.status = "running".into();
                    break (j.info.id, j.spec.clone(), j.control.clone());
                }
                book = app.wake.wait(book).unwrap_or_else(|e| e.into_inner());
            }
        };
        update(&app, id, |_| {});
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| match &spec {
            JobSpec::Train { config } => run_train(&app, id, &control, config.clone()),
            JobSpec::Compare { config } => run_compare(&app, id, config),
        }));
        // A strategy may have unfrozen or folded into the shared base weights.
        if let Some(s) = &app.snapshot {
            let _g = lock(&app.compute);
            s.restore();
        }
        let (status, error) = match result {
            Ok(Ok(())) if control.stop.load(Ordering::SeqCst) => ("stopped", None),
            Ok(Ok(())) => ("done", None),
            Ok(Err(e)) => ("failed", Some(format!("{e:#}"))),
            Err(_) => ("failed", Some("the run panicked (see the server log)".to_string())),
        };
        if let Some(e) = &error {
            tracing::error!("job {id} failed: {e}");
        }
        update(&app, id, |info| {
            info.status = status.into();
            info.error = error;
            info.waiting = None;
        });
    });
}

fn file_url(id: u64, out: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(out).unwrap_or(path);
    let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    format!("/api/jobs/{id}/files/{}", rel.join("/"))
}

fn run_train(app: &App, id: u64, control: &Control, config: TrainConfig) -> anyhow::Result<()> {
    let model = app.model.clone().context("no model is loaded (start the server with --model)")?;
    let prompts = config.sample_prompts_to_render()?;
    let mut plugins = app.plugin_args.manager()?;
    // A rebuilt strategy plugin is taken up between steps; a failing strategy then pauses the
    // run until its rebuild (without the watcher no rebuild would come: steps are skipped).
    let watching = match plugins.watch() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("job {id}: plugin folders are not watched: {e:#}");
            false
        }
    };
    let out = config.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create output folder {}", out.display()))?;
    let mut trainer = {
        let _g = lock(&app.compute);
        Trainer::with_model(config, model, plugins)?
    };
    let log_path = out.join("loss.jsonl");
    let result = train_steps(app, id, control, &mut trainer, watching, &prompts, &log_path);
    if let Err(e) = &result {
        if e.downcast_ref::<TooManyBad>().is_some() {
            // The skipped steps changed no parameter: save the state right after the last good step.
            trainer.rewind_to_last_good();
        }
    }
    // What was trained is kept, also when stopped part way or failed.
    if trainer.step > 0 {
        let saved = {
            let _g = lock(&app.compute);
            crate::train::command::save_on_stop(&trainer)
        };
        if let Ok(entries) = losslog::read(&log_path) {
            if let Err(e) = losslog::plot_loss_png(&entries, &out.join("loss.png")) {
                tracing::warn!("job {id}: no loss plot: {e:#}");
            }
        }
        let names: Vec<String> = saved.exports.iter().map(|p| p.display().to_string()).collect();
        update(app, id, |i| i.exports = names);
        if result.is_err() {
            return result.context(format!("saved {}", saved.describe()));
        }
        if !saved.problems.is_empty() {
            anyhow::bail!("the run ended at step {}, but not everything was saved: {}", trainer.step, saved.problems.join("; "));
        }
    }
    result
}

/// The error of a run stopped by too many bad steps in a row.
#[derive(Debug)]
struct TooManyBad(String);

impl std::fmt::Display for TooManyBad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooManyBad {}

/// The steps of a serve training run, until its end, a stop request or an error.
fn train_steps(
    app: &App,
    id: u64,
    control: &Control,
    trainer: &mut Trainer,
    watching: bool,
    prompts: &[crate::train::samples::SamplePrompt],
    log_path: &Path,
) -> anyhow::Result<()> {
    let out = trainer.config.output_dir.clone();
    let mut log = losslog::LossLog::create(log_path)?;
    let total = trainer.config.steps;
    let mut recent: Vec<f64> = Vec::new();
    while trainer.step < total {
        if control.stop.load(Ordering::SeqCst) {
            break;
        }
        if control.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        trainer.poll_reloads()?;
        let outcome = {
            let _g = lock(&app.compute);
            if watching { trainer.step_or_pause()? } else { StepOutcome::Trained(trainer.train_step()?) }
        };
        let record = match outcome {
            StepOutcome::Trained(r) => r,
            StepOutcome::Paused(p) => {
                let message = p.message();
                update(app, id, |i| i.waiting = Some(message.clone()));
                app.emit("train.waiting", json!({ "id": id, "step": p.step, "message": message }));
                let resumed = trainer.wait_for_rebuild(&|| control.stop.load(Ordering::SeqCst))?;
                update(app, id, |i| i.waiting = None);
                if !resumed {
                    break;
                }
                continue;
            }
        };
        log.append(&record.clone().into())?;
        recent.push(record.seconds);
        if recent.len() > 10 {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f64>() / recent.len() as f64;
        let it_per_s = if mean > 0.0 { Some(1.0 / mean) } else { None };
        let step = trainer.step;
        app.emit(
            "train.step",
            json!({ "id": id, "step": step, "total": total, "loss": finite(record.loss), "lr": record.lr,
                    "grad_norm": finite(record.grad_norm), "skipped": record.skipped, "it_per_s": it_per_s }),
        );
        {
            let mut book = lock(&app.jobs);
            if let Some(job) = book.get_mut(id) {
                let i = &mut job.info;
                i.step = step;
                i.lr = Some(record.lr);
                i.it_per_s = it_per_s;
                if record.loss.is_finite() {
                    i.loss = Some(record.loss);
                    i.losses.push(LossPoint { step, loss: record.loss, lr: record.lr });
                }
            }
        }
        if trainer.bad_in_row >= trainer.config.max_bad_steps {
            return Err(TooManyBad(format!(
                "stopped at step {step}: {} steps in a row were skipped ({})",
                trainer.bad_in_row,
                trainer.skip_reason()
            ))
            .into());
        }
        if !prompts.is_empty() && step.is_multiple_of(trainer.config.sample_every) {
            let paths = {
                let _g = lock(&app.compute);
                trainer.set.set_training(false);
                let dir = out.join("samples");
                let r = render_samples(&trainer.model, &trainer.set, prompts, &dir, &format!("step{step:06}"));
                trainer.set.set_training(true);
                r?
            };
            let urls: Vec<String> = paths.iter().map(|p| file_url(id, &out, p)).collect();
            update(app, id, |i| i.samples.extend(urls.iter().map(|u| SampleImage { step, url: u.clone() })));
            app.emit("train.sample", json!({ "id": id, "step": step, "urls": urls }));
        }
    }
    log.sync()?;
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn run_compare(app: &App, id: u64, config: &CompareConfig) -> anyhow::Result<()> {
    let mut outcome = crate::compare::run::run(
        config,
        &crate::compare::run::RunOptions { plugins: app.plugin_args.clone(), device: crate::device::pick(app.cpu)? },
    )?;
    crate::compare::report::write(&mut outcome)?;
    let url = format!("/api/jobs/{id}/files/{}", crate::compare::report::REPORT_HTML);
    update(app, id, |i| {
        i.step = i.total;
        i.report_url = Some(url);
    });
    Ok(())
}
