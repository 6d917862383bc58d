//! Training an SDXL VAE (diffusers' `AutoencoderKL`) as an autoencoder: reconstruction plus KL.
//!
//! ```text
//! z ~ N(mean, exp(logvar)) = encode(x)     (reparameterised: gradients reach the encoder)
//! loss = mean((decode(z) - x)^2) + kl_weight * mean(0.5 * (mean^2 + exp(logvar) - 1 - logvar))
//! ```
//!
//! This is the LDM recipe without its perceptual and adversarial terms (they need a pretrained
//! network), enough for simple drawings such as the demo model's. Every weight is a `Var` in f32,
//! started from the folder's VAE weights (or, for a folder with a config and no weights, from
//! random convolutions and linears, unit norms and zero biases), trained with AdamW (optionally
//! with a cosine decay). At the end
//! the latent scale is measured as Stable Diffusion's was (`scaling_factor = 1 / std` of the
//! latents' means over the dataset) and written into `config.json` beside the weights, so the
//! UNet sees unit-variance latents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::vae::{Vae, VaeConfig};

use crate::dataset::{Dataset, DatasetConfig, DatasetSpec, OpenOptions, SubsetSpec};
use crate::error::{io, Error, Result};
use crate::schedule::{LrSchedule, ScheduleKind};

/// What to train and where to write it.
#[derive(Debug, Clone)]
pub struct VaeTrainOptions {
    /// A VAE folder (`config.json` + `diffusion_pytorch_model*.safetensors`), or a diffusers model
    /// folder whose `vae/` is used: the architecture and the starting weights. A folder with only
    /// `config.json` starts from random weights.
    pub vae: PathBuf,
    /// Images (captions are not needed); kohya `N_name` subfolders are read too.
    pub data: PathBuf,
    /// Square training size; images are resized and centre-cropped to it.
    pub resolution: usize,
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    /// Decay the learning rate to zero along a cosine; otherwise it stays constant.
    pub cosine: bool,
    pub kl_weight: f64,
    pub seed: u64,
    /// The output VAE folder.
    pub out: PathBuf,
    /// The dtype of the written weights (training is always f32).
    pub save_dtype: DType,
    /// Folders of images not trained on: after training, each one's reconstruction error is
    /// measured and its preview written (`reconstruction-<folder name>.png`).
    pub check: Vec<PathBuf>,
}

/// The reconstruction error on one folder of [`VaeTrainOptions::check`].
#[derive(Debug, Clone, PartialEq)]
pub struct VaeCheck {
    pub data: PathBuf,
    pub reconstruction: f64,
    pub preview: PathBuf,
}

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeStep {
    pub step: u64,
    pub reconstruction: f64,
    pub kl: f64,
    /// The learning rate of this step.
    pub lr: f64,
}

#[derive(Debug, Clone)]
pub struct VaeTrainOutcome {
    pub steps: Vec<VaeStep>,
    /// The measured `scaling_factor` written into the config.
    pub scaling_factor: f64,
    /// Mean squared reconstruction error of the whole dataset (images in [-1, 1]), with the
    /// latents' means, before and after training.
    pub reconstruction_before: f64,
    pub reconstruction_after: f64,
    pub checks: Vec<VaeCheck>,
    pub out: PathBuf,
}

/// The VAE folder of `path`: itself, or its `vae/`.
fn vae_folder(path: &Path) -> PathBuf {
    if path.join("vae").join("config.json").is_file() {
        path.join("vae")
    } else {
        path.to_path_buf()
    }
}

/// The weight file of a VAE folder (full precision first, then the `.fp16` variant), if any.
fn weight_file(dir: &Path) -> Option<PathBuf> {
    ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"].iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// Random starting weights, as diffusers' `AutoencoderKL.from_config` starts: convolutions and
/// linears with the spread of PyTorch's default init (std 1 / sqrt(3 fan_in), normal here rather
/// than uniform), ones for the norms' scales, zeros for every bias. He's sqrt(2 / fan_in) made the
/// residual stacks start 2x further off.
fn init_random(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = GraftRng::new(seed);
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (rng.randn(dims.as_slice(), &Device::Cpu)? * (1.0 / (3.0 * fan_in as f64)).sqrt())?
        } else if name.ends_with("bias") {
            Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu)?
        };
        var.set(&t)?;
    }
    Ok(())
}

/// A trainable VAE: the model and its variables by diffusers name, loaded from `dir`.
pub fn load_trainable(dir: &Path, seed: u64) -> Result<(Vae, VarMap, VaeConfig)> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(io(format!("cannot read the VAE config {}", config_path.display()), &config_path))?;
    let config = VaeConfig::from_json_str(&text, &config_path.display().to_string()).map_err(|e| Error::Config(e.to_string()))?;
    let varmap = VarMap::new();
    let vae = Vae::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &config)?;
    let Some(file) = weight_file(dir) else {
        // Weights under another name are a mistake, not a request for a random start.
        let others: Vec<String> = std::fs::read_dir(dir)
            .map_err(io(format!("cannot read the VAE folder {}", dir.display()), dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        if !others.is_empty() {
            return Err(Error::Config(format!(
                "{}: the VAE weights must be diffusion_pytorch_model.safetensors (or .fp16.safetensors), found {}; \
                 rename the file, or remove it to start from random weights",
                dir.display(),
                others.join(", ")
            )));
        }
        tracing::warn!("{}: only a config, no VAE weights: starting from random weights", dir.display());
        init_random(&varmap, seed)?;
        return Ok((vae, varmap, config));
    };
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let t = tensors.get(name).ok_or_else(|| {
            Error::Config(format!("{}: no tensor `{name}`, which the VAE config {} needs", file.display(), config_path.display()))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Config(format!(
                "{}: `{name}` is {:?}, the config {} makes it {:?}",
                file.display(),
                t.dims(),
                config_path.display(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok((vae, varmap, config))
}

/// Every image of `data` at `resolution`, `[3, r, r]` in [-1, 1].
fn load_images(data: &Path, resolution: usize) -> Result<Vec<Tensor>> {
    let reso = crate::buckets::Reso::new(resolution, resolution);
    let config =
        DatasetConfig::from_folder(data, &DatasetSpec::new(reso), &SubsetSpec { class_tokens: Some(String::new()), ..SubsetSpec::new(data) })?;
    let dataset = Dataset::open(&config, &OpenOptions::default())?;
    (0..dataset.len()).map(|i| dataset.load_image(i, false)).collect()
}

/// `0.5 * mean(mean^2 + exp(logvar) - 1 - logvar)`: the KL divergence to N(0, 1) per element.
fn kl_term(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let t = ((mean.sqr()? + logvar.exp()?)? - logvar)?;
    Ok(((t - 1.0)? * 0.5)?.mean_all()?)
}

/// Mean squared error of encoding (the means) and decoding every image, and the standard
/// deviation of those latents.
fn evaluate(vae: &Vae, images: &[Tensor], batch: usize) -> Result<(f64, f64)> {
    let (mut err, mut n) = (0.0, 0usize);
    let mut latents = Vec::new();
    for chunk in images.chunks(batch) {
        let x = Tensor::stack(chunk, 0)?;
        let dist = vae.encode(&x)?;
        let mean = dist.mean.detach();
        let rec = vae.decode(&mean)?.detach();
        err += (rec - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        n += x.elem_count();
        latents.push(mean.flatten_all()?);
    }
    let all = Tensor::cat(&latents, 0)?;
    let m = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = (all.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - m * m).max(0.0);
    Ok((err / n.max(1) as f64, var.sqrt()))
}

/// Trains; `on_step` sees each step (for a progress bar).
pub fn train_vae(o: &VaeTrainOptions, mut on_step: impl FnMut(&VaeStep)) -> Result<VaeTrainOutcome> {
    if o.steps == 0 || o.batch_size == 0 || o.resolution < 8 {
        return Err(Error::Config(format!(
            "vae training: steps ({}) and batch_size ({}) must be at least 1 and resolution ({}) at least 8",
            o.steps, o.batch_size, o.resolution
        )));
    }
    let src = vae_folder(&o.vae);
    let (vae, varmap, mut config) = load_trainable(&src, o.seed)?;
    let factor = 1usize << (config.block_out_channels.len() - 1);
    if !o.resolution.is_multiple_of(factor) {
        return Err(Error::Config(format!("vae training: resolution {} is not a multiple of the VAE's factor {factor}", o.resolution)));
    }
    let images = load_images(&o.data, o.resolution)?;
    // Read before training, so that a bad check folder fails at once rather than after the steps.
    let check_images = o.check.iter().map(|d| load_images(d, o.resolution)).collect::<Result<Vec<_>>>()?;
    tracing::info!(
        "vae training: {} images at {} px from {}, {} steps of {}",
        images.len(),
        o.resolution,
        o.data.display(),
        o.steps,
        o.batch_size
    );
    let (reconstruction_before, _) = evaluate(&vae, &images, o.batch_size)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: o.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut rng = GraftRng::new(o.seed);
    let mut steps = Vec::with_capacity(o.steps as usize);
    let schedule = if o.cosine { LrSchedule::new(ScheduleKind::Cosine, 0, o.steps as usize) } else { LrSchedule::constant() };
    for step in 1..=o.steps {
        opt.set_learning_rate(schedule.lr(o.lr, (step - 1) as usize));
        let batch: Vec<Tensor> =
            (0..o.batch_size).map(|_| images[(rng.uniform() * images.len() as f64) as usize % images.len()].clone()).collect();
        let x = Tensor::stack(&batch, 0)?;
        let dist = vae.encode(&x)?;
        let z = dist.sample(&mut rng)?;
        let rec = vae.decode(&z)?;
        // Squared error: on varied drawings of shapes LDM's absolute error (600 steps) lost more
        // colour (mean squared error 0.048 against 0.024).
        let reconstruction = (rec - &x)?.sqr()?.mean_all()?;
        let kl = kl_term(&dist.mean, &dist.logvar)?;
        let loss = (&reconstruction + (&kl * o.kl_weight)?)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::State(format!("vae training: the loss is {value} at step {step}: lower the learning rate ({})", o.lr)));
        }
        opt.backward_step(&loss)?;
        let s = VaeStep {
            step,
            reconstruction: reconstruction.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            lr: opt.learning_rate(),
        };
        on_step(&s);
        steps.push(s);
    }
    let (reconstruction_after, std) = evaluate(&vae, &images, o.batch_size)?;
    config.scaling_factor = if std > 0.0 { 1.0 / std } else { 1.0 };
    save(&varmap, &config, &src, &o.out, o.save_dtype)?;
    write_preview(&vae, &images[..images.len().min(PREVIEW_IMAGES)], &o.out.join(PREVIEW_FILE))?;
    tracing::info!(
        "vae training: reconstruction error {reconstruction_before:.5} -> {reconstruction_after:.5}, scaling_factor {:.5}; written to {}",
        config.scaling_factor,
        o.out.display()
    );
    let mut checks = Vec::with_capacity(o.check.len());
    for (data, images) in o.check.iter().zip(&check_images) {
        let name = data.file_name().map_or("check".into(), |n| n.to_string_lossy().into_owned());
        let preview = o.out.join(format!("reconstruction-{name}.png"));
        let (reconstruction, _) = evaluate(&vae, images, o.batch_size)?;
        write_preview(&vae, &images[..images.len().min(PREVIEW_IMAGES)], &preview)?;
        tracing::info!("vae training: reconstruction error on {}: {reconstruction:.5} ({})", data.display(), preview.display());
        checks.push(VaeCheck { data: data.clone(), reconstruction, preview });
    }
    Ok(VaeTrainOutcome { steps, scaling_factor: config.scaling_factor, reconstruction_before, reconstruction_after, checks, out: o.out.clone() })
}

/// Writes `config.json` (the source's, with the new `scaling_factor`) and the weights, each
/// through a temporary file.
fn save(varmap: &VarMap, config: &VaeConfig, src: &Path, out: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(format!("cannot create the VAE output folder {}", out.display()), out))?;
    let src_config = src.join("config.json");
    let text = std::fs::read_to_string(&src_config).map_err(io(format!("cannot read the VAE config {}", src_config.display()), &src_config))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", src_config.display())))?;
    json["scaling_factor"] = serde_json::json!(config.scaling_factor);
    let pretty = serde_json::to_string_pretty(&json).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic(&out.join("config.json"), pretty.as_bytes())?;
    let vars = varmap.data().lock().expect("varmap lock");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in vars.iter() {
        tensors.insert(name.clone(), Var::as_tensor(var).to_dtype(dtype)?);
    }
    let path = out.join("diffusion_pytorch_model.safetensors");
    let tmp = out.join(".diffusion_pytorch_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(io(format!("cannot write {}", path.display()), &path))?;
    Ok(())
}

/// How many images the preview shows, and its file name in the output folder.
pub const PREVIEW_IMAGES: usize = 8;
pub const PREVIEW_FILE: &str = "reconstruction.png";

/// The first images of the dataset (top row) over their reconstructions (bottom row), so that
/// what the error figure means can be seen.
fn write_preview(vae: &Vae, images: &[Tensor], path: &Path) -> Result<()> {
    let x = Tensor::stack(images, 0)?;
    let rec = vae.decode(&vae.encode(&x)?.mean)?;
    // [2, n, 3, h, w] -> [3, 2h, nw]: rows of images side by side.
    let (n, _, h, w) = x.dims4()?;
    let both = Tensor::stack(&[x, rec], 0)?.permute((2, 0, 3, 1, 4))?.reshape((3, 2 * h, n * w))?;
    let (w, h, rgb) = graft_sdxl::pipeline::to_rgb8(&((both / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)?;
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| Error::Internal("preview buffer size".into()))?;
    crate::samples::write_rgb_png(path, &img, None)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("cannot write {}", tmp.display()), &tmp))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot write {}", path.display()), path))
}
