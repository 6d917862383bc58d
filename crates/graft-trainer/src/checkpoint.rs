//! Checkpoints: everything a run needs to continue bit-exactly.
//!
//! `output_dir/checkpoints/step-NNNNNN/` holds `params.safetensors` (every adapter parameter and
//! unfrozen base weight), `optimizer.safetensors` (the optimizer's moments, step counts and, for Prodigy, its `d`) and
//! `state.json` (step, data position, RNG states, learning-rate scales, the plugin's private
//! state). A checkpoint is written into a temporary folder and renamed into place, then
//! `checkpoints/latest` is replaced atomically: a crash never leaves a half-written checkpoint
//! where the last good one was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use graft_sdxl::rng::RngState;
use serde::{Deserialize, Serialize};

use crate::trainer::{DataPosition, StepStart, Trainer};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: String,
    pub step: u64,
    pub position: DataPosition,
    pub rng: RngState,
    pub dispatcher_rng: RngState,
    pub lr_scales: Vec<(String, f64)>,
    pub bad_in_row: u64,
    pub skipped_total: u64,
    pub strategy: String,
    pub plugin: String,
    pub plugin_version: String,
    pub plugin_state: String,
    /// The training config, to refuse resuming another run by mistake.
    pub config: serde_json::Value,
}

const FORMAT: &str = "graft-checkpoint/1";

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

/// Writes a file through a temporary name and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}

/// Saves a checkpoint of `trainer` and points `latest` at it. Returns its folder.
pub fn save(trainer: &Trainer) -> anyhow::Result<PathBuf> {
    let root = checkpoints_dir(&trainer.config.output_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step-{:06}", trainer.step);
    let final_dir = root.join(&name);
    let tmp_dir = root.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir)?;

    let params: HashMap<String, Tensor> = trainer.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
    candle_core::safetensors::save(&params, tmp_dir.join("params.safetensors"))?;
    trainer.optimizer.save(&tmp_dir.join("optimizer.safetensors"))?;
    let active = &trainer.set.strategies()[trainer.strategy];
    let state = CheckpointState {
        format: FORMAT.into(),
        step: trainer.step,
        position: trainer.position,
        rng: trainer.rng.state(),
        dispatcher_rng: trainer.set.rng_state(),
        lr_scales: trainer.lr_scales.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        bad_in_row: trainer.bad_in_row,
        skipped_total: trainer.skipped_total,
        strategy: active.name().to_string(),
        plugin: active.instance.manifest().id.clone(),
        plugin_version: active.instance.manifest().version.clone(),
        plugin_state: active.instance.save_state()?,
        config: run_identity(trainer)?,
    };
    std::fs::write(tmp_dir.join("state.json"), serde_json::to_string_pretty(&state)?)?;
    for f in ["params.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::File::open(tmp_dir.join(f))?.sync_all()?;
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp_dir, &final_dir).with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(final_dir)
}

/// What must match for a resume: the config minus what may change between sessions.
fn run_identity(trainer: &Trainer) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(&trainer.config)?;
    if let Some(o) = v.as_object_mut() {
        for k in ["steps", "save_every", "sample_every", "sample_prompts", "output_dir", "max_bad_steps"] {
            o.remove(k);
        }
    }
    Ok(v)
}

/// The latest checkpoint folder of a run, if any.
pub fn latest(output_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let root = checkpoints_dir(output_dir);
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).with_context(|| format!("cannot read {}", pointer.display()))?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").is_file() {
        anyhow::bail!("{} points to {}, which is not a complete checkpoint", pointer.display(), dir.display());
    }
    Ok(Some(dir))
}

/// Restores `trainer` from a checkpoint folder.
pub fn load(trainer: &mut Trainer, dir: &Path) -> anyhow::Result<()> {
    let state_path = dir.join("state.json");
    let state: CheckpointState =
        serde_json::from_str(&std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?)
            .with_context(|| format!("{}: not a graft checkpoint", state_path.display()))?;
    if state.format != FORMAT {
        anyhow::bail!("{}: checkpoint format `{}`, this graft reads `{FORMAT}`", state_path.display(), state.format);
    }
    if state.config != run_identity(trainer)? {
        anyhow::bail!(
            "{}: the checkpoint was made with another training config (model, dataset, strategy or seed differ); \
             resume with the same config, or use another output_dir",
            dir.display()
        );
    }
    let params_path = dir.join("params.safetensors");
    let params = candle_core::safetensors::load(&params_path, &Device::Cpu).with_context(|| format!("cannot read {}", params_path.display()))?;
    let mut missing = Vec::new();
    for (key, var) in trainer.parameters() {
        match params.get(&key) {
            Some(t) => var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?,
            None => missing.push(key),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "{}: {} parameters of the current plan are not in the checkpoint (e.g. {}); did the strategy's config change?",
            params_path.display(),
            missing.len(),
            missing[0]
        );
    }
    trainer.optimizer.load(&dir.join("optimizer.safetensors"))?;
    let instance = &mut trainer.set.strategies_mut()[trainer.strategy].instance;
    instance.load_state(&state.plugin_state)?;
    trainer.rewind(&StepStart {
        step: state.step,
        position: state.position,
        rng: state.rng,
        dispatcher_rng: state.dispatcher_rng,
        bad_in_row: state.bad_in_row,
        skipped_total: state.skipped_total,
    });
    trainer.forget_step_history();
    for (group, scale) in state.lr_scales {
        trainer.optimizer.set_lr_scale(&group, scale)?;
        trainer.lr_scales.insert(group, scale);
    }
    Ok(())
}
