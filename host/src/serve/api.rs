//! The HTTP routes. Every answer is JSON except the UI files, images and report files; every
//! error is `{"error": "..."}` with a 4xx (the request was wrong) or 5xx status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::serve::jobs::{self, JobKind, JobSpec, JobStatus};
use crate::serve::state::{lock, App};
use crate::serve::{dataset, gen};
use graft_trainer::config::{DatasetSection, StrategySection, TrainConfig};
use graft_trainer::options::{refuse_unknown_keys, TrainOptions};
use graft_trainer::samples::{parse_prompts, SampleDefaults};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// An error answer: a status and a message for the user.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into() }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, message: message.into() }
    }
    fn from_anyhow(status: StatusCode, e: anyhow::Error) -> Self {
        Self { status, message: format!("{e:#}") }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("the request needs a JSON body (see docs/API.md)"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/api/plugins", get(plugins))
        .route("/api/plugins/rescan", post(rescan))
        .route("/api/dataset", get(dataset_list))
        .route("/api/dataset/image", get(dataset_image))
        .route("/api/dataset/caption", put(dataset_caption))
        .route("/api/jobs", get(job_list))
        .route("/api/jobs/{id}", get(job_get))
        .route("/api/jobs/{id}/{action}", post(job_action))
        .route("/api/jobs/{id}/files/{*path}", get(job_file))
        .route("/api/train", post(train))
        .route("/api/compare", post(compare))
        .route("/api/adapters", get(adapters))
        .route("/api/generate", post(generate))
        .route("/api/generate/history", get(history))
        .route("/api/images/{name}", get(image))
        .fallback(|| async { ApiError::not_found("no such route (see docs/API.md)") })
        .with_state(app)
}

async fn status(State(app): State<Arc<App>>) -> ApiResult {
    let (running, queued) = {
        let book = lock(&app.jobs);
        let running = book.jobs.iter().find(|j| j.info.status.is_running()).map(|j| j.info.id);
        (running, book.jobs.iter().filter(|j| j.info.status == JobStatus::Queued).count())
    };
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model": app.model_path.as_ref().map(|p| p.display().to_string()),
        "model_loaded": app.model.is_some(),
        "device": app.device,
        "work_dir": app.work_dir.display().to_string(),
        "lora_dirs": app.lora_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "running_job": running,
        "queued_jobs": queued,
    }))
}

async fn events(State(app): State<Arc<App>>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = app.events.subscribe();
    let hello = tokio_stream::once(Ok(SseEvent::default().event("hello").data("{}")));
    // A listener that falls behind misses events (it can reload the job from the API).
    let stream = BroadcastStream::new(rx).filter_map(|r| r.ok().map(|e| Ok(SseEvent::default().event(e.event).data(e.data.to_string()))));
    Sse::new(hello.chain(stream)).keep_alive(KeepAlive::default())
}

async fn plugins(State(app): State<Arc<App>>) -> ApiResult {
    let app2 = app.clone();
    let v = tokio::task::spawn_blocking(move || app2.plugins_json()).await.map_err(|e| ApiError::bad(e.to_string()))?;
    ok(v)
}

async fn rescan(State(app): State<Arc<App>>) -> ApiResult {
    let app2 = app.clone();
    let messages = tokio::task::spawn_blocking(move || app2.rescan_plugins()).await.map_err(|e| ApiError::bad(e.to_string()))?;
    ok(json!({ "messages": messages, "plugins": app.plugins_json() }))
}

fn query_dir(q: &HashMap<String, String>) -> Result<PathBuf, ApiError> {
    match q.get("dir") {
        Some(d) if !d.trim().is_empty() => Ok(PathBuf::from(d.trim())),
        _ => Err(ApiError::bad("query parameter `dir` (the dataset folder) is missing")),
    }
}

fn query_resolution(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    match q.get("resolution") {
        None => Ok(1024),
        Some(r) => r.parse().map_err(|_| ApiError::bad(format!("`resolution` is `{r}`: give a number of pixels"))),
    }
}

async fn dataset_list(Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let dir = query_dir(&q)?;
    let resolution = query_resolution(&q)?;
    let listing = tokio::task::spawn_blocking(move || dataset::list(&dir, resolution))
        .await
        .map_err(|e| ApiError::bad(e.to_string()))?
        .map_err(|e| ApiError::from_anyhow(StatusCode::BAD_REQUEST, e))?;
    ok(serde_json::to_value(listing).unwrap_or_default())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("html") => "text/html; charset=utf-8",
        Some("md" | "txt" | "toml") => "text/plain; charset=utf-8",
        Some("json" | "jsonl") => "application/json",
        _ => "application/octet-stream",
    }
}

async fn send_file(path: PathBuf) -> ApiResult {
    let p = path.clone();
    match tokio::task::spawn_blocking(move || std::fs::read(p)).await.map_err(|e| ApiError::bad(e.to_string()))? {
        Ok(bytes) => Ok(([(header::CONTENT_TYPE, content_type(&path))], bytes).into_response()),
        Err(_) => Err(ApiError::not_found(format!("cannot read {}", path.display()))),
    }
}

async fn dataset_image(Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let dir = query_dir(&q)?;
    let name = q.get("name").ok_or_else(|| ApiError::bad("query parameter `name` (the image) is missing"))?;
    let path = dataset::resolve_image(&dir, name).map_err(|e| ApiError::from_anyhow(StatusCode::NOT_FOUND, e))?;
    send_file(path).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionRequest {
    dir: PathBuf,
    name: String,
    caption: String,
}

async fn dataset_caption(body: Bytes) -> ApiResult {
    let req: CaptionRequest = parse_body(&body)?;
    let path = dataset::save_caption(&req.dir, &req.name, &req.caption).map_err(|e| ApiError::from_anyhow(StatusCode::BAD_REQUEST, e))?;
    ok(json!({ "saved": path.display().to_string() }))
}

async fn job_list(State(app): State<Arc<App>>) -> ApiResult {
    let infos: Vec<Value> = lock(&app.jobs)
        .jobs
        .iter()
        .map(|j| {
            let mut v = serde_json::to_value(&j.info).unwrap_or_default();
            // The list is a summary: the loss curve is in GET /api/jobs/{id}.
            v["losses"] = json!([]);
            v
        })
        .collect();
    ok(json!(infos))
}

fn job_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| ApiError::bad(format!("job id `{id}` is not a number")))
}

async fn job_get(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let id = job_id(&id)?;
    let book = lock(&app.jobs);
    let job = book.get(id).ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    ok(serde_json::to_value(&job.info).unwrap_or_default())
}

async fn job_action(State(app): State<Arc<App>>, UrlPath((id, action)): UrlPath<(String, String)>) -> ApiResult {
    let id = job_id(&id)?;
    let (status, kind, control) = {
        let book = lock(&app.jobs);
        let job = book.get(id).ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
        (job.info.status, job.info.kind, job.control.clone())
    };
    let new_status = match action.as_str() {
        "pause" | "resume" if kind != JobKind::Train => return Err(ApiError::conflict("only training runs can be paused")),
        _ if !status.is_live() => return Err(ApiError::conflict(format!("job {id} is already {status}"))),
        "pause" if status == JobStatus::Running => {
            control.paused.store(true, Ordering::SeqCst);
            JobStatus::Paused
        }
        "resume" if status == JobStatus::Paused => {
            control.paused.store(false, Ordering::SeqCst);
            JobStatus::Running
        }
        "pause" | "resume" => return Err(ApiError::conflict(format!("job {id} is {status}: cannot {action} it"))),
        "stop" if status == JobStatus::Queued => {
            control.stop.store(true, Ordering::SeqCst);
            JobStatus::Stopped
        }
        "stop" => {
            control.stop.store(true, Ordering::SeqCst);
            control.paused.store(false, Ordering::SeqCst);
            JobStatus::Stopping
        }
        other => return Err(ApiError::not_found(format!("unknown job action `{other}`: use pause, resume or stop"))),
    };
    jobs::update(&app, id, |i| i.status = new_status);
    ok(json!({ "id": id, "status": new_status }))
}

/// A relative path made of plain names only.
fn safe_relative(path: &str) -> Result<PathBuf, ApiError> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::bad(format!("file path `{path}` must stay inside the job's folder")));
    }
    Ok(p.to_path_buf())
}

async fn job_file(State(app): State<Arc<App>>, UrlPath((id, path)): UrlPath<(String, String)>) -> ApiResult {
    let id = job_id(&id)?;
    let rel = safe_relative(&path)?;
    let dir = {
        let book = lock(&app.jobs);
        PathBuf::from(&book.get(id).ok_or_else(|| ApiError::not_found(format!("no job {id}")))?.info.output_dir)
    };
    send_file(dir.join(rel)).await
}

fn res() -> usize {
    1024
}

/// A training run from the UI: the dataset and the strategy, and the [`TrainOptions`] at the
/// top level, with the names and defaults of a training config.
#[derive(Deserialize)]
struct TrainRequest {
    #[serde(default)]
    name: Option<String>,
    plugin: String,
    #[serde(default)]
    strategy_config: Option<Value>,
    dataset_dir: PathBuf,
    #[serde(default = "res")]
    resolution: usize,
    #[serde(flatten)]
    options: TrainOptions,
    #[serde(default)]
    sample_prompts: Vec<String>,
    #[serde(default)]
    enable_bucket: bool,
    #[serde(default)]
    flip_aug: bool,
    #[serde(default)]
    shuffle_caption: bool,
}

/// The keys of a [`TrainRequest`] besides the options.
const TRAIN_REQUEST_KEYS: [&str; 9] =
    ["name", "plugin", "strategy_config", "dataset_dir", "resolution", "sample_prompts", "enable_bucket", "flip_aug", "shuffle_caption"];

/// A train request's body: a JSON object whose keys are all known; `null` is the default.
fn parse_train_request(body: &Bytes) -> Result<TrainRequest, ApiError> {
    let mut v: Value = parse_body(body)?;
    let object = v.as_object_mut().ok_or_else(|| ApiError::bad("invalid JSON body: expected an object"))?;
    object.retain(|_, value| !value.is_null());
    refuse_unknown_keys(object.keys(), &TRAIN_REQUEST_KEYS).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    serde_json::from_value(v).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// A JSON object as a TOML table (the plugin config of a strategy).
fn to_table(v: Option<Value>, what: &str) -> Result<toml::Table, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(toml::Table::new()),
        Some(v @ Value::Object(_)) => {
            serde_json::from_value(v).map_err(|e| ApiError::bad(format!("{what}: cannot use this object as a plugin config: {e}")))
        }
        Some(_) => Err(ApiError::bad(format!("{what} must be a JSON object"))),
    }
}

/// Checks that the plugin exists and takes this config.
fn check_strategy(app: &App, plugin: &str, config: &toml::Table, what: &str) -> Result<(), ApiError> {
    let manager = lock(&app.plugins);
    let p = manager.require(plugin).map_err(|e| ApiError::bad(format!("{what}: {e:#}")))?;
    let json = serde_json::to_string(config).unwrap_or_default();
    graft_runtime::plugins::StrategyInstance::new(p, None, &json)
        .map_err(|e| ApiError::bad(format!("{what}: plugin `{plugin}` refuses this config: {e}")))?;
    Ok(())
}

fn need_model(app: &App) -> Result<PathBuf, ApiError> {
    match (&app.model, &app.model_path) {
        (Some(_), Some(p)) => Ok(p.clone()),
        _ => Err(ApiError::conflict("no model is loaded: start the server with --model PATH")),
    }
}

async fn train(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req = parse_train_request(&body)?;
    let model = need_model(&app)?;
    if req.options.steps == 0 {
        return Err(ApiError::bad("`steps` must be at least 1"));
    }
    if !req.dataset_dir.is_dir() {
        return Err(ApiError::bad(format!("dataset_dir {} is not a folder", req.dataset_dir.display())));
    }
    let name = req.name.clone().filter(|n| !n.trim().is_empty()).unwrap_or_else(|| req.plugin.clone());
    graft_trainer::names::check_name("name", &name).map_err(|e| ApiError::bad(e.to_string()))?;
    let table = to_table(req.strategy_config.clone(), "strategy_config")?;
    check_strategy(&app, &req.plugin, &table, "plugin")?;
    graft_trainer::optim::OptimizerSpec::parse(&req.options.optimizer, &req.options.optimizer_args).map_err(|e| ApiError::bad(e.to_string()))?;
    if req.options.dtype != graft_sdxl::WeightDtype::File {
        return Err(ApiError::bad("dtype: the server's model is shared by every job; start the server with --dtype instead"));
    }
    let defaults = SampleDefaults { width: req.resolution, height: req.resolution, seed: req.options.seed, ..Default::default() };
    let prompt_text = req.sample_prompts.join("\n");
    parse_prompts(&prompt_text, "sample_prompts", &defaults).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    if req.options.sample_every > 0 && req.sample_prompts.iter().all(|p| p.trim().is_empty()) {
        return Err(ApiError::bad("sample_every is set but sample_prompts is empty"));
    }
    graft_trainer::validation::check(&req.options).map_err(|e| ApiError::bad(e.to_string()))?;
    if let Some(dir) = req.options.validation_dir.as_ref().filter(|d| !d.is_dir()) {
        return Err(ApiError::bad(format!("validation_dir {} is not a folder", dir.display())));
    }

    let id = lock(&app.jobs).next_id();
    let out = app.work_dir.join("runs").join(format!("{id:04}-{name}"));
    let prompts_file = out.join("prompts.txt");
    let config = TrainConfig {
        model,
        model_config: app.model_config.clone(),
        output_dir: out.clone(),
        output_name: name.clone(),
        options: req.options.clone(),
        sample_prompts: (req.options.sample_every > 0).then(|| prompts_file.clone()),
        export_checkpoint: false,
        // The server's model is shared with generate requests: nothing of it is released.
        shared_model: true,
        dataset: DatasetSection {
            dir: Some(req.dataset_dir.clone()),
            config: None,
            resolution: req.resolution,
            enable_bucket: req.enable_bucket,
            // kohya's range, widened to hold the resolution the form asked for.
            min_bucket_reso: 256.min(req.resolution / 64 * 64).max(64),
            max_bucket_reso: 1024.max(req.resolution.div_ceil(64) * 64),
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            shuffle_caption: req.shuffle_caption,
            keep_tokens: 0,
            flip_aug: req.flip_aug,
            caption_dropout_rate: 0.0,
            caption_extension: None,
            skip_bad: false,
        },
        strategy: StrategySection { plugin: req.plugin.clone(), name: None, config: table },
    };
    config.validate().map_err(|e| ApiError::bad(format!("{e:#}")))?;
    std::fs::create_dir_all(&out).map_err(|e| ApiError::from_anyhow(StatusCode::INTERNAL_SERVER_ERROR, e.into()))?;
    std::fs::write(&prompts_file, format!("{prompt_text}\n")).map_err(|e| ApiError::from_anyhow(StatusCode::INTERNAL_SERVER_ERROR, e.into()))?;
    let info = jobs::enqueue(&app, id, JobKind::Train, &name, out, req.options.steps, Some(req.plugin.clone()), JobSpec::Train { config });
    Ok((StatusCode::ACCEPTED, Json(serde_json::to_value(info).unwrap_or_default())).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareStrategy {
    #[serde(default)]
    name: Option<String>,
    plugin: String,
    #[serde(default)]
    config: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareRequest {
    #[serde(default)]
    name: Option<String>,
    dataset_dir: PathBuf,
    #[serde(default = "res")]
    resolution: usize,
    steps: u64,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    prompts: Vec<String>,
    strategies: Vec<CompareStrategy>,
}

async fn compare(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: CompareRequest = parse_body(&body)?;
    let model = need_model(&app)?;
    if req.strategies.is_empty() {
        return Err(ApiError::bad("`strategies` is empty: give at least one {\"plugin\": ...}"));
    }
    let name = req.name.clone().filter(|n| !n.trim().is_empty()).unwrap_or_else(|| "compare".into());
    graft_trainer::names::check_name("name", &name).map_err(|e| ApiError::bad(e.to_string()))?;
    let mut strategies = Vec::new();
    for (i, s) in req.strategies.into_iter().enumerate() {
        let config = to_table(s.config, &format!("strategies[{i}].config"))?;
        check_strategy(&app, &s.plugin, &config, &format!("strategies[{i}]"))?;
        let mut t = toml::Table::new();
        if let Some(n) = s.name.filter(|n| !n.is_empty()) {
            t.insert("name".into(), n.into());
        }
        t.insert("plugin".into(), s.plugin.into());
        t.insert("config".into(), toml::Value::Table(config));
        strategies.push(toml::Value::Table(t));
    }
    let id = lock(&app.jobs).next_id();
    let out = app.work_dir.join("compare").join(format!("{id:04}-{name}"));
    let mut dataset = toml::Table::new();
    dataset.insert("dir".into(), req.dataset_dir.display().to_string().into());
    dataset.insert("resolution".into(), (req.resolution as i64).into());
    let mut t = toml::Table::new();
    t.insert("model".into(), model.display().to_string().into());
    if let Some(mc) = &app.model_config {
        t.insert("model_config".into(), mc.display().to_string().into());
    }
    t.insert("output_dir".into(), out.display().to_string().into());
    t.insert("seed".into(), (req.seed as i64).into());
    t.insert("steps".into(), (req.steps as i64).into());
    t.insert("prompts".into(), toml::Value::Array(req.prompts.iter().map(|p| p.clone().into()).collect()));
    t.insert("dataset".into(), toml::Value::Table(dataset));
    t.insert("strategies".into(), toml::Value::Array(strategies));
    let text = toml::to_string(&t).map_err(|e| ApiError::bad(e.to_string()))?;
    let config = crate::compare::config::CompareConfig::parse_str(&text, "compare request", &app.work_dir)
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let info = jobs::enqueue(&app, id, JobKind::Compare, &name, out, req.steps, None, JobSpec::Compare { config });
    Ok((StatusCode::ACCEPTED, Json(serde_json::to_value(info).unwrap_or_default())).into_response())
}

async fn adapters(State(app): State<Arc<App>>) -> ApiResult {
    ok(serde_json::to_value(gen::adapter_files(&app)).unwrap_or_default())
}

async fn generate(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: gen::GenRequest = parse_body(&body)?;
    need_model(&app)?;
    let (text, uses) = gen::check(&app, &req).map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let id = {
        let h = lock(&app.history);
        h.last().map_or(1, |r| r.id + 1)
    };
    let app2 = app.clone();
    let record = tokio::task::spawn_blocking(move || crate::runtime::on_worker(|| gen::generate(&app2, id, req, text, uses)))
        .await
        .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("generate panicked: {e}") })?
        .map_err(|e| ApiError::from_anyhow(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    lock(&app.history).push(record.clone());
    let v = serde_json::to_value(&record).unwrap_or_default();
    app.emit("generate.done", v.clone());
    ok(v)
}

async fn history(State(app): State<Arc<App>>) -> ApiResult {
    ok(serde_json::to_value(lock(&app.history).clone()).unwrap_or_default())
}

async fn image(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> ApiResult {
    let rel = safe_relative(&name)?;
    send_file(app.work_dir.join("images").join(rel)).await
}
