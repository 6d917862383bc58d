//! `graft train --config FILE.toml`: what a run is made of.

use std::path::{Path, PathBuf};

use crate::error::{io, At, Error, Result};
use serde::{Deserialize, Serialize};

use crate::options::{parse_toml, TrainOptions};

/// An example config, shown by `graft train --help`.
pub const EXAMPLE: &str = r#"model = "models/sd_xl_base_1.0.safetensors"   # diffusers folder or single file
# model_config = "models/sdxl-base-1.0"           # configs for a single file (default: built-in SDXL)
output_dir = "out/my-style"
output_name = "my-style"                          # file names and ss_output_name
seed = 42
steps = 1000
batch_size = 1
gradient_accumulation = 1
# prediction_type = "v_prediction"                # default: the model's scheduler config
noise_offset = 0.0
min_snr_gamma = 5.0                               # 0: off
max_grad_norm = 1.0                               # global clip; 0: off
optimizer = "AdamW"                               # AdamW, AdamW8bit, Lion, Prodigy, Adafactor
                                                  # (kohya's names); arguments in [optimizer_args]
lr_schedule = "cosine"                            # constant, constant_with_warmup, linear, cosine,
                                                  # cosine_with_restarts
# lr_scheduler_num_cycles = 1                     # restarts of cosine_with_restarts (kohya's name)
warmup_steps = 50
save_every = 250                                  # checkpoints (0: only at the end)
sample_every = 250                                # sample images (0: never)
sample_prompts = "prompts.txt"                    # kohya prompt file: `a cat --w 1024 --h 1024 --d 1`
# sample_sampler = "euler_a"                      # default sampler of the prompts (kohya's name)
cache_latents = "memory"                          # memory, disk or none
max_bad_steps = 10                                # stop after this many non-finite steps in a row
dtype = "bf16"                                    # frozen weights: file (default), bf16, fp16, fp32
gradient_checkpointing = true                     # recompute activations in the backward: less memory
cache_text_encoder_outputs = true                 # free the text encoders during the steps when
                                                  # their outputs are cached (back for samples)
# validation_split = 0.1                          # hold out this fraction of the images (or
# validation_dir = "data/my-style-val"            # a folder of images + captions) for a
# validate_every = 100                            # validation loss every N steps and at the end
# validation_timesteps = 4                        # a count spread over 0..1000, or [200, 500, 800]
# validation_seed = 42                            # its fixed noise and split (default: seed)

[optimizer_args]                                  # the reference libraries' names, e.g.
weight_decay = 0.01                               # replaces every group's weight decay
betas = [0.9, 0.999]
# Prodigy: d_coef, d0, growth_rate, use_bias_correction, safeguard_warmup, decouple, beta3, eps
# Adafactor: eps = [1e-30, 1e-3], clip_threshold, decay_rate, beta1, scale_parameter,
#            relative_step, warmup_init;  AdamW8bit: min_8bit_size;  Lion: betas, weight_decay

# export_checkpoint = true                       # also the model with trained base weights merged
                                                  # (full fine-tuning), as {output_name}-checkpoint/

[dataset]
dir = "data/my-style"                             # images + .txt captions, kohya N_name folders
# config = "dataset.toml"                         # or a kohya dataset config instead of dir
resolution = 1024
enable_bucket = true
min_bucket_reso = 256                             # kohya's bucket range and step
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false                         # true: never enlarge an image
shuffle_caption = false
keep_tokens = 0
flip_aug = false
caption_dropout_rate = 0.0

[strategy]
plugin = "lora"                                   # a plugin id (see `graft plugins list`)
config = { rank = 8, alpha = 32 }                 # the plugin's own config (see its manifest)
"#;

/// A `graft train` config: what to train on and where to write, the [`TrainOptions`] (at the
/// top level of the file), the dataset and the strategy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    pub output_dir: PathBuf,
    #[serde(default = "default_name")]
    pub output_name: String,
    #[serde(flatten)]
    pub options: TrainOptions,
    #[serde(default)]
    pub sample_prompts: Option<PathBuf>,
    /// Also write the base model with the trained base weights merged in, as the diffusers folder
    /// `{output_dir}/{output_name}-checkpoint` (for strategies that unfreeze base weights, like
    /// `full`; kohya's full fine-tuning saves a checkpoint the same way).
    #[serde(default)]
    pub export_checkpoint: bool,
    /// The model is shared with other work (`graft serve`, `graft compare`): nothing of it is
    /// released.
    #[serde(skip)]
    pub shared_model: bool,
    pub dataset: DatasetSection,
    pub strategy: StrategySection,
}

/// The top-level keys of a training config besides the options.
const OWN_KEYS: [&str; 8] = ["model", "model_config", "output_dir", "output_name", "sample_prompts", "export_checkpoint", "dataset", "strategy"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub config: Option<PathBuf>,
    #[serde(default = "resolution")]
    pub resolution: usize,
    #[serde(default)]
    pub enable_bucket: bool,
    /// kohya's bucket range and step (defaults 256, 1024, 64) and `bucket_no_upscale`; used with
    /// `enable_bucket`.
    #[serde(default = "min_bucket_reso")]
    pub min_bucket_reso: usize,
    #[serde(default = "max_bucket_reso")]
    pub max_bucket_reso: usize,
    #[serde(default = "bucket_reso_steps")]
    pub bucket_reso_steps: usize,
    #[serde(default)]
    pub bucket_no_upscale: bool,
    #[serde(default)]
    pub shuffle_caption: bool,
    #[serde(default)]
    pub keep_tokens: usize,
    #[serde(default)]
    pub flip_aug: bool,
    #[serde(default)]
    pub caption_dropout_rate: f64,
    #[serde(default)]
    pub caption_extension: Option<String>,
    /// Report broken images and missing captions as warnings and leave them out.
    #[serde(default)]
    pub skip_bad: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySection {
    pub plugin: String,
    /// Keys its parameters (default: the plugin id).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "empty_table")]
    pub config: toml::Table,
}

fn default_name() -> String {
    "graft".into()
}

fn min_bucket_reso() -> usize {
    256
}

fn max_bucket_reso() -> usize {
    1024
}

fn bucket_reso_steps() -> usize {
    64
}

fn resolution() -> usize {
    1024
}
fn empty_table() -> toml::Table {
    toml::Table::new()
}

impl TrainConfig {
    /// The prompts to render every `sample_every` steps (none when sampling is off), sized and
    /// seeded like the training images unless a prompt line says otherwise.
    pub fn sample_prompts_to_render(&self) -> Result<Vec<crate::samples::SamplePrompt>> {
        match &self.sample_prompts {
            Some(p) if self.options.sample_every > 0 => {
                let defaults = crate::samples::SampleDefaults {
                    width: self.dataset.resolution,
                    height: self.dataset.resolution,
                    seed: self.options.seed,
                    scheduler: self.sample_scheduler()?,
                    ..Default::default()
                };
                crate::samples::parse_prompt_file(p, &defaults)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The graft scheduler of `sample_sampler`.
    fn sample_scheduler(&self) -> Result<Option<String>> {
        let Some(name) = &self.options.sample_sampler else { return Ok(None) };
        let s = crate::samples::sampler_to_scheduler(name).ok_or_else(|| {
            Error::Config(format!(
                "`sample_sampler = \"{name}\"` is not a sampler graft has; use one of {}",
                crate::samples::SAMPLERS.join(", ")
            ))
        })?;
        Ok(Some(s.to_string()))
    }

    /// Reads a config file; relative paths in it are relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(format!("cannot read training config {}", path.display()), path))?;
        Self::from_toml(&text, path)
    }

    /// Parses a config's text; `path` names it in messages, and relative paths are taken from its
    /// folder.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let what = || format!("{}: invalid training config (`graft train --help` shows an example)", path.display());
        let mut config: TrainConfig = parse_toml(text, &OWN_KEYS).at(what)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().at(|| format!("{}", path.display()))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model);
        fix(&mut self.output_dir);
        self.model_config.as_mut().map(fix);
        self.sample_prompts.as_mut().map(fix);
        self.dataset.dir.as_mut().map(fix);
        self.dataset.config.as_mut().map(fix);
        self.options.validation_dir.as_mut().map(fix);
    }

    pub fn validate(&self) -> Result<()> {
        crate::names::check_name("output_name", &self.output_name)?;
        if self.options.steps == 0 {
            return Err(Error::Config("`steps` must be at least 1".to_string()));
        }
        if self.options.gradient_accumulation == 0 {
            return Err(Error::Config("`gradient_accumulation` must be at least 1".to_string()));
        }
        match (&self.dataset.dir, &self.dataset.config) {
            (None, None) => {
                return Err(Error::Config(
                    "[dataset] needs `dir` (a folder of images and captions) or `config` (a kohya dataset TOML)".to_string(),
                ))
            }
            (Some(_), Some(_)) => return Err(Error::Config("[dataset] has both `dir` and `config`: keep one".to_string())),
            _ => {}
        }
        if let Some(n) = self.options.lr_scheduler_num_cycles {
            if !(n.is_finite() && n > 0.0) {
                return Err(Error::Config(format!("`lr_scheduler_num_cycles` is {n}: use a number above 0 (1: one restart)")));
            }
        }
        crate::validation::check(&self.options)?;
        self.sample_scheduler()?;
        self.optimizer_spec()?;
        graft_sdxl::pipeline::check_size(self.dataset.resolution, self.dataset.resolution)
            .map_err(|e| Error::Config(e.to_string()))
            .at(|| "[dataset] resolution".to_string())?;
        Ok(())
    }

    /// `optimizer` and `[optimizer_args]`, checked.
    pub fn optimizer_spec(&self) -> Result<crate::optim::OptimizerSpec> {
        crate::optim::OptimizerSpec::parse(&self.options.optimizer, &self.options.optimizer_args)
    }

    /// The plugin's config as JSON.
    pub fn strategy_json(&self) -> Result<String> {
        serde_json::to_string(&self.strategy.config).map_err(|e| Error::Config(format!("[strategy] config as JSON: {e}")))
    }
}
