//! Text to image with the server's loaded model, with adapters picked by name (from the
//! `--lora-dir` folders and the runs of this server) or named in the prompt (`<lora:name:w>`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use graft_formats::AdapterFormat;
use graft_sdxl::pipeline::to_rgb8;
use graft_sdxl::GenerateParams;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::generate::prompt_syntax::extract_adapter_tags;
use crate::serve::state::{lock, App};
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::{add_native, FileAdapters};
use graft_trainer::png_out;

fn default_size() -> usize {
    1024
}
fn default_steps() -> usize {
    30
}
fn default_guidance() -> f64 {
    5.0
}
fn default_scheduler() -> String {
    "euler".into()
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterUse {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default = "default_size")]
    pub width: usize,
    #[serde(default = "default_size")]
    pub height: usize,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub adapters: Vec<AdapterUse>,
}

/// One image made, for the history.
#[derive(Debug, Clone, Serialize)]
pub struct GenRecord {
    pub id: u64,
    pub url: String,
    pub parameters: String,
    pub request: GenRequest,
    pub seconds: f64,
}

/// An adapter file generate can use.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterFileInfo {
    pub name: String,
    pub path: String,
    /// `lora-dir` or `run N`.
    pub source: String,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("safetensors")) {
            out.push(p);
        }
    }
}

/// The adapters by name: the `--lora-dir` files (file stem), then the exports of finished runs.
pub fn adapter_files(app: &App) -> Vec<AdapterFileInfo> {
    let mut out: Vec<AdapterFileInfo> = Vec::new();
    let mut push = |name: String, path: &Path, source: String| {
        if !out.iter().any(|a| a.name == name) {
            out.push(AdapterFileInfo { name, path: path.display().to_string(), source });
        }
    };
    for d in &app.lora_dirs {
        let mut found = Vec::new();
        walk(d, &mut found);
        found.sort();
        for p in found {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            push(stem, &p, "lora-dir".into());
        }
    }
    for job in &lock(&app.jobs).jobs {
        for e in &job.info.exports {
            let p = PathBuf::from(e);
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            push(stem, &p, format!("run {}", job.info.id));
        }
    }
    out
}

/// An adapter file to attach, with its text-encoder and UNet weights.
pub type Attachment = (AdapterFileInfo, f64, f64);

/// Checks what can be checked without the model; returns the prompt without tags and the
/// adapters to attach (file, weight).
pub fn check(app: &App, req: &GenRequest) -> anyhow::Result<(String, Vec<Attachment>)> {
    graft_sdxl::pipeline::check_size(req.width, req.height)?;
    graft_sdxl::schedulers::build_scheduler(&req.scheduler, &graft_sdxl::schedulers::SchedulerConfig::sdxl_base(), 1)?;
    if req.steps == 0 || req.steps > 500 {
        bail!("steps is {}: use 1 to 500", req.steps);
    }
    if !req.guidance.is_finite() {
        bail!("guidance must be a finite number");
    }
    let (text, tags) = extract_adapter_tags(&req.prompt).context("prompt")?;
    let files = adapter_files(app);
    let find = |name: &str| -> anyhow::Result<AdapterFileInfo> {
        files.iter().find(|a| a.name == name).cloned().with_context(|| {
            let names: Vec<&str> = files.iter().map(|a| a.name.as_str()).collect();
            format!("no adapter named `{name}`; available: {}", if names.is_empty() { "none".into() } else { names.join(", ") })
        })
    };
    let mut uses = Vec::new();
    for a in &req.adapters {
        if !a.weight.is_finite() {
            bail!("adapter `{}`: weight must be a finite number", a.name);
        }
        uses.push((find(&a.name)?, a.weight, a.weight));
    }
    for t in tags {
        uses.push((find(&t.name)?, t.te_weight, t.unet_weight));
    }
    Ok((text, uses))
}

/// Makes one image; called on a blocking thread.
pub fn generate(app: &App, id: u64, req: GenRequest, text: String, uses: Vec<Attachment>) -> anyhow::Result<GenRecord> {
    let model = app.model.clone().context("no model is loaded (start the server with --model)")?;
    let started = Instant::now();
    let _g = lock(&app.compute);
    // The base model as loaded plus the adapters named here: a training run's unfrozen or
    // folded base weights are set aside until this image is done (declared first, so the
    // adapters below, whose fuses would sit on top of it, are dropped before it).
    let _as_loaded = model.as_loaded();
    let mut files = FileAdapters::new(&model)?;
    let mut set = AdapterSet::new(&model, req.seed);
    for (a, te, unet) in &uses {
        let path = Path::new(&a.path);
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the adapter file", path.display()))?;
        let raw = graft_formats::read::read_bytes(&bytes, path)?;
        let (file, report) = graft_formats::read_raw(&raw, files.keys())?;
        if file.format == AdapterFormat::Native {
            let info = report.native.clone().context("graft-native file without strategy metadata")?;
            let plugins = lock(&app.plugins);
            let plugin =
                plugins.require(&info.strategy).with_context(|| format!("{}: needs strategy plugin `{}`", path.display(), info.strategy))?;
            add_native(&mut set, plugin, &a.name, path, &file, *te, *unet)?;
        } else {
            files.add(&a.name, path, file, report, *te, *unet)?;
        }
    }
    let params = GenerateParams {
        prompt: text,
        negative_prompt: req.negative_prompt.clone().filter(|n| !n.is_empty()),
        width: req.width,
        height: req.height,
        steps: req.steps,
        guidance: req.guidance,
        scheduler: req.scheduler.clone(),
        seed: req.seed,
        init_latents: None,
    };
    let total = req.steps;
    let image = {
        let set_hooks = set.hooks();
        let hooks = files.hooks(set_hooks.pipeline());
        let mut on_step = |step: usize, _: usize| app.emit("generate.progress", json!({ "id": id, "step": step, "total": total }));
        model.generate(&params, hooks.pipeline(), &mut on_step)?.image.get(0)?
    };
    let (w, h, rgb) = to_rgb8(&image)?;
    let model_name = model.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut written = params.clone();
    written.prompt = req.prompt.clone();
    let parameters = png_out::a1111_parameters(&written, &model_name);
    let dir = app.work_dir.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = format!("{id:05}-{}.png", req.seed);
    png_out::write_png(&dir.join(&name), w, h, &rgb, &parameters)?;
    Ok(GenRecord { id, url: format!("/api/images/{name}"), parameters, request: req, seconds: started.elapsed().as_secs_f64() })
}
