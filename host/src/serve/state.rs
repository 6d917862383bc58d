//! What the server holds, and the event channel the UI listens to.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use graft_sdxl::SdxlModel;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::plugins::PluginDirArgs;
use crate::serve::gen::GenRecord;
use crate::serve::jobs::JobBook;
use crate::serve::ServeArgs;
use graft_runtime::plugins::{FileStatus, PluginManager, ReloadEvent};

/// One server-sent event: its name and JSON data.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: String,
    pub data: Value,
}

/// How many recent plugin messages the panel keeps.
const PLUGIN_LOG: usize = 50;

pub struct App {
    pub model: Option<Arc<SdxlModel>>,
    pub model_path: Option<PathBuf>,
    pub model_config: Option<PathBuf>,
    /// Held for each training step, sample and image: one piece of model work at a time. A
    /// generate request sets a run's base weight overrides aside while it holds it
    /// ([`SdxlModel::as_loaded`]).
    pub compute: Mutex<()>,
    pub plugin_args: PluginDirArgs,
    pub plugins: Mutex<PluginManager>,
    pub plugin_log: Mutex<Vec<String>>,
    pub events: broadcast::Sender<Event>,
    pub jobs: Mutex<JobBook>,
    /// Wakes the job worker when a job is queued.
    pub wake: Condvar,
    pub work_dir: PathBuf,
    pub lora_dirs: Vec<PathBuf>,
    pub history: Mutex<Vec<GenRecord>>,
    pub cpu: bool,
    pub device: String,
}

/// Locks a mutex, taking it over from a thread that panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    pub fn new(args: &ServeArgs) -> anyhow::Result<Arc<Self>> {
        for d in &args.lora_dirs {
            if !d.is_dir() {
                anyhow::bail!("--lora-dir {}: not a folder", d.display());
            }
        }
        std::fs::create_dir_all(&args.work_dir).with_context(|| format!("cannot create the work folder {}", args.work_dir.display()))?;
        let work_dir = args.work_dir.canonicalize()?;
        let device = graft_runtime::device::pick(args.cpu)?;
        let model = match &args.model {
            Some(path) => {
                let started = std::time::Instant::now();
                let m = SdxlModel::load_as(path, args.model_config.as_deref(), &device, args.dtype)
                    .with_context(|| format!("loading model {}", path.display()))?;
                tracing::info!("loaded {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
                Some(Arc::new(m))
            }
            None => None,
        };
        let mut plugins = args.plugins.manager()?;
        if let Err(e) = plugins.watch() {
            tracing::warn!("plugin folders are not watched: {e:#}");
        }
        let (events, _) = broadcast::channel(1024);
        let device_name = if device.is_cuda() {
            "CUDA GPU"
        } else if device.is_metal() {
            "Metal GPU"
        } else {
            "CPU"
        };
        Ok(Arc::new(Self {
            model,
            model_path: args.model.clone(),
            model_config: args.model_config.clone(),
            compute: Mutex::new(()),
            plugin_args: args.plugins.clone(),
            plugins: Mutex::new(plugins),
            plugin_log: Mutex::new(Vec::new()),
            events,
            jobs: Mutex::new(JobBook::default()),
            wake: Condvar::new(),
            work_dir,
            lora_dirs: args.lora_dirs.clone(),
            history: Mutex::new(Vec::new()),
            cpu: args.cpu,
            device: device_name.into(),
        }))
    }

    /// Sends an event to every listener (none listening is fine).
    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.events.send(Event { event: event.into(), data });
    }

    /// The plugin panel's data: every library file seen, with its status.
    pub fn plugins_json(&self) -> Value {
        let manager = lock(&self.plugins);
        let files: Vec<Value> = manager
            .files()
            .values()
            .map(|f| {
                let (status, error) = match &f.status {
                    FileStatus::Active => ("active".to_string(), None),
                    FileStatus::Shadowed { by } => ("shadowed".to_string(), Some(format!("shadowed by {}", by.display()))),
                    FileStatus::Failed(e) => (e.status().to_string(), Some(e.to_string())),
                    FileStatus::Removed => ("removed".to_string(), None),
                };
                let p = f.plugin.as_ref();
                json!({
                    "path": f.path.display().to_string(),
                    "status": status,
                    "error": error,
                    "id": p.map(|p| p.manifest.id.clone()),
                    "version": p.map(|p| p.manifest.version.clone()),
                    "abi_version": p.map(|p| p.manifest.abi_version),
                    "description": p.map(|p| p.manifest.description.clone()),
                    "capabilities": p.map(|p| p.manifest.capabilities.clone()),
                    "config_example": p.map(|p| p.manifest.config_example.clone()),
                    // Every key of the configuration (docs/PLUGINS.md, "Config schema"); null
                    // when the plugin has none. The UI draws its settings form from it.
                    "config_schema": p.and_then(|p| p.config_schema.clone()),
                    "sha256": p.map(|p| p.sha256.clone()),
                    "generation": p.map(|p| p.generation),
                })
            })
            .collect();
        let dirs: Vec<String> = manager.dirs().iter().map(|d| d.path.display().to_string()).collect();
        let active: Vec<String> = manager.plugins().map(|p| p.manifest.id.clone()).collect();
        json!({
            "dirs": dirs,
            "active": active,
            "watching": manager.is_watching(),
            "files": files,
            "log": lock(&self.plugin_log).clone(),
        })
    }

    fn record_plugin_events(&self, events: &[ReloadEvent]) {
        let mut log = lock(&self.plugin_log);
        for e in events {
            log.push(e.to_string());
        }
        let extra = log.len().saturating_sub(PLUGIN_LOG);
        log.drain(..extra);
    }

    /// Rescans the plugin folders; returns what changed.
    pub fn rescan_plugins(&self) -> Vec<String> {
        let events = lock(&self.plugins).scan();
        self.after_plugin_events(&events);
        events.iter().map(|e| e.to_string()).collect()
    }

    fn after_plugin_events(&self, events: &[ReloadEvent]) {
        if events.is_empty() {
            return;
        }
        self.record_plugin_events(events);
        let messages: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        self.emit("plugins", json!({ "messages": messages, "plugins": self.plugins_json() }));
    }
}

/// Polls the watched plugin folders twice a second and reports reloads to the UI.
pub fn start_plugin_watcher(app: Arc<App>) {
    let _ = std::thread::Builder::new().name("graft-serve-plugins".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let events = lock(&app.plugins).poll_reloads();
        for e in &events {
            tracing::info!("{e}");
        }
        app.after_plugin_events(&events);
    });
}
