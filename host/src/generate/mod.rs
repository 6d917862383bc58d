//! `graft generate`: text to image, with any number of adapters at once.
//!
//! - Adapters come from `--adapter FILE[:w[:unet_w]]` (for every image) and from A1111 tags in
//!   the prompt, `<lora:name:w>` / `<lora:name:te_w:unet_w>`, found by name in the `--lora-dir`
//!   folders ([`lora_dir`], [`prompt_syntax`]). kohya, PEFT / diffusers and LyCORIS files attach
//!   at the hook points ([`graft_runtime::adapters::files`]); graft-native files go through the strategy
//!   plugin their metadata names. Each file is read once; prompts that use other adapters or
//!   weights switch them between batches.
//! - `--prompts FILE` renders a kohya sample-prompt file (one image per line, `--n --w --h --d
//!   --s --l --ss` options); `--images-per-prompt N` makes N images of each (seeds seed, seed+1,
//!   ...); `--batch-size N` denoises up to N images together; `--grid` lays them out in one image.
//! - `--fuse` folds every adapter with a weight difference into the base weights while sampling
//!   (the base model's speed) and restores the loaded weights exactly afterwards.

pub mod lora_dir;
pub mod prompt_syntax;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use graft_formats::AdapterFormat;
use graft_sdxl::pipeline::to_rgb8;
use graft_sdxl::{GenerateParams, SdxlModel};
use indicatif::{ProgressBar, ProgressStyle};

use crate::plugins::PluginDirArgs;
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::{add_native, fuse_all, unfuse_all, FileAdapters};
use graft_runtime::plugins::PluginManager;
use graft_trainer::png_out;
use graft_trainer::samples::{self, SampleDefaults, SamplePrompt};
use lora_dir::LoraDirs;
use prompt_syntax::{extract_adapter_tags, parse_adapter_spec};

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A diffusers SDXL folder or a single-file SDXL checkpoint (.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A diffusers folder whose config.json files give the architecture of a single-file checkpoint
    /// (default: the built-in SDXL base 1.0).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// The precision the model's weights are kept in: file (as stored, the default), bf16, fp16 or
    /// fp32. bf16 halves the memory of an f32 model, and on a CPU with AMX or AVX-512 BF16 its
    /// matrix products run in bf16 with f32 accumulation (the fastest choice there); fp16 weights
    /// are widened exactly to f32 for each product. The VAE is safe in bf16 (activations stay f32).
    #[arg(long, default_value = "file", value_name = "DTYPE")]
    pub dtype: graft_sdxl::WeightDtype,
    /// The prompt. May hold A1111 adapter tags: `<lora:name:weight>` or
    /// `<lora:name:te_weight:unet_weight>` (names are looked up in --lora-dir).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A kohya sample-prompt file: one prompt per line (tags allowed), `#` comments, options
    /// after ` --`: --n negative, --w / --h size, --d seed, --s steps, --l guidance, --ss sampler.
    /// The other flags give the defaults.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Empty or absent: SDXL's zeroed unconditional embeddings.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 8.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less: no guidance).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// euler (default), euler_a, ddim, dpmpp_2m, dpmpp_2m_karras.
    #[arg(long, default_value = "euler")]
    pub scheduler: String,
    /// The seed of the first image; image k of a prompt uses seed + k, and a prompt-file line
    /// without --d uses seed + its index.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A safetensors file with one [1,4,H/8,W/8] tensor of unit-normal noise, used instead of the
    /// seed's (multiplied by the scheduler's init sigma, like diffusers' `latents=`). One image only.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Where to write the PNG (its parameters go into an A1111 `parameters` text chunk). With
    /// several images they go beside it as STEM_NN_SEED.png, and --grid writes the grid here.
    #[arg(long, default_value = "graft.png")]
    pub out: PathBuf,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,
    /// An adapter file for every image: kohya, PEFT / diffusers, LyCORIS or graft-native
    /// .safetensors, with an optional weight (`FILE:0.8`) or text-encoder and UNet weights
    /// (`FILE:0.5:1`). Repeat for more.
    #[arg(long = "adapter", value_name = "FILE[:W[:UNET_W]]")]
    pub adapters: Vec<String>,
    /// A folder of adapter files that prompt tags name (by file stem or ss_output_name).
    /// Repeat for more; searched in order.
    #[arg(long = "lora-dir", value_name = "DIR")]
    pub lora_dirs: Vec<PathBuf>,
    /// Fold the adapters into the base weights while sampling (base-model speed); the loaded
    /// weights are restored exactly afterwards. Adapters that are not linear stay unfused.
    #[arg(long)]
    pub fuse: bool,
    /// Images denoised together (same size, steps, guidance, sampler and adapters).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Images per prompt (seeds seed, seed + 1, ...).
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// Also write every image into one grid image (at --out).
    #[arg(long)]
    pub grid: bool,
    /// Columns of the grid (0: near-square).
    #[arg(long, default_value_t = 0)]
    pub grid_columns: usize,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

/// Reads the one tensor of an `--init-latents` file.
pub fn read_init_latents(path: &PathBuf) -> anyhow::Result<candle_core::Tensor> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: cannot read init latents (a safetensors file with one tensor)", path.display()))?;
    match tensors.len() {
        1 => Ok(tensors.into_values().next().expect("one tensor")),
        n => anyhow::bail!("{}: holds {n} tensors; --init-latents needs exactly one [1,4,H/8,W/8] tensor", path.display()),
    }
}

/// One adapter an image uses: which distinct file, at which weights.
#[derive(Debug, Clone, PartialEq)]
struct Use {
    file: usize,
    te: f64,
    unet: f64,
}

/// A distinct adapter file of the run.
#[derive(Debug, Clone)]
struct Wanted {
    path: PathBuf,
    name: String,
}

/// One image to make.
#[derive(Debug, Clone)]
struct Job {
    /// The prompt as written (with its tags), for the PNG parameters.
    written: String,
    /// What the pipeline gets (tags removed).
    params: GenerateParams,
    uses: Vec<Use>,
}

/// How a distinct file is attached.
#[derive(Debug, Clone, Copy)]
enum Attached {
    File(usize),
    Strategy(graft_runtime::adapters::dispatcher::StrategyId),
}

/// What `graft generate` wrote.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub images: Vec<PathBuf>,
    pub grid: Option<PathBuf>,
    /// One line per adapter file: what attached where.
    pub adapters: Vec<String>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let outcome = generate(&args)?;
    for p in outcome.images.iter().chain(&outcome.grid) {
        println!("{}", p.display());
    }
    Ok(())
}

/// Everything `graft generate` does; returns the files written.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<Outcome> {
    // Everything that can be checked without the model is checked first.
    graft_sdxl::pipeline::check_size(args.width, args.height)?;
    graft_sdxl::schedulers::build_scheduler(&args.scheduler, &graft_sdxl::schedulers::SchedulerConfig::sdxl_base(), 1)?;
    if args.batch_size == 0 || args.images_per_prompt == 0 {
        bail!("--batch-size and --images-per-prompt must be at least 1");
    }
    let init_latents = args.init_latents.as_ref().map(read_init_latents).transpose()?;
    let (jobs, wanted) = plan_jobs(args)?;
    if init_latents.is_some() && jobs.len() > 1 {
        bail!("--init-latents gives the noise of one image, but this run makes {} images", jobs.len());
    }
    let jobs: Vec<Job> = jobs
        .into_iter()
        .map(|mut j| {
            j.params.init_latents = init_latents.clone();
            j
        })
        .collect();

    let device = graft_runtime::device::pick(args.cpu)?;
    let started = std::time::Instant::now();
    let model = SdxlModel::load_as(&args.model, args.model_config.as_deref(), &device, args.dtype)?;
    tracing::info!("{}", graft_sdxl::precision::describe(model.weight_dtype(), &model.device));
    tracing::info!("loaded {} in {:.1}s", args.model.display(), started.elapsed().as_secs_f64());

    let mut files = FileAdapters::new(&model)?;
    let mut set = AdapterSet::new(&model, args.seed);
    let mut plugins: Option<PluginManager> = None;
    let mut attached = Vec::with_capacity(wanted.len());
    let mut hashes = Vec::with_capacity(wanted.len());
    let mut outcome = Outcome::default();
    for w in &wanted {
        let (a, line, hash) = attach(w, &mut files, &mut set, &mut plugins, &args.plugins)?;
        tracing::info!("{line}");
        outcome.adapters.push(line);
        attached.push(a);
        hashes.push(hash);
    }

    let total_steps: usize = jobs.iter().map(|j| j.params.steps).sum();
    let bar = ProgressBar::new(total_steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message("denoising");
    let model_name = model_name(&args.model);
    let single = jobs.len() == 1;
    let mut images = Vec::with_capacity(jobs.len());
    let mut current: Option<Vec<Use>> = None;
    let mut done = 0usize;
    let mut i = 0;
    while i < jobs.len() {
        // A batch: consecutive jobs with the same adapters and batchable parameters.
        let mut end = i + 1;
        while end < jobs.len()
            && end - i < args.batch_size
            && jobs[end].uses == jobs[i].uses
            && graft_sdxl::pipeline::batchable(&jobs[i].params, &jobs[end].params)
        {
            end += 1;
        }
        if current.as_ref() != Some(&jobs[i].uses) {
            activate(&jobs[i].uses, &attached, &mut files, &mut set, args.fuse)?;
            let list: Vec<String> = jobs[i].uses.iter().map(|u| format!("{} (te {}, unet {})", wanted[u.file].name, u.te, u.unet)).collect();
            tracing::info!("adapters in use: {}", if list.is_empty() { "none".to_string() } else { list.join(", ") });
            current = Some(jobs[i].uses.clone());
        }
        let items: Vec<GenerateParams> = jobs[i..end].iter().map(|j| j.params.clone()).collect();
        let base = done;
        let out = {
            let set_hooks = set.hooks();
            let hooks = files.hooks(set_hooks.pipeline());
            let on_step = &mut |step, _| bar.set_position((base + step * items.len()) as u64);
            // The last batch frees what it no longer needs as it goes (this process ends after it).
            let out = if end == jobs.len() {
                model.generate_last_batch(&items, hooks.pipeline(), on_step)
            } else {
                model.generate_batch(&items, hooks.pipeline(), on_step)
            };
            out.with_context(|| format!("generating `{}`", jobs[i].written))?
        };
        for failure in set.take_failures() {
            tracing::error!("{failure}");
        }
        for (job, generated) in jobs[i..end].iter().zip(out) {
            let (w, h, rgb) = to_rgb8(&generated.image.get(0)?)?;
            let text = parameters_text(job, &model_name, &wanted, &hashes);
            let path = if single {
                args.out.clone()
            } else {
                let stem = args.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "graft".into());
                let dir = args.out.parent().unwrap_or(Path::new(""));
                dir.join(samples::sample_file_name(&stem, outcome.images.len(), job.params.seed))
            };
            png_out::write_png(&path, w, h, &rgb, &text)?;
            outcome.images.push(path);
            if args.grid && !single {
                images.push((image::RgbImage::from_raw(w as u32, h as u32, rgb).context("image buffer")?, text));
            }
        }
        done += items.iter().map(|p| p.steps).sum::<usize>();
        i = end;
    }
    unfuse_all(&mut files, &mut set);
    bar.finish_and_clear();
    if args.grid && !single {
        let text = images.first().map(|(_, t)| t.clone());
        let imgs: Vec<image::RgbImage> = images.into_iter().map(|(img, _)| img).collect();
        samples::grid(&imgs, args.grid_columns, &args.out, text.as_deref())?;
        outcome.grid = Some(args.out.clone());
    }
    tracing::info!("wrote {} images in {:.1}s", outcome.images.len(), started.elapsed().as_secs_f64());
    Ok(outcome)
}

/// The images of the run, and the distinct adapter files they use (in order of first use).
fn plan_jobs(args: &GenerateArgs) -> anyhow::Result<(Vec<Job>, Vec<Wanted>)> {
    let defaults = SampleDefaults {
        negative: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: Some(args.scheduler.clone()),
    };
    let lines: Vec<SamplePrompt> = match (&args.prompts, &args.prompt) {
        (Some(file), _) => samples::parse_prompt_file(file, &defaults)?,
        (None, Some(p)) => vec![SamplePrompt {
            prompt: p.clone(),
            negative: defaults.negative.clone(),
            width: args.width,
            height: args.height,
            seed: args.seed,
            steps: args.steps,
            guidance: args.guidance,
            scheduler: Some(args.scheduler.clone()),
        }],
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    let mut wanted: Vec<Wanted> = Vec::new();
    fn index_of(wanted: &mut Vec<Wanted>, path: &Path, name: &str) -> anyhow::Result<usize> {
        let key = path.canonicalize().with_context(|| format!("{}: cannot open the adapter file", path.display()))?;
        if let Some(i) = wanted.iter().position(|w| w.path == key) {
            return Ok(i);
        }
        wanted.push(Wanted { path: key, name: name.to_string() });
        Ok(wanted.len() - 1)
    }
    let mut global = Vec::new();
    for spec in &args.adapters {
        let s = parse_adapter_spec(spec)?;
        let stem = s.path.file_stem().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
        global.push(Use { file: index_of(&mut wanted, &s.path, &stem)?, te: s.te_weight, unet: s.unet_weight });
    }
    let dirs = LoraDirs::scan(&args.lora_dirs)?;
    let mut jobs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let where_ = || match &args.prompts {
            Some(f) => format!("{} prompt {}", f.display(), n + 1),
            None => "--prompt".to_string(),
        };
        let (text, tags) = extract_adapter_tags(&line.prompt).with_context(where_)?;
        let mut uses = global.clone();
        for tag in tags {
            let path = dirs.resolve(&tag.name).with_context(where_)?;
            let file = index_of(&mut wanted, &path, &tag.name)?;
            uses.push(Use { file, te: tag.te_weight, unet: tag.unet_weight });
        }
        let uses = merge_uses(uses, &wanted);
        for k in 0..args.images_per_prompt {
            let mut p = line.clone();
            p.seed = line.seed.wrapping_add(k as u64);
            let mut params = p.params();
            params.prompt = text.clone();
            jobs.push(Job { written: line.prompt.clone(), params, uses: uses.clone() });
        }
    }
    Ok((jobs, wanted))
}

/// One entry per file: the same file twice adds its weights (as A1111 applies it twice).
fn merge_uses(uses: Vec<Use>, wanted: &[Wanted]) -> Vec<Use> {
    let mut by_file: BTreeMap<usize, Use> = BTreeMap::new();
    for u in uses {
        match by_file.get_mut(&u.file) {
            Some(e) => {
                tracing::warn!("adapter {} is named twice: its weights add up", wanted[u.file].path.display());
                e.te += u.te;
                e.unet += u.unet;
            }
            None => {
                by_file.insert(u.file, u);
            }
        }
    }
    by_file.into_values().collect()
}

/// Reads one adapter file and attaches it (disabled until a batch uses it); returns how, the
/// summary line and A1111's short hash of the file.
fn attach(
    w: &Wanted,
    files: &mut FileAdapters,
    set: &mut AdapterSet,
    plugins: &mut Option<PluginManager>,
    plugin_args: &PluginDirArgs,
) -> anyhow::Result<(Attached, String, String)> {
    let bytes = std::fs::read(&w.path).with_context(|| format!("{}: cannot read the adapter file", w.path.display()))?;
    let hash = graft_formats::metadata::addnet_hash(&bytes).map(|h| h[..12].to_string()).unwrap_or_default();
    let raw = graft_formats::read::read_bytes(&bytes, &w.path)?;
    drop(bytes);
    let (file, report) = graft_formats::read_raw(&raw, files.keys())?;
    drop(raw);
    if !report.warnings.is_empty() || !report.unmatched_keys.is_empty() {
        tracing::warn!("{}", report.summary());
    }
    if file.format == AdapterFormat::Native {
        let info = report.native.clone().context("graft-native file without strategy metadata")?;
        if plugins.is_none() {
            *plugins = Some(plugin_args.manager()?);
        }
        let manager = plugins.as_ref().expect("set above");
        let plugin = manager
            .require(&info.strategy)
            .with_context(|| format!("{}: this graft-native file needs strategy plugin `{}`", w.path.display(), info.strategy))?;
        let name = unique_strategy_name(set, &w.name);
        let r = add_native(set, plugin, &name, &w.path, &file, 0.0, 0.0)?;
        let line =
            format!("{} (graft-native, strategy {} {}): {}", w.name, info.strategy, info.version, r.summary(&w.path.display().to_string()));
        if !r.missing.is_empty() || !r.unmatched.is_empty() || !r.warnings.is_empty() {
            tracing::warn!("{}", r.summary(&w.name));
        }
        return Ok((Attached::Strategy(r.strategy), line, hash));
    }
    let a = files.add(&w.name, &w.path, file, report, 0.0, 0.0)?;
    files.set_enabled(a, false)?;
    let line = format!("{} [{}]", files.adapters()[a].summary(), w.path.display());
    Ok((Attached::File(a), line, hash))
}

fn unique_strategy_name(set: &AdapterSet, name: &str) -> String {
    let taken = |n: &str| set.strategies().iter().any(|s| s.name() == n);
    if !taken(name) {
        return name.to_string();
    }
    (2..).map(|k| format!("{name}#{k}")).find(|n| !taken(n)).expect("a free name")
}

/// Puts the adapters of `uses` at their weights and switches every other one off.
fn activate(uses: &[Use], attached: &[Attached], files: &mut FileAdapters, set: &mut AdapterSet, fuse: bool) -> anyhow::Result<()> {
    unfuse_all(files, set);
    for (f, how) in attached.iter().enumerate() {
        let (te, unet, on) = match uses.iter().find(|u| u.file == f) {
            Some(u) => (u.te, u.unet, true),
            None => (0.0, 0.0, false),
        };
        match *how {
            Attached::File(a) => {
                if on {
                    files.set_weights(a, te, unet)?;
                } else {
                    files.set_enabled(a, false)?;
                }
            }
            Attached::Strategy(s) => {
                let st = &mut set.strategies_mut()[s];
                st.te_weight = te;
                st.unet_weight = unet;
            }
        }
    }
    if fuse {
        let (f, s) = fuse_all(files, set)?;
        tracing::info!("fused adapters into {} hook points ({f} by files, {s} by strategies)", f + s);
    }
    Ok(())
}

/// The A1111 `parameters` text of one image: the prompt as written, and `Lora hashes`.
fn parameters_text(job: &Job, model: &str, wanted: &[Wanted], hashes: &[String]) -> String {
    let mut p = job.params.clone();
    p.prompt = job.written.clone();
    let mut extra = Vec::new();
    if !job.uses.is_empty() {
        let list: Vec<String> = job.uses.iter().map(|u| format!("{}: {}", wanted[u.file].name, hashes[u.file])).collect();
        extra.push(("Lora hashes".to_string(), format!("\"{}\"", list.join(", "))));
    }
    png_out::a1111_parameters_with(&p, model, &extra)
}

fn model_name(path: &std::path::Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
