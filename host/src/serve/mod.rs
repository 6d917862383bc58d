//! `graft serve`: a web UI and JSON API over one loaded model.
//!
//! - [`state`]: what the server holds: the model, the plugins, the job book, the event channel.
//! - [`api`]: the HTTP routes (documented in docs/API.md); the UI uses only these.
//! - [`jobs`]: training and compare runs, one at a time from a queue, on a worker thread.
//! - [`dataset`]: a dataset folder's images, captions and problems.
//! - [`gen`]: text to image with the loaded model and adapters by name.
//!
//! The HTTP side runs on tokio; every piece of model work runs on plain threads (the job worker,
//! `spawn_blocking` for generate), so requests are answered while a run trains. Model work is
//! serialised by one lock taken per training step and per image.

pub mod api;
pub mod dataset;
pub mod gen;
pub mod jobs;
pub mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::plugins::PluginDirArgs;
pub use state::App;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A diffusers SDXL folder or a single-file SDXL checkpoint, loaded once for every run and
    /// image. Without it the UI still edits datasets and shows plugins.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Configs for a single-file checkpoint (default: the built-in SDXL base 1.0).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// The precision the model's weights are kept in: file (as stored, the default), bf16, fp16 or
    /// fp32. bf16 halves the memory of an f32 model, and on a CPU with AMX or AVX-512 BF16 its
    /// matrix products run in bf16 with f32 accumulation (the fastest choice there); fp16 weights
    /// are widened exactly to f32 for each product. The VAE is safe in bf16 (activations stay f32).
    #[arg(long, default_value = "file", value_name = "DTYPE")]
    pub dtype: graft_sdxl::WeightDtype,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
    /// The port to listen on (0: any free port).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Listen on this address instead of 127.0.0.1 (for example 0.0.0.0). The API has no
    /// authentication: anyone who can reach the port can read and write files as you.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<IpAddr>,
    /// A folder of adapter files that generate can use by name (and `<lora:name:w>`). Repeat for more.
    #[arg(long = "lora-dir", value_name = "DIR")]
    pub lora_dirs: Vec<PathBuf>,
    /// Where runs, images and reports are written.
    #[arg(long, default_value = "graft-serve")]
    pub work_dir: PathBuf,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
}

/// A running server (for tests and embedding): its address, and the app state.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    _runtime: std::thread::JoinHandle<()>,
}

impl ServerHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Loads the model and plugins, binds, and serves on background threads; returns once the
/// socket listens.
pub fn start(args: &ServeArgs) -> anyhow::Result<ServerHandle> {
    let app = App::new(args)?;
    let addr = SocketAddr::new(args.listen.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), args.port);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("cannot listen on {addr} (is the port in use? pick another with --port)"))?;
    let addr = listener.local_addr()?;
    jobs::start_worker(app.clone());
    state::start_plugin_watcher(app.clone());
    let router = api::router(app.clone());
    let thread = std::thread::Builder::new().name("graft-serve-http".into()).spawn(move || {
        runtime.block_on(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("server stopped: {e}");
            }
        });
    })?;
    Ok(ServerHandle { addr, app, _runtime: thread })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.listen.is_some_and(|a| !a.is_loopback()) {
        tracing::warn!("listening on {:?}: the API has no authentication", args.listen);
    }
    // Ctrl-C / SIGTERM: the running job stops after its step and saves, then the server exits.
    graft_runtime::stop::install();
    let handle = start(&args)?;
    println!("graft serve: open {}", handle.url());
    while !handle._runtime.is_finished() {
        if graft_runtime::stop::requested() {
            return stop_jobs(&handle.app);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    handle._runtime.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
    Ok(())
}

/// Asks every live job to stop (a training run saves a checkpoint and its adapter), waits for
/// the one running, and ends with an error that says so.
fn stop_jobs(app: &App) -> anyhow::Result<()> {
    {
        let book = state::lock(&app.jobs);
        for j in book.jobs.iter().filter(|j| j.info.status.is_live()) {
            j.control.paused.store(false, std::sync::atomic::Ordering::SeqCst);
            j.control.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    tracing::info!("stopping: the running job saves its checkpoint and adapter first (Ctrl-C again to quit at once)");
    loop {
        let running = state::lock(&app.jobs).jobs.iter().any(|j| j.info.status.is_running());
        if !running {
            anyhow::bail!("stopped by Ctrl-C or SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The plugin folder arguments of a server with one `--plugins DIR` (tests).
pub fn plugin_dir_args(dir: PathBuf) -> PluginDirArgs {
    PluginDirArgs { plugins: vec![dir], plugin_config: None, no_default_plugins: true }
}
