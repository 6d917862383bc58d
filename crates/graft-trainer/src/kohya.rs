//! `graft train --kohya-config FILE.toml`: a training config of kohya sd-scripts
//! (`sdxl_train_network.py --config_file`, `networks.lora`), as the kohya_ss GUI saves it
//! (`config_lora-<date>.toml`), turned into a graft [`TrainConfig`].
//!
//! Every key is one of three things, so nothing is ignored silently:
//! - **mapped** to a graft key (the table in docs/KOHYA.md);
//! - **no effect** in graft: logging, data-loader and attention-kernel switches, or a setting at a
//!   value that changes nothing (`loss_type = "l2"`, `max_token_length = 75`); listed as notes;
//! - **unsupported**: it would change the training and graft cannot do it. These are one error
//!   that names each key and value, unless `--ignore-unsupported` turns them into notes.
//!
//! As in sd-scripts, sections (`[model_arguments]`, ...) are flattened, relative paths are taken
//! from the current folder, and kohya's defaults apply where they differ from graft's
//! (`network_alpha` 1, `network_dim` 4, `max_grad_norm` 1, `max_train_steps` 1600, `learning_rate`
//! 2e-6, `caption_extension` `.caption`, latents not cached, epsilon prediction, sampler ddim).
//! Epoch counts (`max_train_epochs`, `save_every_n_epochs`, `sample_every_n_epochs`) become steps
//! with the dataset's batches per epoch, counted as kohya does (buckets batched apart, divided by
//! `gradient_accumulation_steps`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{io, At, Error, Result};
use toml::Value;

use crate::config::TrainConfig;

/// kohya's UNet LoRA targets: every linear of every `Transformer2DModel`.
const UNET_TARGETS: [&str; 8] = [
    "unet.*.proj_in",
    "unet.*.proj_out",
    "unet.*.to_q",
    "unet.*.to_k",
    "unet.*.to_v",
    "unet.*.to_out.0",
    "unet.*.ff.net.0.proj",
    "unet.*.ff.net.2",
];

/// kohya's text-encoder LoRA targets: `CLIPAttention` and `CLIPMLP` of both encoders.
const TEXT_ENCODER_TARGETS: [&str; 6] = [
    "text_encoder*.self_attn.q_proj",
    "text_encoder*.self_attn.k_proj",
    "text_encoder*.self_attn.v_proj",
    "text_encoder*.self_attn.out_proj",
    "text_encoder*.mlp.fc1",
    "text_encoder*.mlp.fc2",
];

/// The optimizers graft has, by kohya's `optimizer_type` (matched case-insensitively).
const OPTIMIZERS: [&str; 5] = ["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor"];

/// Keys that change nothing in graft, with why.
const NO_EFFECT: &[(&str, &str)] = &[
    ("xformers", "graft picks its attention kernel itself"),
    ("sdpa", "graft picks its attention kernel itself"),
    ("mem_eff_attn", "graft picks its attention kernel itself"),
    ("max_data_loader_n_workers", "graft loads data in process"),
    ("persistent_data_loader_workers", "graft loads data in process"),
    ("lowram", "graft memory-maps the model"),
    ("lowvram", "graft memory-maps the model"),
    ("highvram", "graft memory-maps the model"),
    ("vae_batch_size", "graft encodes latents one batch at a time"),
    ("skip_cache_check", "graft checks its latent cache by key"),
    ("cache_text_encoder_outputs_to_disk", "graft keeps text embeddings in memory"),
    ("logging_dir", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("log_with", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("log_prefix", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("log_tracker_name", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("log_tracker_config", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("log_config", "graft writes loss.jsonl and loss.svg in output_dir"),
    ("wandb_api_key", "no wandb in graft"),
    ("wandb_run_name", "no wandb in graft"),
    ("huggingface_repo_id", "graft uploads nothing"),
    ("huggingface_token", "graft uploads nothing"),
    ("huggingface_repo_type", "graft uploads nothing"),
    ("huggingface_repo_visibility", "graft uploads nothing"),
    ("huggingface_path_in_repo", "graft uploads nothing"),
    ("save_state_to_huggingface", "graft uploads nothing"),
    ("resume_from_huggingface", "graft uploads nothing"),
    ("async_upload", "graft uploads nothing"),
    ("dynamo_backend", "no torch.compile in graft"),
    ("save_precision", "graft writes adapter files in f32"),
    ("save_state", "graft's checkpoints always hold the optimizer state (resume with --resume)"),
    ("save_state_on_train_end", "graft's checkpoints always hold the optimizer state"),
    ("save_last_n_steps", "graft keeps every checkpoint"),
    ("save_last_n_steps_state", "graft keeps every checkpoint"),
    ("save_last_n_epochs", "graft keeps every checkpoint"),
    ("save_last_n_epochs_state", "graft keeps every checkpoint"),
    ("no_half_vae", "graft keeps the SDXL VAE out of fp16 (it overflows there)"),
    ("full_bf16", "graft keeps adapters, their gradients and the optimizer state in f32"),
    ("full_fp16", "graft keeps adapters, their gradients and the optimizer state in f32"),
    ("clip_skip", "sd-scripts ignores clip_skip for SDXL too"),
    ("training_comment", "not written into the adapter's metadata"),
    ("metadata_title", "not written into the adapter's metadata"),
    ("metadata_author", "not written into the adapter's metadata"),
    ("metadata_description", "not written into the adapter's metadata"),
    ("metadata_license", "not written into the adapter's metadata"),
    ("metadata_tags", "not written into the adapter's metadata"),
    ("sdxl", "graft trains SDXL"),
    ("output_config", "use --print to see the graft config"),
    ("huber_c", "used only by the huber and smooth_l1 losses"),
    ("huber_scale", "used only by the huber and smooth_l1 losses"),
    ("huber_schedule", "used only by the huber and smooth_l1 losses"),
    ("prior_loss_weight", "used only with regularization images (reg_data_dir)"),
    ("lr_scheduler_power", "used only by the polynomial schedule"),
    ("lr_scheduler_num_cycles", "used only by cosine_with_restarts"),
    ("epoch", "the GUI's epoch count, used when max_train_steps and max_train_epochs are not set"),
];

/// Keys graft has no equivalent for, with the values at which they change nothing. Any other value
/// would change the training. (`false`, `0`, `""` and `[]` are inactive for every key.)
const UNSUPPORTED: &[(&str, &[&str], &str)] = &[
    ("reg_data_dir", &[], "regularization images"),
    ("vae", &[], "a separate VAE file"),
    ("network_weights", &[], "starting from saved LoRA weights"),
    ("dim_from_weights", &[], "starting from saved LoRA weights"),
    ("resume", &[], "kohya's state folders (graft resumes its own checkpoints with --resume)"),
    ("loss_type", &["l2"], "losses other than l2"),
    ("v2", &[], "SD 2.x models"),
    ("v_pred_like_loss", &[], "v_pred_like_loss"),
    ("scale_v_pred_loss_like_noise_pred", &[], "scale_v_pred_loss_like_noise_pred"),
    ("zero_terminal_snr", &[], "zero terminal SNR"),
    ("debiased_estimation_loss", &[], "the debiased estimation loss"),
    ("masked_loss", &[], "masked loss"),
    ("alpha_mask", &[], "alpha masks"),
    ("weighted_captions", &[], "weighted captions"),
    ("min_timestep", &["0"], "a timestep range"),
    ("max_timestep", &["1000"], "a timestep range"),
    ("ip_noise_gamma", &[], "input perturbation noise"),
    ("ip_noise_gamma_random_strength", &[], "input perturbation noise"),
    ("noise_offset_random_strength", &[], "a random noise offset"),
    ("noise_offset_type", &["Original"], "multires noise"),
    ("multires_noise_iterations", &[], "multires noise"),
    ("multires_noise_discount", &["0.3"], "multires noise"),
    ("adaptive_noise_scale", &[], "adaptive noise scale"),
    ("scale_weight_norms", &[], "max-norm regularization"),
    ("stop_text_encoder_training", &[], "stopping the text encoders early"),
    ("loraplus_lr_ratio", &[], "LoRA+"),
    ("loraplus_unet_lr_ratio", &[], "LoRA+"),
    ("loraplus_text_encoder_lr_ratio", &[], "LoRA+"),
    ("fp8_base", &[], "fp8 base weights"),
    ("fp8_base_unet", &[], "fp8 base weights"),
    ("color_aug", &[], "colour augmentation"),
    ("random_crop", &[], "random crops"),
    ("face_crop_aug_range", &[], "face crops"),
    ("caption_dropout_every_n_epochs", &[], "caption dropout by epoch"),
    ("caption_tag_dropout_rate", &[], "tag dropout"),
    ("caption_prefix", &[], "caption prefixes"),
    ("caption_suffix", &[], "caption suffixes"),
    ("keep_tokens_separator", &[], "a keep_tokens separator"),
    ("secondary_separator", &[], "a secondary separator"),
    ("token_warmup_min", &["1"], "token warmup"),
    ("token_warmup_step", &[], "token warmup"),
    ("max_token_length", &["75"], "prompts longer than 75 tokens"),
    ("sample_at_first", &[], "a sample before the first step"),
    ("lr_scheduler_args", &[], "scheduler arguments"),
    ("lr_scheduler_type", &[], "a custom scheduler class"),
    ("lr_decay_steps", &[], "warmup-stable-decay schedules"),
    ("lr_scheduler_timescale", &[], "inverse square root schedules"),
    ("lr_scheduler_min_lr_ratio", &[], "a minimum learning rate ratio"),
];

/// A kohya config read into a graft config.
#[derive(Debug)]
pub struct KohyaImport {
    /// The graft config as TOML text (what `--print` shows and what trains).
    pub toml: String,
    pub config: TrainConfig,
    /// One line per key that graft does not use, and why.
    pub notes: Vec<String>,
}

/// Reads `path` (a kohya TOML), taking relative paths from `cwd`. Unsupported settings are an
/// error unless `ignore_unsupported`.
pub fn import(path: &Path, cwd: &Path, ignore_unsupported: bool) -> Result<KohyaImport> {
    let text = std::fs::read_to_string(path).map_err(io(format!("cannot read kohya config {}", path.display()), path))?;
    let table: toml::Table = toml::from_str(&text).map_err(io(format!("{}: not a TOML file", path.display()), path))?;
    let mut keys = Keys::flatten(table);
    let mut notes = Vec::new();
    let mut graft = toml::Table::new();
    let result = map(&mut keys, cwd, &mut graft, &mut notes);
    let mut unsupported = Vec::new();
    for (key, value) in std::mem::take(&mut keys.0) {
        if let Some((_, why)) = NO_EFFECT.iter().find(|(k, _)| *k == key) {
            notes.push(format!("`{key}`: no effect ({why})"));
        } else if let Some((_, harmless, what)) = UNSUPPORTED.iter().find(|(k, _, _)| *k == key) {
            if inactive(&value) || harmless.contains(&plain(&value).as_str()) {
                notes.push(format!("`{key} = {value}`: no effect"));
            } else {
                unsupported.push(format!("`{key} = {value}` ({what})"));
            }
        } else {
            unsupported.push(format!("`{key} = {value}` (not a setting graft knows)"));
        }
    }
    result.at(|| path.display().to_string())?;
    if !unsupported.is_empty() {
        if !ignore_unsupported {
            return Err(Error::Config(format!(
                "{}: graft cannot do what these kohya settings ask, and training without them would differ:\n  {}\n\
                 Remove them from the file, or pass --ignore-unsupported to train without them.",
                path.display(),
                unsupported.join("\n  ")
            )));
        }
        notes.extend(unsupported.into_iter().map(|u| format!("{u}: unsupported, left out (--ignore-unsupported)")));
    }
    let toml = toml::to_string(&graft).map_err(|e| Error::Internal(format!("writing the graft config: {e}")))?;
    let mut config = TrainConfig::from_toml(&toml, &cwd.join("graft-config.toml"))
        .at(|| format!("{}: the graft config made from it is not valid", path.display()))?;
    let toml = epochs_to_steps(&mut config, &mut graft, &keys.1).at(|| path.display().to_string())?.unwrap_or(toml);
    Ok(KohyaImport { toml, config, notes })
}

/// The keys not yet taken, and the epoch-based counts waiting for the dataset's epoch length.
struct Keys(BTreeMap<String, Value>, Epochs);

/// Counts given in epochs: converted once the dataset's batches per epoch are known.
#[derive(Default)]
struct Epochs {
    max_train_epochs: Option<u64>,
    save_every_n_epochs: Option<u64>,
    sample_every_n_epochs: Option<u64>,
    /// kohya's warmup as a fraction of the run (`lr_warmup_steps` below 1).
    warmup_ratio: Option<f64>,
}

impl Keys {
    /// sd-scripts' rule: a section's keys count as top-level keys.
    fn flatten(table: toml::Table) -> Self {
        let mut flat = BTreeMap::new();
        for (k, v) in table {
            match v {
                Value::Table(section) => flat.extend(section),
                v => {
                    flat.insert(k, v);
                }
            }
        }
        Keys(flat, Epochs::default())
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    fn f64(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => number(&v).map(Some).at(|| format!("`{key} = {v}`: expected a number")),
        }
    }

    fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.f64(key)? {
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as u64)),
            Some(x) => Err(Error::Config(format!("`{key} = {x}`: expected a whole number >= 0"))),
            None => Ok(None),
        }
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Boolean(b)) => Ok(b),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") || s.is_empty() => Ok(false),
            Some(v) => Err(Error::Config(format!("`{key} = {v}`: expected true or false"))),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::Config(format!("`{key} = {v}`: expected a string"))),
        }
    }

    /// kohya's `key=value` argument lists: a TOML list of strings (what kohya_ss writes) or one
    /// string of space-separated items (what the command line takes).
    fn args(&mut self, key: &str) -> Result<Vec<(String, String)>> {
        let items: Vec<String> = match self.take(key) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => s.split_whitespace().map(|s| s.trim_matches('"').to_string()).collect(),
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    v => Err(Error::Config(format!("`{key}` item {v}: expected a \"name=value\" string"))),
                })
                .collect::<Result<_>>()?,
            Some(v) => return Err(Error::Config(format!("`{key} = {v}`: expected a list of \"name=value\" strings"))),
        };
        items
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|item| match item.split_once('=') {
                Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
                None => Err(Error::Config(format!("`{key}` item \"{item}\": expected name=value"))),
            })
            .collect()
    }
}

fn number(v: &Value) -> Result<f64> {
    match v {
        Value::Integer(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        Value::String(s) => s.trim().parse::<f64>().map_err(|_| Error::Config(format!("\"{s}\" is not a number"))),
        _ => Err(Error::Config("not a number".to_string())),
    }
}

/// `false`, `0`, `""` and `[]`: what kohya_ss drops before saving, so they mean "off".
fn inactive(v: &Value) -> bool {
    match v {
        Value::Boolean(b) => !b,
        Value::Integer(i) => *i == 0,
        Value::Float(f) => *f == 0.0,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A value as text without quotes (to compare with the harmless values).
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A path of the kohya file, taken from the current folder as sd-scripts does.
fn path_value(cwd: &Path, p: &str) -> Value {
    let p = PathBuf::from(p);
    let p = if p.is_relative() { cwd.join(p) } else { p };
    Value::String(p.to_string_lossy().into_owned())
}

/// kohya's `resolution`: `"1024"`, `"1024,1024"` or a number; graft takes a square.
fn resolution(v: &Value) -> Result<i64> {
    let text = plain(v);
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let nums: Vec<i64> = parts
        .iter()
        .map(|p| p.parse::<f64>().ok().filter(|x| x.fract() == 0.0 && *x > 0.0).map(|x| x as i64))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::Config(format!("`resolution = {v}`: expected \"SIZE\" or \"WIDTH,HEIGHT\"")))?;
    match nums.as_slice() {
        [s] => Ok(*s),
        [w, h] if w == h => Ok(*w),
        [w, h] => Err(Error::Config(format!(
            "`resolution = {v}`: graft trains at a square base resolution; use \"{m},{m}\" (buckets give other shapes of the same area)",
            m = (w * h).isqrt()
        ))),
        _ => Err(Error::Config(format!("`resolution = {v}`: expected \"SIZE\" or \"WIDTH,HEIGHT\""))),
    }
}

/// A kohya `optimizer_args` value (Python literal syntax) as TOML: numbers, True / False, strings,
/// and tuples like `0.9,0.99` or `(0.9, 0.99)`.
fn python_literal(text: &str) -> Result<Value> {
    let t = text.trim();
    let inner = t.strip_prefix('(').and_then(|s| s.strip_suffix(')')).or_else(|| t.strip_prefix('[').and_then(|s| s.strip_suffix(']')));
    if inner.is_some() || t.contains(',') {
        let items = inner.unwrap_or(t).split(',').map(str::trim).filter(|s| !s.is_empty());
        return Ok(Value::Array(items.map(python_literal).collect::<Result<_>>()?));
    }
    Ok(match t {
        "True" | "true" => Value::Boolean(true),
        "False" | "false" => Value::Boolean(false),
        "None" => return Err(Error::Config("`None`: leave the argument out to get its default".to_string())),
        _ => match (t.parse::<i64>(), t.parse::<f64>()) {
            (Ok(i), _) => Value::Integer(i),
            (_, Ok(f)) => Value::Float(f),
            _ => Value::String(t.trim_matches(|c| c == '"' || c == '\'').to_string()),
        },
    })
}

fn map(keys: &mut Keys, cwd: &Path, graft: &mut toml::Table, notes: &mut Vec<String>) -> Result<()> {
    let mut dataset = toml::Table::new();
    let mut lora = toml::Table::new();

    // Model and data.
    let model = keys
        .string("pretrained_model_name_or_path")?
        .ok_or_else(|| Error::Config("`pretrained_model_name_or_path` is missing: name the SDXL model file or diffusers folder".to_string()))?;
    let model_path = PathBuf::from(&model);
    if !cwd.join(&model_path).exists() {
        return Err(Error::Config(format!("`pretrained_model_name_or_path = \"{model}\"`: no such file or folder (graft loads local files; download the model first and name its path)")));
    }
    graft.insert("model".into(), path_value(cwd, &model));
    match (keys.string("train_data_dir")?, keys.string("dataset_config")?) {
        (_, Some(c)) => {
            dataset.insert("config".into(), path_value(cwd, &c));
        }
        (Some(d), None) => {
            dataset.insert("dir".into(), path_value(cwd, &d));
        }
        (None, None) => return Err(Error::Config("neither `train_data_dir` nor `dataset_config` is set: name the training images".to_string())),
    }
    match keys.take("resolution") {
        Some(v) => {
            dataset.insert("resolution".into(), Value::Integer(resolution(&v)?));
        }
        None if !dataset.contains_key("config") => {
            return Err(Error::Config("`resolution` is missing: kohya needs it with train_data_dir (e.g. \"1024,1024\")".to_string()))
        }
        None => {}
    }
    let out =
        keys.string("output_dir")?.ok_or_else(|| Error::Config("`output_dir` is missing: name the folder for the LoRA files".to_string()))?;
    graft.insert("output_dir".into(), path_value(cwd, &out));
    graft.insert("output_name".into(), Value::String(keys.string("output_name")?.unwrap_or_else(|| "last".into())));
    if let Some(f) = keys.string("save_model_as")? {
        if f != "safetensors" {
            return Err(Error::Config(format!("`save_model_as = \"{f}\"`: graft writes safetensors only; set it to \"safetensors\"")));
        }
    }

    // Network.
    let module = keys.string("network_module")?.unwrap_or_else(|| "networks.lora".into());
    if module != "networks.lora" {
        return Err(Error::Config(format!("`network_module = \"{module}\"`: graft imports networks.lora configs (for LyCORIS algorithms write a graft config with the matching plugin)")));
    }
    let rank = keys.u64("network_dim")?.unwrap_or(4);
    lora.insert("rank".into(), Value::Integer(rank as i64));
    lora.insert("alpha".into(), Value::Float(keys.f64("network_alpha")?.unwrap_or(1.0)));
    if let Some(p) = keys.f64("network_dropout")? {
        lora.insert("dropout".into(), Value::Float(p));
    }
    for (k, v) in keys.args("network_args")? {
        let num = || v.parse::<f64>().map_err(|e| Error::Config(format!("`network_args` item \"{k}={v}\": expected a number: {e}")));
        match k.as_str() {
            "conv_dim" => lora.insert("conv_rank".into(), Value::Integer(num()? as i64)),
            "conv_alpha" => lora.insert("conv_alpha".into(), Value::Float(num()?)),
            "rank_dropout" => lora.insert("rank_dropout".into(), Value::Float(num()?)),
            "module_dropout" => lora.insert("module_dropout".into(), Value::Float(num()?)),
            _ => {
                return Err(Error::Config(format!(
                    "`network_args` item \"{k}={v}\" is not supported: graft's lora takes conv_dim, conv_alpha, rank_dropout and module_dropout"
                )))
            }
        };
    }
    let unet_only = keys.bool("network_train_unet_only")?;
    let te_only = keys.bool("network_train_text_encoder_only")?;
    if unet_only && te_only {
        return Err(Error::Config("`network_train_unet_only` and `network_train_text_encoder_only` are both true: keep one".to_string()));
    }
    let mut targets: Vec<&str> = if te_only { vec![] } else { UNET_TARGETS.to_vec() };
    if !unet_only {
        targets.extend(TEXT_ENCODER_TARGETS);
    }
    lora.insert("targets".into(), Value::Array(targets.into_iter().map(|t| Value::String(t.into())).collect()));

    // Learning rates: unet_lr and text_encoder_lr, each falling back on learning_rate.
    let lr = keys.f64("learning_rate")?.unwrap_or(2e-6);
    lora.insert("unet_lr".into(), Value::Float(keys.f64("unet_lr")?.unwrap_or(lr)));
    let te_lr = match keys.take("text_encoder_lr") {
        None => lr,
        Some(Value::Array(a)) => {
            let v: Vec<f64> = a.iter().map(number).collect::<Result<_>>().at(|| "`text_encoder_lr`: expected numbers".to_string())?;
            match v.as_slice() {
                [] => lr,
                [x] => *x,
                [a, b] if a == b => *a,
                _ => {
                    return Err(Error::Config(format!(
                        "`text_encoder_lr = {v:?}`: graft gives both text encoders one learning rate; give one value"
                    )))
                }
            }
        }
        Some(v) => number(&v).at(|| format!("`text_encoder_lr = {v}`: expected a number"))?,
    };
    lora.insert("text_encoder_lr".into(), Value::Float(te_lr));

    // Schedule.
    let schedule = keys.string("lr_scheduler")?.unwrap_or_else(|| "constant".into());
    const SCHEDULES: [&str; 5] = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"];
    if !SCHEDULES.contains(&schedule.as_str()) {
        return Err(Error::Config(format!("`lr_scheduler = \"{schedule}\"`: graft has {}", SCHEDULES.join(", "))));
    }
    if schedule == "cosine_with_restarts" {
        let n = keys.f64("lr_scheduler_num_cycles")?.unwrap_or(1.0);
        graft.insert("lr_scheduler_num_cycles".into(), Value::Float(n));
    }
    graft.insert("lr_schedule".into(), Value::String(schedule));
    match keys.f64("lr_warmup_steps")? {
        Some(w) if w > 0.0 && w < 1.0 => keys.1.warmup_ratio = Some(w),
        Some(w) if w >= 1.0 && w.fract() == 0.0 => {
            graft.insert("warmup_steps".into(), Value::Integer(w as i64));
        }
        Some(0.0) => {}
        Some(w) => return Err(Error::Config(format!("`lr_warmup_steps = {w}`: use a step count, or a fraction of the run below 1"))),
        None => {}
    }

    // Optimizer.
    let mut optimizer = keys.string("optimizer_type")?.unwrap_or_default();
    if keys.bool("use_8bit_adam")? {
        optimizer = "AdamW8bit".into();
    }
    if keys.bool("use_lion_optimizer")? {
        optimizer = "Lion".into();
    }
    let optimizer = if optimizer.is_empty() {
        "AdamW"
    } else {
        OPTIMIZERS
            .iter()
            .find(|o| o.eq_ignore_ascii_case(&optimizer))
            .ok_or_else(|| Error::Config(format!("`optimizer_type = \"{optimizer}\"`: graft has {}", OPTIMIZERS.join(", "))))?
    };
    let mut optimizer_args = toml::Table::new();
    for (k, v) in keys.args("optimizer_args")? {
        let value = python_literal(&v).at(|| format!("`optimizer_args` item \"{k}={v}\""))?;
        optimizer_args.insert(k, value);
    }
    if optimizer != "AdamW" || !optimizer_args.is_empty() {
        graft.insert("optimizer".into(), Value::String(optimizer.into()));
        graft.insert("optimizer_args".into(), Value::Table(optimizer_args));
    }

    // Length, batches and memory.
    let steps = keys.u64("max_train_steps")?;
    keys.1.max_train_epochs = keys.u64("max_train_epochs")?;
    if steps.is_none() && keys.1.max_train_epochs.is_none() {
        keys.1.max_train_epochs = keys.u64("epoch")?;
    }
    // kohya: max_train_epochs wins over max_train_steps; the default is 1600 steps.
    graft.insert("steps".into(), Value::Integer(steps.unwrap_or(1600) as i64));
    if let Some(b) = keys.u64("train_batch_size")? {
        graft.insert("batch_size".into(), Value::Integer(b as i64));
    }
    if let Some(g) = keys.u64("gradient_accumulation_steps")? {
        graft.insert("gradient_accumulation".into(), Value::Integer(g as i64));
    }
    graft.insert("gradient_checkpointing".into(), Value::Boolean(keys.bool("gradient_checkpointing")?));
    let dtype = match keys.string("mixed_precision")?.as_deref() {
        None | Some("no") => "fp32",
        Some("fp16") => "fp16",
        Some("bf16") => "bf16",
        Some(p) => return Err(Error::Config(format!("`mixed_precision = \"{p}\"`: use no, fp16 or bf16"))),
    };
    graft.insert("dtype".into(), Value::String(dtype.into()));

    // Saving and samples.
    if let Some(n) = keys.u64("save_every_n_steps")? {
        graft.insert("save_every".into(), Value::Integer(n as i64));
    }
    keys.1.save_every_n_epochs = keys.u64("save_every_n_epochs")?;
    if let Some(n) = keys.u64("sample_every_n_steps")? {
        graft.insert("sample_every".into(), Value::Integer(n as i64));
    }
    keys.1.sample_every_n_epochs = keys.u64("sample_every_n_epochs")?;
    if let Some(p) = keys.string("sample_prompts")? {
        if !p.ends_with(".txt") {
            return Err(Error::Config(format!("`sample_prompts = \"{p}\"`: graft reads kohya's text prompt files (one prompt a line, `--w 1024 --h 1024 --d 1`); convert the .toml / .json prompts to a .txt file")));
        }
        graft.insert("sample_prompts".into(), path_value(cwd, &p));
    }
    graft.insert("sample_sampler".into(), Value::String(keys.string("sample_sampler")?.unwrap_or_else(|| "ddim".into())));

    // Loss and noise.
    if let Some(x) = keys.f64("noise_offset")? {
        graft.insert("noise_offset".into(), Value::Float(x));
    }
    if let Some(x) = keys.f64("min_snr_gamma")? {
        graft.insert("min_snr_gamma".into(), Value::Float(x));
    }
    graft.insert("max_grad_norm".into(), Value::Float(keys.f64("max_grad_norm")?.unwrap_or(1.0)));
    match keys.u64("seed")? {
        Some(s) => {
            graft.insert("seed".into(), Value::Integer(s as i64));
        }
        None => notes.push("`seed` is not set: kohya draws one at random, graft uses 0".into()),
    }
    // Validation (kohya's names; `validation_split = 0` is kohya's "off").
    let (split, seed, every) = (keys.f64("validation_split")?, keys.u64("validation_seed")?, keys.u64("validate_every_n_steps")?);
    if let Some(x) = split.filter(|x| *x != 0.0) {
        graft.insert("validation_split".into(), Value::Float(x));
        if let Some(s) = seed {
            graft.insert("validation_seed".into(), Value::Integer(s as i64));
        }
        if let Some(n) = every {
            graft.insert("validate_every".into(), Value::Integer(n as i64));
        }
    }
    let v = keys.bool("v_parameterization")?;
    graft.insert("prediction_type".into(), Value::String(if v { "v_prediction" } else { "epsilon" }.into()));

    // Captions and caches.
    let cache = match (keys.bool("cache_latents")?, keys.bool("cache_latents_to_disk")?) {
        (_, true) => "disk",
        (true, false) => "memory",
        (false, false) => "none",
    };
    graft.insert("cache_latents".into(), Value::String(cache.into()));
    graft.insert("cache_text_encoder_outputs".into(), Value::Boolean(keys.bool("cache_text_encoder_outputs")?));
    dataset.insert("caption_extension".into(), Value::String(keys.string("caption_extension")?.unwrap_or_else(|| ".caption".into())));
    for key in ["shuffle_caption", "flip_aug", "enable_bucket", "bucket_no_upscale"] {
        if keys.bool(key)? {
            dataset.insert(key.into(), Value::Boolean(true));
        }
    }
    for key in ["keep_tokens", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"] {
        if let Some(n) = keys.u64(key)? {
            dataset.insert(key.into(), Value::Integer(n as i64));
        }
    }
    if let Some(p) = keys.f64("caption_dropout_rate")? {
        dataset.insert("caption_dropout_rate".into(), Value::Float(p));
    }

    let mut strategy = toml::Table::new();
    strategy.insert("plugin".into(), Value::String("lora".into()));
    strategy.insert("config".into(), Value::Table(lora));
    graft.insert("dataset".into(), Value::Table(dataset));
    graft.insert("strategy".into(), Value::Table(strategy));
    Ok(())
}

/// Turns the epoch counts into steps with the dataset's epoch length; returns the new TOML when
/// anything changed.
fn epochs_to_steps(config: &mut TrainConfig, graft: &mut toml::Table, e: &Epochs) -> Result<Option<String>> {
    if e.max_train_epochs.is_none() && e.save_every_n_epochs.is_none() && e.sample_every_n_epochs.is_none() && e.warmup_ratio.is_none() {
        return Ok(None);
    }
    let mut set = |key: &str, n: u64| {
        graft.insert(key.into(), Value::Integer(n as i64));
    };
    if e.max_train_epochs.is_some() || e.save_every_n_epochs.is_some() || e.sample_every_n_epochs.is_some() {
        let dataset = crate::trainer::open_dataset(config).at(|| "counting the batches of one epoch".to_string())?;
        let batches = dataset.epoch(config.options.seed, 0).len() as u64;
        let per_epoch = batches.div_ceil(config.options.gradient_accumulation as u64).max(1);
        tracing::info!("kohya epochs: {per_epoch} steps per epoch ({batches} batches)");
        if let Some(n) = e.max_train_epochs {
            config.options.steps = n * per_epoch;
            set("steps", config.options.steps);
        }
        if let Some(n) = e.save_every_n_epochs {
            config.options.save_every = n * per_epoch;
            set("save_every", config.options.save_every);
        }
        if let Some(n) = e.sample_every_n_epochs {
            config.options.sample_every = n * per_epoch;
            set("sample_every", config.options.sample_every);
        }
    }
    if let Some(r) = e.warmup_ratio {
        config.options.warmup_steps = (r * config.options.steps as f64).floor() as u64;
        set("warmup_steps", config.options.warmup_steps);
    }
    Ok(Some(toml::to_string(graft).map_err(|e| Error::Internal(format!("writing the graft config: {e}")))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_of_optimizer_args() {
        assert_eq!(python_literal("0.01").unwrap(), Value::Float(0.01));
        assert_eq!(python_literal("3").unwrap(), Value::Integer(3));
        assert_eq!(python_literal("True").unwrap(), Value::Boolean(true));
        assert_eq!(python_literal("0.9,0.99").unwrap(), Value::Array(vec![Value::Float(0.9), Value::Float(0.99)]));
        assert_eq!(python_literal("(0.9, 0.99)").unwrap(), Value::Array(vec![Value::Float(0.9), Value::Float(0.99)]));
        assert!(python_literal("None").is_err());
    }

    #[test]
    fn resolutions() {
        assert_eq!(resolution(&Value::String("1024,1024".into())).unwrap(), 1024);
        assert_eq!(resolution(&Value::Integer(768)).unwrap(), 768);
        let e = resolution(&Value::String("1024,768".into())).unwrap_err().to_string();
        assert!(e.contains("\"886,886\""), "{e}");
    }
}
