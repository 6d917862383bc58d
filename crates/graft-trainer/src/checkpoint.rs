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

use candle_core::{Device, Tensor};
use graft_sdxl::rng::RngState;
use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};
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
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("cannot write {}", tmp.display()), &tmp))?;
    sync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot move {} into place", tmp.display()), &tmp))?;
    Ok(())
}

/// Saves a checkpoint of `trainer` and points `latest` at it. Returns its folder.
/// Flushes a file written to the disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(format!("cannot sync {}", path.display()), path))
}

pub fn save(trainer: &Trainer) -> Result<PathBuf> {
    let root = checkpoints_dir(&trainer.config.output_dir);
    std::fs::create_dir_all(&root).map_err(io(format!("cannot create {}", root.display()), &root))?;
    let name = format!("step-{:06}", trainer.step);
    let final_dir = root.join(&name);
    let tmp_dir = root.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir).map_err(io(format!("cannot create {}", tmp_dir.display()), &tmp_dir))?;

    let params: HashMap<String, Tensor> = trainer.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
    let params_path = tmp_dir.join("params.safetensors");
    candle_core::safetensors::save(&params, &params_path).map_err(io(format!("cannot write {}", params_path.display()), &params_path))?;
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
    let state_path = tmp_dir.join("state.json");
    let text = serde_json::to_string_pretty(&state).map_err(|e| Error::Internal(format!("checkpoint state as JSON: {e}")))?;
    std::fs::write(&state_path, text).map_err(io(format!("cannot write {}", state_path.display()), &state_path))?;
    for f in ["params.safetensors", "optimizer.safetensors", "state.json"] {
        sync(&tmp_dir.join(f))?;
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp_dir, &final_dir).map_err(io(format!("cannot move checkpoint into {}", final_dir.display()), &final_dir))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(final_dir)
}

/// What must match for a resume: the config minus what may change between sessions.
fn run_identity(trainer: &Trainer) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(&trainer.config).map_err(|e| Error::Internal(format!("training config as JSON: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        for k in
            ["steps", "save_every", "sample_every", "sample_prompts", "output_dir", "max_bad_steps", "validate_every", "validation_timesteps"]
        {
            o.remove(k);
        }
    }
    Ok(v)
}

/// The latest checkpoint folder of a run, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(output_dir);
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io(format!("cannot read {}", pointer.display()), &pointer))?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").is_file() {
        return Err(Error::State(format!("{} points to {}, which is not a complete checkpoint", pointer.display(), dir.display())));
    }
    Ok(Some(dir))
}

/// Restores `trainer` from a checkpoint folder.
pub fn load(trainer: &mut Trainer, dir: &Path) -> Result<()> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(format!("cannot read {}", state_path.display()), &state_path))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(io(format!("{}: not a graft checkpoint", state_path.display()), &state_path))?;
    if state.format != FORMAT {
        return Err(Error::State(format!("{}: checkpoint format `{}`, this graft reads `{FORMAT}`", state_path.display(), state.format)));
    }
    if state.config != run_identity(trainer)? {
        return Err(Error::State(format!(
            "{}: the checkpoint was made with another training config (model, dataset, strategy or seed differ); \
             resume with the same config, or use another output_dir",
            dir.display()
        )));
    }
    let params_path = dir.join("params.safetensors");
    let params = candle_core::safetensors::load(&params_path, &Device::Cpu)
        .map_err(io(format!("cannot read {}", params_path.display()), &params_path))?;
    let mut missing = Vec::new();
    for (key, var) in trainer.parameters() {
        match params.get(&key) {
            Some(t) => var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?,
            None => missing.push(key),
        }
    }
    if !missing.is_empty() {
        return Err(Error::State(format!(
            "{}: {} parameters of the current plan are not in the checkpoint (e.g. {}); did the strategy's config change?",
            params_path.display(),
            missing.len(),
            missing[0]
        )));
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
