//! Training and compare runs: a queue served by one worker thread, one run at a time. A run
//! does not depend on any browser: it goes on until it ends or is stopped.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::compare::config::CompareConfig;
use crate::serve::state::{lock, App};
use graft_trainer::config::TrainConfig;
use graft_trainer::session::{Ended, Observer, Session, SessionOptions};
use graft_trainer::trainer::{Pause, StepRecord, Trainer};

/// Pause and stop requests from the API to a running job.
#[derive(Debug, Default)]
pub struct Control {
    pub paused: AtomicBool,
    pub stop: AtomicBool,
}

/// What a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Train,
    Compare,
}

/// Where a job is. `stopping`: asked to stop, saving what it trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Paused,
    Stopping,
    Done,
    Stopped,
    Failed,
}

impl JobStatus {
    /// Queued or not finished yet.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Queued | Self::Running | Self::Paused | Self::Stopping)
    }

    /// Taken by the worker and not finished yet.
    pub fn is_running(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Stopping)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Done => "done",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// The validation loss measured after this step, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The strategy's stage that begins at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
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
    pub kind: JobKind,
    pub name: String,
    pub status: JobStatus,
    pub step: u64,
    pub total: u64,
    pub lr: Option<f64>,
    pub loss: Option<f64>,
    /// The last validation loss (runs with validation data).
    pub val_loss: Option<f64>,
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

/// Queues a job under an id from [`JobBook::next_id`]; returns its info.
// The job record's fields, one argument each: a struct for them would only repeat `JobInfo`.
#[allow(clippy::too_many_arguments)]
pub fn enqueue(
    app: &App,
    id: u64,
    kind: JobKind,
    name: &str,
    output_dir: PathBuf,
    total: u64,
    plugin: Option<String>,
    spec: JobSpec,
) -> JobInfo {
    let mut book = lock(&app.jobs);
    let info = JobInfo {
        id,
        kind,
        name: name.into(),
        status: JobStatus::Queued,
        step: 0,
        total,
        lr: None,
        loss: None,
        val_loss: None,
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
    let pool = crate::runtime::pool_builder()
        .thread_name(|i| format!("graft-serve-jobs-{i}"))
        .build()
        .map_err(|e| tracing::warn!("no thread pool for the jobs ({e}); they run on the jobs thread"))
        .ok();
    let _ = std::thread::Builder::new().name("graft-serve-jobs".into()).spawn(move || loop {
        let (id, spec, control) = {
            let mut book = lock(&app.jobs);
            loop {
                if let Some(j) = book.jobs.iter_mut().find(|j| j.info.status == JobStatus::Queued) {
                    j.info.status = JobStatus::Running;
                    break (j.info.id, j.spec.clone(), j.control.clone());
                }
                book = app.wake.wait(book).unwrap_or_else(|e| e.into_inner());
            }
        };
        update(&app, id, |_| {});
        let job = || match &spec {
            JobSpec::Train { config } => run_train(&app, id, &control, config.clone()),
            JobSpec::Compare { config } => run_compare(&app, id, config),
        };
        // On a worker of a pool of the jobs' own (see `runtime::on_worker`): between steps a job
        // waits for the compute lock, and a generate request that holds it must then still find
        // a free worker in the global pool.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| match &pool {
            Some(pool) => pool.install(job),
            None => job(),
        }));
        // The run's trainer is gone, and its base weight overrides with it.
        if let Some(model) = &app.model {
            let left = model.overridden();
            if !left.is_empty() {
                tracing::error!("job {id}: {} base weights are still overridden after the run (e.g. `{}`)", left.len(), left[0]);
            }
        }
        let (status, error) = match result {
            Ok(Ok(())) if control.stop.load(Ordering::SeqCst) => (JobStatus::Stopped, None),
            Ok(Ok(())) => (JobStatus::Done, None),
            Ok(Err(e)) => (JobStatus::Failed, Some(format!("{e:#}"))),
            Err(_) => (JobStatus::Failed, Some("the run panicked (see the server log)".to_string())),
        };
        if let Some(e) = &error {
            tracing::error!("job {id} failed: {e}");
        }
        update(&app, id, |info| {
            info.status = status;
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
    let trainer = {
        let _g = lock(&app.compute);
        Trainer::with_model(config, model, plugins)?
    };
    let options = SessionOptions { prompts, pause_on_failure: watching, ..Default::default() };
    let mut session = Session::start(trainer, options)?;
    let out = session.trainer.config.output_dir.clone();
    let mut observer = JobObserver { app, id, control, out, recent: Vec::new() };
    let ended = session.run(&mut observer);
    // What was trained is kept, also when stopped part way or failed.
    let (exports, result) = match ended {
        Ok(Ended::Finished) => (session.finish(&observer)?, Ok(())),
        Ok(Ended::Stopped) => {
            let saved = session.save_stopped(None, &observer);
            if !saved.problems.is_empty() && session.trainer.step > 0 {
                let problems = saved.problems.join("; ");
                anyhow::bail!("the run was stopped at step {}, but not everything was saved: {problems}", session.trainer.step);
            }
            (saved.exports, Ok(()))
        }
        Ok(ref bad @ Ended::TooManyBad(ref why)) => {
            let saved = session.save_stopped(Some(bad), &observer);
            (saved.exports.clone(), Err(anyhow::anyhow!("{why}; saved {}", saved.describe())))
        }
        Err(e) => {
            let saved = session.save_stopped(None, &observer);
            (saved.exports.clone(), Err(anyhow::Error::from(e).context(format!("saved {}", saved.describe()))))
        }
    };
    let names: Vec<String> = exports.iter().map(|p| p.display().to_string()).collect();
    update(app, id, |i| i.exports = names);
    result
}

/// A serve training job as the session sees it: stop and pause come from the API, the model is
/// shared with generate requests (the compute lock), and every step and sample is sent to the
/// browser.
struct JobObserver<'a> {
    app: &'a App,
    id: u64,
    control: &'a Control,
    /// The run's output folder (file URLs are relative to it).
    out: PathBuf,
    /// The last steps' durations, for the speed shown.
    recent: Vec<f64>,
}

impl Observer for JobObserver<'_> {
    fn stop_requested(&self) -> bool {
        self.control.stop.load(Ordering::SeqCst)
    }

    fn paused(&self) -> bool {
        self.control.paused.load(Ordering::SeqCst)
    }

    fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = lock(&self.app.compute);
        f()
    }

    fn on_step(&mut self, trainer: &Trainer, record: &StepRecord) {
        let (app, id) = (self.app, self.id);
        self.recent.push(record.seconds);
        if self.recent.len() > 10 {
            self.recent.remove(0);
        }
        let mean = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        let it_per_s = if mean > 0.0 { Some(1.0 / mean) } else { None };
        let (step, total) = (trainer.step, trainer.config.options.steps);
        app.emit(
            "train.step",
            json!({ "id": id, "step": step, "total": total, "loss": finite(record.loss), "lr": record.lr,
                    "grad_norm": finite(record.grad_norm), "skipped": record.skipped, "it_per_s": it_per_s,
                    "val_loss": record.val_loss.and_then(finite), "stage": record.stage }),
        );
        let mut book = lock(&app.jobs);
        if let Some(job) = book.get_mut(id) {
            let i = &mut job.info;
            i.step = step;
            i.lr = Some(record.lr);
            i.it_per_s = it_per_s;
            let val_loss = record.val_loss.filter(|v| v.is_finite());
            if val_loss.is_some() {
                i.val_loss = val_loss;
            }
            if record.loss.is_finite() {
                i.loss = Some(record.loss);
                i.losses.push(LossPoint { step, loss: record.loss, lr: record.lr, val_loss, stage: record.stage.clone() });
            }
        }
    }

    fn on_samples(&mut self, step: u64, paths: &[PathBuf]) {
        let (app, id) = (self.app, self.id);
        let urls: Vec<String> = paths.iter().map(|p| file_url(id, &self.out, p)).collect();
        update(app, id, |i| i.samples.extend(urls.iter().map(|u| SampleImage { step, url: u.clone() })));
        app.emit("train.sample", json!({ "id": id, "step": step, "urls": urls }));
    }

    fn on_wait(&mut self, pause: Option<&Pause>) {
        let (app, id) = (self.app, self.id);
        match pause {
            Some(p) => {
                let message = p.message();
                update(app, id, |i| i.waiting = Some(message.clone()));
                app.emit("train.waiting", json!({ "id": id, "step": p.step, "message": message }));
            }
            None => update(app, id, |i| i.waiting = None),
        }
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn run_compare(app: &App, id: u64, config: &CompareConfig) -> anyhow::Result<()> {
    let mut outcome = crate::compare::run::run(
        config,
        &crate::compare::run::RunOptions { plugins: app.plugin_args.clone(), device: graft_runtime::device::pick(app.cpu)? },
    )?;
    crate::compare::report::write(&mut outcome)?;
    let url = format!("/api/jobs/{id}/files/{}", crate::compare::report::REPORT_HTML);
    update(app, id, |i| {
        i.step = i.total;
        i.report_url = Some(url);
    });
    Ok(())
}
