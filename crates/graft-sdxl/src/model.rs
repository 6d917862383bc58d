//! The whole SDXL model: configs, components and tokenizers, loaded from a diffusers folder or a
//! single-file SGM checkpoint.
//!
//! Every component is loaded in two passes: first built with shape-only weights to learn what it
//! needs, then checked against the files (every missing key and wrong shape reported at once),
//! then built for real from memory-mapped tensors, each converted to the chosen weight precision
//! ([`WeightDtype`]) as it is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{Device, Result};
use candle_nn::VarBuilder;

use crate::clip::{ClipConfig, ClipTextModel};
use crate::error::{ConfigError, LoadError};
use crate::hooks::{Component, HookRegistry, LayerInfo};
use crate::precision::WeightDtype;
use crate::schedulers::SchedulerConfig;
use crate::sgm::{is_known_extra, SgmComponent, SgmLayout};
use crate::tokenizer::{ClipTokenizer, PadToken};
use crate::unet::{UNet, UNetConfig};
use crate::vae::{Vae, VaeConfig};
use crate::varbuilder::{open_safetensors, shape_only, Requests, Stored, TensorSource};

/// The architecture of every component.
#[derive(Debug, Clone)]
pub struct SdxlConfig {
    pub unet: UNetConfig,
    pub text_encoder: ClipConfig,
    pub text_encoder_2: ClipConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    /// An empty negative prompt gives zeroed unconditional embeddings (diffusers' SDXL default,
    /// `model_index.json`'s `force_zeros_for_empty_prompt`); `false`: the empty prompt encoded,
    /// for a model trained with captions dropped to "" (kohya's caption dropout).
    pub force_zeros_for_empty_prompt: bool,
}

fn read_text(path: &Path) -> std::result::Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read ({e}); is this a diffusers SDXL folder?")))
}

fn file_error(path: &Path, problem: impl Into<String>) -> LoadError {
    LoadError::File { path: path.to_path_buf(), problem: problem.into() }
}

/// Reads a component config with its own validating parser (its message names the file).
fn read_config<T>(path: &Path, parse: fn(&str, &str) -> std::result::Result<T, ConfigError>) -> std::result::Result<T, LoadError> {
    Ok(parse(&read_text(path)?, &path.display().to_string())?)
}

impl SdxlConfig {
    /// The built-in Stable Diffusion XL base 1.0 architecture.
    pub fn sdxl_base() -> Self {
        Self {
            unet: UNetConfig::sdxl_base(),
            text_encoder: ClipConfig::sdxl_text_encoder(),
            text_encoder_2: ClipConfig::sdxl_text_encoder_2(),
            vae: VaeConfig::sdxl_base(),
            scheduler: SchedulerConfig::sdxl_base(),
            force_zeros_for_empty_prompt: true,
        }
    }

    /// Reads `unet/`, `text_encoder/`, `text_encoder_2/`, `vae/` `config.json` and
    /// `scheduler/scheduler_config.json` of a diffusers folder.
    pub fn from_diffusers_folder(dir: &Path) -> std::result::Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(file_error(dir, "no such folder (expected a diffusers SDXL folder)"));
        }
        let unet = read_config(&dir.join("unet/config.json"), UNetConfig::from_json_str)?;
        if unet.addition_embed_type.as_deref() != Some("text_time") {
            return Err(file_error(
                &dir.join("unet/config.json"),
                "this UNet has no `text_time` add-embedding: it is not an SDXL model (SD 1.x / 2.x are not supported)",
            ));
        }
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler = if scheduler_path.is_file() { SchedulerConfig::from_file(&scheduler_path)? } else { SchedulerConfig::sdxl_base() };
        let index_path = dir.join("model_index.json");
        let force_zeros_for_empty_prompt = match index_path.is_file() {
            true => {
                let index: serde_json::Value =
                    serde_json::from_str(&read_text(&index_path)?).map_err(|e| file_error(&index_path, format!("not JSON: {e}")))?;
                index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true)
            }
            false => true,
        };
        Ok(Self {
            force_zeros_for_empty_prompt,
            unet,
            text_encoder: read_config(&dir.join("text_encoder/config.json"), ClipConfig::from_json_str)?,
            text_encoder_2: read_config(&dir.join("text_encoder_2/config.json"), ClipConfig::from_json_str)?,
            vae: read_config(&dir.join("vae/config.json"), VaeConfig::from_json_str)?,
            scheduler,
        })
    }

    fn sgm_layout(&self) -> Result<SgmLayout> {
        SgmLayout::from_configs(&self.unet, &self.vae, &self.text_encoder_2)
    }
}

/// The loaded model.
pub struct SdxlModel {
    pub config: SdxlConfig,
    pub unet: UNet,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    /// The VAE: [`SdxlModel::vae`] gives it, reading it back when training released it.
    pub vae: VaeSlot,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub device: Device,
    /// Where the weights came from, for PNG metadata and logs.
    pub source: PathBuf,
    /// The text encoders' files, kept mapped (not resident) so their weights can be released
    /// during training and read back for sample images; `None` for a model built by hand.
    pub text_encoder_files: Option<TextEncoderFiles>,
}

/// The VAE, which training with cached latents can release and read back from its files.
pub struct VaeSlot {
    loaded: RwLock<Option<Arc<Vae>>>,
    /// Its tensors, kept mapped (not resident); `None` for a model built by hand.
    source: Option<TensorSource>,
    /// A compute dtype set with [`SdxlModel::set_activations`], for a VAE read back.
    activations: Option<candle_core::DType>,
}

impl Clone for VaeSlot {
    fn clone(&self) -> Self {
        Self {
            loaded: RwLock::new(self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone()),
            source: self.source.clone(),
            activations: self.activations,
        }
    }
}

impl std::fmt::Debug for VaeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaeSlot(released: {})", self.is_released())
    }
}

impl VaeSlot {
    /// A VAE in memory, with the files to read it back from when it is released.
    pub fn new(vae: Vae, source: Option<TensorSource>) -> Self {
        Self { loaded: RwLock::new(Some(Arc::new(vae))), source, activations: None }
    }

    pub fn is_released(&self) -> bool {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// Where the two text encoders are read from, and whether their weights are released now.
#[derive(Clone)]
pub struct TextEncoderFiles {
    sources: [TensorSource; 2],
    released: Arc<AtomicBool>,
}

impl std::fmt::Debug for TextEncoderFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextEncoderFiles(released: {})", self.released.load(Ordering::Relaxed))
    }
}

impl TextEncoderFiles {
    fn new(te1: TensorSource, te2: TensorSource) -> Option<Self> {
        Some(Self { sources: [te1, te2], released: Arc::new(AtomicBool::new(false)) })
    }
}

/// Builds one component, first with shape-only weights (to learn what it needs and list
/// everything missing at once), then from `source`.
fn load_component<T>(
    source: &TensorSource,
    device: &Device,
    key_filter: impl Fn(&str) -> bool,
    build: impl Fn(VarBuilder<'static>) -> Result<T>,
) -> Result<T> {
    let (vb, requests) = shape_only(device);
    build(vb)?;
    let requests = take(requests);
    source.check(&requests)?;
    let unused = source.unused(&requests, key_filter);
    if !unused.is_empty() {
        tracing::warn!(
            "{}: {} stored tensors are not used by the model, e.g. {}",
            source.description(),
            unused.len(),
            unused.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    build(source.var_builder(device))
}

fn take(requests: Requests) -> Vec<(String, Vec<usize>)> {
    std::mem::take(&mut *requests.lock().expect("requests lock"))
}

/// The weight files of a diffusers component folder: prefers full precision, then the `.fp16`
/// variant; sharded files through their index.
fn component_files(dir: &Path, stem: &str) -> std::result::Result<Vec<PathBuf>, LoadError> {
    if !dir.is_dir() {
        return Err(file_error(dir, "missing component folder of the diffusers model"));
    }
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors"), format!("{stem}.bf16.safetensors")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            let json: serde_json::Value =
                serde_json::from_str(&read_text(&index)?).map_err(|e| file_error(&index, format!("invalid index ({e})")))?;
            let mut shards: Vec<String> =
                json["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
            shards.sort();
            shards.dedup();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
    }
    if dir.join(format!("{stem}.bin")).exists() || dir.join("pytorch_model.bin").exists() {
        return Err(file_error(
            dir,
            "only pickle (.bin) weights found; graft reads safetensors only (pickle files can run code): convert them to safetensors",
        ));
    }
    Err(file_error(dir, format!("no {stem}.safetensors (or .fp16 variant) found")))
}

impl SdxlModel {
    /// Loads a diffusers folder or a single-file checkpoint. The architecture comes from the folder's
    /// configs, from `model_config` (a diffusers folder) if given, or the built-in SDXL base 1.0.
    pub fn load(path: &Path, model_config: Option<&Path>, device: &Device) -> std::result::Result<Self, LoadError> {
        Self::load_as(path, model_config, device, WeightDtype::File)
    }

    /// [`SdxlModel::load`] with the weights (matrices and kernels) kept in `dtype`.
    pub fn load_as(path: &Path, model_config: Option<&Path>, device: &Device, dtype: WeightDtype) -> std::result::Result<Self, LoadError> {
        if !path.exists() {
            return Err(file_error(path, "no such file or folder (expected an SDXL diffusers folder or .safetensors checkpoint)"));
        }
        let config = match model_config {
            Some(dir) => SdxlConfig::from_diffusers_folder(dir)?,
            None if path.is_dir() => SdxlConfig::from_diffusers_folder(path)?,
            None => SdxlConfig::sdxl_base(),
        };
        let tokenizer_dir = model_config.unwrap_or(path);
        if path.is_dir() {
            Self::load_diffusers(path, config, device, tokenizer_dir, dtype)
        } else {
            Self::load_single_file(path, config, device, tokenizer_dir, dtype)
        }
    }

    fn load_diffusers(
        dir: &Path,
        config: SdxlConfig,
        device: &Device,
        tok_dir: &Path,
        dtype: WeightDtype,
    ) -> std::result::Result<Self, LoadError> {
        let src = |sub: &str, stem: &str| -> std::result::Result<TensorSource, LoadError> {
            Ok(TensorSource::new(component_files(&dir.join(sub), stem)?, dir.join(sub).display().to_string())?.with_dtype(dtype))
        };
        let all = |_: &str| true;
        let unet_src = src("unet", "diffusion_pytorch_model")?;
        let unet = load_component(&unet_src, device, all, |vb| UNet::new(vb, &config.unet))?;
        let te1 = text_encoder_source(src("text_encoder", "model")?);
        let text_encoder = load_component(&te1, device, all, |vb| ClipTextModel::new(vb, &config.text_encoder, Component::TextEncoder, false))?;
        let te2 = text_encoder_source(src("text_encoder_2", "model")?);
        let text_encoder_2 =
            load_component(&te2, device, all, |vb| ClipTextModel::new(vb, &config.text_encoder_2, Component::TextEncoder2, true))?;
        let vae_src = src("vae", "diffusion_pytorch_model")?;
        let vae = VaeSlot::new(load_component(&vae_src, device, all, |vb| Vae::new(vb, &config.vae))?, Some(vae_src));
        let (tokenizer, tokenizer_2) = tokenizers(tok_dir)?;
        let text_encoder_files = TextEncoderFiles::new(te1, te2);
        let (device, source) = (device.clone(), dir.to_path_buf());
        Ok(Self { config, unet, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, device, source, text_encoder_files })
    }

    fn load_single_file(
        file: &Path,
        config: SdxlConfig,
        device: &Device,
        tok_dir: &Path,
        dtype: WeightDtype,
    ) -> std::result::Result<Self, LoadError> {
        let desc = file.display().to_string();
        let files = open_safetensors(&[file.to_path_buf()])?;
        let keys: Vec<String> = files.tensors().into_iter().map(|(k, _)| k).collect();
        drop(files);
        check_single_file_is_sdxl(file, &keys)?;
        let layout = config.sgm_layout()?;
        let base = TensorSource::new(vec![file.to_path_buf()], desc.clone())?.with_dtype(dtype);
        let component = |c: SgmComponent, build_requests: &dyn Fn(VarBuilder<'static>) -> Result<()>| -> Result<TensorSource> {
            // Learn the names the model asks for, then map each to its SGM key.
            let (vb, requests) = shape_only(device);
            build_requests(vb)?;
            let mut renames = HashMap::new();
            for (name, _) in take(requests) {
                if let Some(k) = layout.to_sgm(c, &name) {
                    renames.insert(name, Stored { key: k.name, transform: k.transform });
                }
            }
            Ok(base.clone().with_renames(renames))
        };
        let unet_src = component(SgmComponent::Unet, &|vb| UNet::new(vb, &config.unet).map(|_| ()))?;
        let unet = load_component(
            &unet_src,
            device,
            |k| k.starts_with("model.diffusion_model.") && !is_known_extra(k),
            |vb| UNet::new(vb, &config.unet),
        )?;
        let te1_src =
            component(SgmComponent::TextEncoder, &|vb| ClipTextModel::new(vb, &config.text_encoder, Component::TextEncoder, false).map(|_| ()))?;
        let text_encoder = load_component(
            &te1_src,
            device,
            |k| k.starts_with("conditioner.embedders.0.") && !is_known_extra(k),
            |vb| ClipTextModel::new(vb, &config.text_encoder, Component::TextEncoder, false),
        )?;
        let te2_src = component(SgmComponent::TextEncoder2, &|vb| {
            ClipTextModel::new(vb, &config.text_encoder_2, Component::TextEncoder2, true).map(|_| ())
        })?;
        let text_encoder_2 = load_component(
            &te2_src,
            device,
            |k| k.starts_with("conditioner.embedders.1.") && !is_known_extra(k),
            |vb| ClipTextModel::new(vb, &config.text_encoder_2, Component::TextEncoder2, true),
        )?;
        let vae_src = component(SgmComponent::Vae, &|vb| Vae::new(vb, &config.vae).map(|_| ()))?;
        let vae =
            load_component(&vae_src, device, |k| k.starts_with("first_stage_model.") && !is_known_extra(k), |vb| Vae::new(vb, &config.vae))?;
        let vae = VaeSlot::new(vae, Some(vae_src));
        let (tokenizer, tokenizer_2) = tokenizers(tok_dir)?;
        let text_encoder_files = TextEncoderFiles::new(te1_src, te2_src);
        let (device, source) = (device.clone(), file.to_path_buf());
        Ok(Self { config, unet, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, device, source, text_encoder_files })
    }

    /// The precision the UNet's matrices are kept in (the conv_in kernel's).
    pub fn weight_dtype(&self) -> candle_core::DType {
        self.unet.conv_in_weight().dtype()
    }

    /// Runs every component in `dtype` from now on (the default is
    /// [`crate::precision::activation_dtype`]: bf16 for bf16 weights on a GPU, else f32). bf16
    /// on the CPU runs the GPU's code path there, for tests.
    pub fn set_activations(&mut self, dtype: candle_core::DType) {
        self.unet.set_activations(dtype);
        self.text_encoder.set_activations(dtype);
        self.text_encoder_2.set_activations(dtype);
        self.vae.activations = Some(dtype);
        if let Some(v) = self.vae.loaded.get_mut().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Arc::make_mut(v).set_activations(dtype);
        }
    }

    /// Every hook point of the three hooked components: UNet, then text encoders.
    pub fn layers(&self) -> Vec<&LayerInfo> {
        self.registries().into_iter().flat_map(|r| r.layers().iter()).collect()
    }

    pub fn registries(&self) -> [&HookRegistry; 3] {
        [self.unet.registry(), self.text_encoder.registry(), self.text_encoder_2.registry()]
    }

    /// The whole model computes with its loaded base weights while the guard lives: every
    /// override present now (a training run's unfrozen or folded weights) is set aside, and put
    /// back when the guard is dropped ([`crate::overrides::AsLoaded`]). For a generate request that
    /// shares the model with a run; take it while no step runs.
    pub fn as_loaded(&self) -> crate::overrides::AsLoaded {
        crate::overrides::AsLoaded::new(self.registries().into_iter().flat_map(|r| r.shared_weights().cloned()))
    }

    /// The hook points whose base weights are overridden now (empty: the model is as loaded).
    pub fn overridden(&self) -> Vec<String> {
        self.registries().into_iter().flat_map(|r| r.overridden()).map(str::to_string).collect()
    }

    /// The VAE, read back from its files first when [`SdxlModel::release_vae`] released it.
    pub fn vae(&self) -> Result<Arc<Vae>> {
        if let Some(v) = self.vae.loaded.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(v.clone());
        }
        let mut slot = self.vae.loaded.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = slot.as_ref() {
            return Ok(v.clone());
        }
        let Some(source) = &self.vae.source else {
            candle_core::bail!("the VAE was released and this model has no files to read it back from");
        };
        let mut vae = load_component(source, &self.device, |_| false, |vb| Vae::new(vb, &self.config.vae))?;
        if let Some(dt) = self.vae.activations {
            vae.set_activations(dt);
        }
        let vae = Arc::new(vae);
        *slot = Some(vae.clone());
        Ok(vae)
    }

    /// Frees the VAE (training with cached latents does not use it); [`SdxlModel::vae`] reads it
    /// back. False when it is already released; an error for a model built by hand.
    pub fn release_vae(&self) -> Result<bool> {
        if self.vae.source.is_none() {
            candle_core::bail!("this model was not loaded from files: its VAE cannot be released and read back");
        }
        let released = self.vae.loaded.write().unwrap_or_else(|e| e.into_inner()).take().is_some();
        if released {
            // Only then: training calls this every step, and trimming each time would hand
            // back the heap the steps reuse (see return_freed_memory).
            return_freed_memory();
        }
        Ok(released)
    }

    /// True while the text encoders' weights are released ([`SdxlModel::release_text_encoders`]).
    pub fn text_encoders_released(&self) -> bool {
        self.text_encoder_files.as_ref().is_some_and(|f| f.released.load(Ordering::Acquire))
    }

    /// Frees the text encoders' linear weights (most of their memory; kohya's
    /// `cache_text_encoder_outputs`), for training with cached embeddings. The next
    /// [`SdxlModel::encode_prompts`] reads them back from the files. Returns the bytes freed;
    /// 0 when already released. An error for a model built by hand (no files to read back).
    pub fn release_text_encoders(&self) -> Result<usize> {
        let Some(files) = &self.text_encoder_files else {
            candle_core::bail!("this model was not loaded from files: its text encoders cannot be released and read back");
        };
        if files.released.swap(true, Ordering::AcqRel) {
            return Ok(0);
        }
        let freed = self.text_encoder.registry().release_linears() + self.text_encoder_2.registry().release_linears();
        return_freed_memory();
        Ok(freed)
    }

    /// Frees the UNet's linear and conv weights for good (a process's last generate, before its
    /// decode): nothing reads them back, and the model cannot denoise again. Returns the bytes.
    pub fn release_unet(&self) -> usize {
        let freed = self.unet.registry().release_linears();
        return_freed_memory();
        freed
    }

    /// Reads the text encoders' weights back after [`SdxlModel::release_text_encoders`], in the
    /// precision they were loaded in; nothing to do when they are in memory.
    pub fn restore_text_encoders(&self) -> Result<()> {
        let Some(files) = &self.text_encoder_files else { return Ok(()) };
        if !files.released.load(Ordering::Acquire) {
            return Ok(());
        }
        let c = &self.config;
        let te1 = load_component(
            &files.sources[0],
            &self.device,
            |_| false,
            |vb| ClipTextModel::new(vb, &c.text_encoder, Component::TextEncoder, false),
        )?;
        self.text_encoder.registry().take_linears(te1.registry())?;
        drop(te1);
        let te2 = load_component(
            &files.sources[1],
            &self.device,
            |_| false,
            |vb| ClipTextModel::new(vb, &c.text_encoder_2, Component::TextEncoder2, true),
        )?;
        self.text_encoder_2.registry().take_linears(te2.registry())?;
        files.released.store(false, Ordering::Release);
        Ok(())
    }
}

/// transformers 5 saves text encoders without the `text_model.` prefix; real SDXL files have it.
fn text_encoder_source(source: TensorSource) -> TensorSource {
    let keys = source.keys();
    if keys.iter().any(|k| k.starts_with("text_model.")) {
        return source;
    }
    let renames = keys
        .into_iter()
        .filter(|k| k != "text_projection.weight")
        .map(|k| (format!("text_model.{k}"), Stored { key: k, transform: crate::varbuilder::Transform::None }))
        .collect();
    source.with_renames(renames)
}

/// The tokenizers of a diffusers folder, or the built-in CLIP vocabulary.
fn tokenizers(dir: &Path) -> std::result::Result<(ClipTokenizer, ClipTokenizer), LoadError> {
    let load = |sub: &str, pad: PadToken| -> std::result::Result<ClipTokenizer, LoadError> {
        let d = dir.join(sub);
        if dir.is_dir() && d.is_dir() {
            Ok(ClipTokenizer::from_folder_with_default_pad(&d, pad)?)
        } else {
            Ok(ClipTokenizer::builtin(pad))
        }
    };
    Ok((load("tokenizer", PadToken::EndOfText)?, load("tokenizer_2", PadToken::Exclamation)?))
}

/// A clear error for single files that are not SDXL checkpoints.
fn check_single_file_is_sdxl(file: &Path, keys: &[String]) -> std::result::Result<(), LoadError> {
    let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if has("model.diffusion_model.") && has("conditioner.embedders.1.") {
        return Ok(());
    }
    let what = if has("cond_stage_model.") {
        "a Stable Diffusion 1.x / 2.x checkpoint"
    } else if has("lora_unet_") || keys.iter().any(|k| k.contains(".lora_A.") || k.contains("lora_down")) {
        "a LoRA adapter, not a checkpoint (pass it with --adapter)"
    } else if has("down_blocks.") {
        "a diffusers UNet file: pass the diffusers folder that holds it"
    } else {
        "not an SDXL single-file checkpoint (no model.diffusion_model.* and conditioner.embedders.* keys)"
    };
    Err(file_error(file, format!("{what}; graft needs an SDXL checkpoint")))
}

/// Builds every component with shape-only weights: the hook points of an architecture without
/// loading (or allocating) any weight.
pub fn layers_of(config: &SdxlConfig) -> Result<Vec<LayerInfo>> {
    let dev = Device::Cpu;
    let unet = UNet::new(shape_only(&dev).0, &config.unet)?;
    let te1 = ClipTextModel::new(shape_only(&dev).0, &config.text_encoder, Component::TextEncoder, false)?;
    let te2 = ClipTextModel::new(shape_only(&dev).0, &config.text_encoder_2, Component::TextEncoder2, true)?;
    Ok([unet.registry(), te1.registry(), te2.registry()].iter().flat_map(|r| r.layers().to_vec()).collect())
}

/// Hands the allocator's free memory back to the system. Weights are mostly a few MB each, so
/// they live on the heap, which the host keeps untrimmed between training steps (see
/// `host/src/runtime.rs`); after freeing whole components, trimming makes the freed gigabytes
/// available to the next large allocations (a VAE decode's activations are mapped afresh).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
