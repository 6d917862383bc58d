//! The training optimizers, over candle `Var`s with parameter groups (candle's own have no
//! groups, no clipping and no state to save): AdamW (the default), AdamW8bit, Lion, Prodigy and
//! Adafactor, one file each with its math, checked against its reference library by a fixture.
//! `optimizer` and `[optimizer_args]` in the training config choose one ([`OptimizerSpec`]).
//!
//! What they share lives here. Each group has its learning rate, an `lr_scale` (staged
//! strategies), a weight decay and optionally a per-parameter clip norm; the rate a step uses is
//! the group's rate times its `lr_scale` times the schedule's factor. Before the update, in this
//! order:
//! 1. a non-finite gradient anywhere skips the whole step (nothing changes, the report names the
//!    parameters) so the caller can count it;
//! 2. each parameter of a group with `clip_norm` has its gradient clipped to that L2 norm on its own;
//! 3. with `max_grad_norm`, all gradients together are clipped to that global L2 norm.
//!
//! Both clips use torch's `clip_grad_norm_` rule: `g *= min(1, max / (norm + 1e-6))`.
//!
//! The state (each parameter's tensors and step count, plus optimizer-wide values such as
//! Prodigy's `d`) is saved to safetensors keyed by the parameter name, tagged with the optimizer,
//! so a resumed run continues bit-exactly.

mod adafactor;
mod adamw;
mod adamw8bit;
mod lion;
mod prodigy;
#[cfg(test)]
mod reference_tests;
mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

pub use adafactor::AdafactorArgs;
pub use adamw8bit::{dequantize, dynamic_map, quantize, AdamW8bitArgs};
pub use prodigy::ProdigyArgs;
pub use spec::{EngineArgs, GroupOverrides, OptimizerKind, OptimizerSpec};

/// The hyper-parameters of one group. Defaults are torch's AdamW defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    pub name: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Clip each parameter's gradient to this L2 norm, separately.
    pub clip_norm: Option<f64>,
    /// Multiplies `lr` (staged strategies scale a group without touching its base rate).
    pub lr_scale: f64,
}

impl GroupConfig {
    pub fn new(name: impl Into<String>, lr: f64) -> Self {
        Self { name: name.into(), lr, weight_decay: 0.01, betas: (0.9, 0.999), eps: 1e-8, clip_norm: None, lr_scale: 1.0 }
    }

    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }

    pub fn betas(mut self, b1: f64, b2: f64) -> Self {
        self.betas = (b1, b2);
        self
    }

    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    pub fn clip_norm(mut self, norm: Option<f64>) -> Self {
        self.clip_norm = norm;
        self
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| Error::Config(format!("optimizer group '{}': {what}", self.name));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad(&format!("learning rate {} must be a finite number >= 0", self.lr)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(&format!("weight decay {} must be >= 0", self.weight_decay)));
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(bad(&format!("betas ({b1}, {b2}) must be in [0, 1)")));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(bad(&format!("eps {} must be >= 0", self.eps)));
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(bad(&format!("clip norm {c} must be > 0")));
            }
        }
        Ok(())
    }
}

/// A group: its hyper-parameters and its named parameters.
#[derive(Debug)]
pub struct ParamGroup {
    pub config: GroupConfig,
    pub params: Vec<(String, Var)>,
}

/// Gradients by parameter name (what the optimizer consumes; easy to sum for accumulation).
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    map: BTreeMap<String, Tensor>,
}

impl Gradients {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) {
        self.map.insert(name.into(), grad);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds `other` into `self`, parameter by parameter (a name missing on one side counts as zero).
    pub fn add(&mut self, other: &Gradients) -> Result<()> {
        for (name, g) in &other.map {
            let sum = match self.map.get(name) {
                Some(mine) => mine.add(g)?.detach(),
                None => g.detach(),
            };
            self.map.insert(name.clone(), sum);
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.map.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }
}

/// Gradient accumulation: add the gradients of each micro-batch, then take their mean (what a
/// single batch of all the micro-batches would have given when the loss is a mean).
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Gradients,
    micro_steps: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, grads: &Gradients) -> Result<()> {
        self.sum.add(grads)?;
        self.micro_steps += 1;
        Ok(())
    }

    /// Micro-batches added since the last take.
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// The mean of the added gradients, and a reset. `None` when nothing was added.
    pub fn take_mean(&mut self) -> Result<Option<Gradients>> {
        if self.micro_steps == 0 {
            return Ok(None);
        }
        let mut sum = std::mem::take(&mut self.sum);
        sum.scale(1.0 / self.micro_steps as f64)?;
        self.micro_steps = 0;
        Ok(Some(sum))
    }

    /// The plain sum of the added gradients, and a reset.
    pub fn take_sum(&mut self) -> Option<Gradients> {
        if self.micro_steps == 0 {
            return None;
        }
        self.micro_steps = 0;
        Some(std::mem::take(&mut self.sum))
    }
}

/// What a look at the gradients found.
#[derive(Debug, Clone, PartialEq)]
pub struct GradCheck {
    /// Parameters whose gradient holds a NaN or an infinity.
    pub nonfinite: Vec<String>,
    /// L2 norm over all gradients (NaN or inf when `nonfinite` is not empty).
    pub global_norm: f64,
}

/// What a call to `step` did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// True when a non-finite gradient was found: no parameter or moment changed.
    pub skipped: bool,
    pub nonfinite: Vec<String>,
    /// Global L2 norm of the gradients as given, before any clipping.
    pub grad_norm: f64,
    /// Global L2 norm after per-parameter and global clipping (what the update used).
    pub clipped_norm: f64,
    /// Parameters updated (those with a gradient).
    pub updated: usize,
}

/// What loading a state file found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Parameters of the optimizer with no state in the file: they start fresh.
    pub fresh: Vec<String>,
    /// Parameters in the file that the optimizer does not have: ignored.
    pub unused: Vec<String>,
}

/// One parameter's optimizer state: named tensors (moments, quantized codes, ...) and its step
/// count. Which tensors depends on the optimizer (see each one's `slots`).
#[derive(Debug, Clone)]
pub(crate) struct ParamState {
    pub step: u64,
    pub slots: BTreeMap<&'static str, Tensor>,
}

impl ParamState {
    pub(crate) fn new(slots: Vec<(&'static str, Tensor)>) -> Self {
        Self { step: 0, slots: slots.into_iter().collect() }
    }

    pub(crate) fn get(&self, slot: &str) -> Result<&Tensor> {
        self.slots.get(slot).ok_or_else(|| Error::Internal(format!("optimizer state has no `{slot}` (internal error)")))
    }

    pub(crate) fn set(&mut self, slot: &'static str, t: Tensor) {
        self.slots.insert(slot, t);
    }
}

/// What one saved state tensor of a parameter must look like.
#[derive(Debug, Clone)]
pub(crate) struct SlotSpec {
    pub name: &'static str,
    /// Accepted shapes (Prodigy keeps a 0-d `p0` for an all-zero parameter).
    pub shapes: Vec<Vec<usize>>,
    pub dtype: DType,
    /// Kept in host memory whatever the parameter's device (the 8-bit codes).
    pub on_cpu: bool,
}

impl SlotSpec {
    pub(crate) fn like(name: &'static str, var: &Var) -> Self {
        Self { name, shapes: vec![var.dims().to_vec()], dtype: var.dtype(), on_cpu: false }
    }
}

/// One parameter's update in a step: its (clipped) gradient, learning rate and state.
pub(crate) struct Item<'a> {
    pub var: &'a Var,
    pub grad: Tensor,
    /// The group's learning rate times its `lr_scale` times the schedule's factor.
    pub lr: f64,
    pub cfg: &'a GroupConfig,
    pub state: ParamState,
}

/// The update rule and whatever it keeps besides per-parameter state.
// One per optimizer, made once and never moved in a loop: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Engine {
    AdamW,
    AdamW8bit(adamw8bit::AdamW8bit),
    Lion,
    Prodigy(prodigy::Prodigy),
    Adafactor(adafactor::Adafactor),
}

impl Engine {
    fn new(args: &EngineArgs) -> Self {
        match args {
            EngineArgs::AdamW => Engine::AdamW,
            EngineArgs::AdamW8bit(a) => Engine::AdamW8bit(adamw8bit::AdamW8bit::new(a.clone())),
            EngineArgs::Lion => Engine::Lion,
            EngineArgs::Prodigy(a) => Engine::Prodigy(prodigy::Prodigy::new(a.clone())),
            EngineArgs::Adafactor(a) => Engine::Adafactor(adafactor::Adafactor::new(a.clone())),
        }
    }

    fn kind(&self) -> OptimizerKind {
        match self {
            Engine::AdamW => OptimizerKind::AdamW,
            Engine::AdamW8bit(_) => OptimizerKind::AdamW8bit,
            Engine::Lion => OptimizerKind::Lion,
            Engine::Prodigy(_) => OptimizerKind::Prodigy,
            Engine::Adafactor(_) => OptimizerKind::Adafactor,
        }
    }

    fn init(&self, var: &Var) -> Result<ParamState> {
        match self {
            Engine::AdamW => adamw::init(var),
            Engine::AdamW8bit(e) => e.init(var),
            Engine::Lion => lion::init(var),
            Engine::Prodigy(e) => e.init(var),
            Engine::Adafactor(e) => e.init(var),
        }
    }

    fn slots(&self, var: &Var) -> Vec<SlotSpec> {
        match self {
            Engine::AdamW => adamw::slots(var),
            Engine::AdamW8bit(e) => e.slots(var),
            Engine::Lion => lion::slots(var),
            Engine::Prodigy(e) => e.slots(var),
            Engine::Adafactor(e) => e.slots(var),
        }
    }

    fn step(&mut self, items: &mut [Item<'_>]) -> Result<()> {
        match self {
            Engine::AdamW => items.iter_mut().try_for_each(adamw::update),
            Engine::AdamW8bit(e) => items.iter_mut().try_for_each(|it| e.update(it)),
            Engine::Lion => items.iter_mut().try_for_each(lion::update),
            Engine::Prodigy(e) => e.step(items),
            Engine::Adafactor(e) => items.iter_mut().try_for_each(|it| e.update(it)),
        }
    }

    /// Optimizer-wide values saved with the state (Prodigy's step-size estimate).
    fn globals(&self) -> Vec<(&'static str, f64)> {
        match self {
            Engine::Prodigy(e) => e.globals(),
            _ => Vec::new(),
        }
    }

    fn set_globals(&mut self, values: &HashMap<&str, f64>) -> Result<()> {
        match self {
            Engine::Prodigy(e) => e.set_globals(values),
            _ => Ok(()),
        }
    }

    fn reset_globals(&mut self) {
        if let Engine::Prodigy(e) = self {
            *e = prodigy::Prodigy::new(e.args.clone());
        }
    }
}

/// Key prefix of optimizer-wide values in the state file (never a parameter name: those hold
/// no `@`).
const GLOBAL_PREFIX: &str = "@optimizer.";

/// An optimizer with parameter groups: AdamW, AdamW8bit, Lion, Prodigy or Adafactor (see
/// [`OptimizerSpec`]). The module documentation tells what all of them share.
#[derive(Debug)]
pub struct Optimizer {
    groups: Vec<ParamGroup>,
    state: HashMap<String, ParamState>,
    engine: Engine,
    /// Clip all gradients together to this global L2 norm.
    pub max_grad_norm: Option<f64>,
}

/// The plain AdamW optimizer keeps its historical name.
pub type AdamW = Optimizer;

impl Optimizer {
    /// AdamW (torch's defaults) over the given groups.
    pub fn new(groups: Vec<(GroupConfig, Vec<(String, Var)>)>) -> Result<Self> {
        Self::with_spec(&OptimizerSpec::default(), groups)
    }

    /// The optimizer `spec` names over the given groups; its `[optimizer_args]` replace each
    /// group's weight decay, betas and eps where they are given.
    pub fn with_spec(spec: &OptimizerSpec, groups: Vec<(GroupConfig, Vec<(String, Var)>)>) -> Result<Self> {
        let mut opt = Self { groups: Vec::new(), state: HashMap::new(), engine: Engine::new(&spec.engine), max_grad_norm: None };
        for (config, params) in groups {
            opt.add_group(spec.apply(config), params)?;
        }
        Ok(opt)
    }

    pub fn kind(&self) -> OptimizerKind {
        self.engine.kind()
    }

    /// Adds a group. Group and parameter names must be unique across the optimizer.
    pub fn add_group(&mut self, config: GroupConfig, params: Vec<(String, Var)>) -> Result<()> {
        config.check()?;
        if self.groups.iter().any(|g| g.config.name == config.name) {
            return Err(Error::Config(format!("optimizer group '{}' is defined twice", config.name)));
        }
        let mut seen: HashSet<&str> = self.param_names().collect();
        for (name, _) in &params {
            if !seen.insert(name) {
                return Err(Error::Config(format!(
                    "parameter '{name}' is in more than one optimizer group (group '{}'): give each parameter one group",
                    config.name
                )));
            }
        }
        self.groups.push(ParamGroup { config, params });
        Ok(())
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn group_mut(&mut self, name: &str) -> Result<&mut GroupConfig> {
        let known: Vec<String> = self.groups.iter().map(|g| g.config.name.clone()).collect();
        self.groups
            .iter_mut()
            .find(|g| g.config.name == name)
            .map(|g| &mut g.config)
            .ok_or_else(|| Error::Config(format!("no optimizer group '{name}' (groups: {})", known.join(", "))))
    }

    /// Sets a group's learning-rate scale (for staged strategies).
    pub fn set_lr_scale(&mut self, group: &str, scale: f64) -> Result<()> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(Error::Config(format!("learning-rate scale {scale} for group '{group}' must be >= 0")));
        }
        self.group_mut(group)?.lr_scale = scale;
        Ok(())
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().flat_map(|g| g.params.iter().map(|(n, _)| n.as_str()))
    }

    /// Optimizer steps taken by a parameter (0 before its first update).
    pub fn step_count(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |s| s.step)
    }

    /// Prodigy's current step-size estimate `d` (the learning rates multiply it); None for the others.
    pub fn prodigy_d(&self) -> Option<f64> {
        match &self.engine {
            Engine::Prodigy(p) => Some(p.d),
            _ => None,
        }
    }

    /// Bytes of optimizer state held now (all parameters with a state).
    pub fn state_bytes(&self) -> usize {
        let per_param: usize = self.state.values().flat_map(|s| s.slots.values()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
        per_param + self.engine.globals().len() * 8
    }

    /// The gradients of this optimizer's parameters found in a candle `GradStore`.
    pub fn gradients(&self, store: &GradStore) -> Gradients {
        let mut grads = Gradients::new();
        for group in &self.groups {
            for (name, var) in &group.params {
                if let Some(g) = store.get(var.as_tensor()) {
                    grads.insert(name.clone(), g.detach());
                }
            }
        }
        grads
    }

    /// Sum of squares of each given gradient of ours, in one device round trip.
    fn squared_norms(&self, grads: &Gradients) -> Result<Vec<(String, f64)>> {
        let mut names = Vec::new();
        let mut sums = Vec::new();
        for name in self.param_names() {
            if let Some(g) = grads.get(name) {
                names.push(name.to_string());
                sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
            }
        }
        if sums.is_empty() {
            return Ok(Vec::new());
        }
        let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
        Ok(names.into_iter().zip(sums.into_iter().map(f64::from)).collect())
    }

    /// Looks for NaN or inf in the gradients and measures their global norm.
    pub fn check(&self, grads: &Gradients) -> Result<GradCheck> {
        let sq = self.squared_norms(grads)?;
        let mut nonfinite = Vec::new();
        for (name, s) in &sq {
            // A finite but huge gradient can overflow the f32 sum of squares: recheck in f64.
            if !s.is_finite() {
                let g = grads.get(name).expect("listed above").to_dtype(DType::F64)?;
                let s64 = g.sqr()?.sum_all()?.to_scalar::<f64>()?;
                if !s64.is_finite() {
                    nonfinite.push(name.clone());
                }
            }
        }
        let global_norm = sq.iter().map(|(_, s)| s).sum::<f64>().sqrt();
        Ok(GradCheck { nonfinite, global_norm })
    }

    /// One update with the given gradients. `lr_factor` is the schedule's factor for this
    /// step. Parameters without a gradient are left alone (their step count does not move).
    pub fn step(&mut self, grads: &Gradients, lr_factor: f64) -> Result<StepReport> {
        let known: HashSet<&str> = self.param_names().collect();
        for name in grads.map.keys() {
            if !known.contains(name.as_str()) {
                return Err(Error::Internal(format!("gradient for '{name}', which is not a parameter of this optimizer")));
            }
        }
        let check = self.check(grads)?;
        if !check.nonfinite.is_empty() {
            return Ok(StepReport {
                skipped: true,
                nonfinite: check.nonfinite,
                grad_norm: check.global_norm,
                clipped_norm: check.global_norm,
                updated: 0,
            });
        }
        let sq: HashMap<String, f64> = self.squared_norms(grads)?.into_iter().collect();

        // Per-parameter clipping.
        let mut clipped: Vec<(usize, usize, Tensor)> = Vec::new();
        let mut clipped_sq = 0f64;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, (name, var)) in group.params.iter().enumerate() {
                let Some(g) = grads.get(name) else { continue };
                let mut g = g.to_dtype(var.dtype())?;
                let mut s = sq[name];
                if let Some(max) = group.config.clip_norm {
                    let coef = clip_coef(max, s.sqrt());
                    if coef < 1.0 {
                        g = g.affine(coef, 0.0)?;
                        s *= coef * coef;
                    }
                }
                clipped_sq += s;
                clipped.push((gi, pi, g));
            }
        }

        // Global clipping, over what per-parameter clipping left.
        let mut clipped_norm = clipped_sq.sqrt();
        if let Some(max) = self.max_grad_norm {
            let coef = clip_coef(max, clipped_norm);
            if coef < 1.0 {
                for (_, _, g) in clipped.iter_mut() {
                    *g = g.affine(coef, 0.0)?;
                }
                clipped_norm *= coef;
            }
        }

        let updated = clipped.len();
        let mut items = Vec::with_capacity(updated);
        let mut names = Vec::with_capacity(updated);
        for (gi, pi, grad) in clipped {
            let group = &self.groups[gi];
            let (name, var) = &group.params[pi];
            let cfg = &group.config;
            let state = match self.state.remove(name) {
                Some(st) => st,
                None => self.engine.init(var)?,
            };
            names.push(name.clone());
            items.push(Item { var, grad, lr: cfg.lr * cfg.lr_scale * lr_factor, cfg, state });
        }
        self.engine.step(&mut items)?;
        for (name, item) in names.into_iter().zip(items) {
            self.state.insert(name, item.state);
        }
        Ok(StepReport { skipped: false, nonfinite: Vec::new(), grad_norm: check.global_norm, clipped_norm, updated })
    }

    /// The state as named tensors: `<param>.<slot>` (the optimizer's moments, e.g. `exp_avg`,
    /// `exp_avg_sq`), `<param>.step` (i64, 0-d) and optimizer-wide values as
    /// `@optimizer.<name>` (f64, 0-d).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in self.param_names() {
            if let Some(st) = self.state.get(name) {
                for (slot, t) in &st.slots {
                    out.insert(format!("{name}.{slot}"), t.to_device(&Device::Cpu)?);
                }
                out.insert(format!("{name}.step"), Tensor::new(st.step as i64, &Device::Cpu)?);
            }
        }
        for (k, v) in self.engine.globals() {
            out.insert(format!("{GLOBAL_PREFIX}{k}"), Tensor::new(v, &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restores the state from named tensors (see `state_tensors`).
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<LoadReport> {
        let mut report = LoadReport::default();
        let mut used = HashSet::new();
        let mut new_state = HashMap::new();
        for group in &self.groups {
            for (name, var) in &group.params {
                let specs = self.engine.slots(var);
                let mut keys: Vec<String> = specs.iter().map(|s| format!("{name}.{}", s.name)).collect();
                keys.push(format!("{name}.step"));
                let found: Vec<Option<&Tensor>> = keys.iter().map(|k| tensors.get(k)).collect();
                if found.iter().all(|t| t.is_none()) {
                    report.fresh.push(name.clone());
                    continue;
                }
                if found.iter().any(|t| t.is_none()) {
                    return Err(Error::State(format!(
                        "{} state of '{name}' is incomplete (needs {}): the file is damaged or written by another optimizer, resume from another checkpoint",
                        self.kind().name(),
                        keys.join(", ")
                    )));
                }
                let mut slots = BTreeMap::new();
                for ((spec, key), t) in specs.iter().zip(&keys).zip(&found) {
                    let t = t.expect("checked above");
                    if !spec.shapes.iter().any(|s| s.as_slice() == t.dims()) {
                        return Err(Error::State(format!(
                            "optimizer state '{key}' has shape {:?} but the parameter needs {:?}: the checkpoint belongs to another configuration",
                            t.dims(),
                            spec.shapes[0]
                        )));
                    }
                    let device = if spec.on_cpu { Device::Cpu } else { var.device().clone() };
                    slots.insert(spec.name, t.to_dtype(spec.dtype)?.to_device(&device)?);
                }
                let step_key = keys.last().expect("pushed above");
                let step = found.last().expect("pushed above").expect("checked above");
                let step = step.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                let step = match step.as_slice() {
                    [s] if *s >= 0 => *s as u64,
                    _ => return Err(Error::State(format!("optimizer state '{step_key}' is not one step count >= 0"))),
                };
                new_state.insert(name.clone(), ParamState { step, slots });
                used.extend(keys);
            }
        }
        // Optimizer-wide values: all of them, or none for a fresh start.
        let wanted: Vec<&'static str> = self.engine.globals().into_iter().map(|(k, _)| k).collect();
        let mut values = HashMap::new();
        for k in &wanted {
            let key = format!("{GLOBAL_PREFIX}{k}");
            if let Some(t) = tensors.get(&key) {
                let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let [v] = v.as_slice() else {
                    return Err(Error::State(format!("optimizer state '{key}' is not one number")));
                };
                values.insert(*k, *v);
                used.insert(key);
            }
        }
        if values.is_empty() && new_state.is_empty() {
            self.engine.reset_globals();
        } else if values.len() != wanted.len() {
            let missing: Vec<String> = wanted.iter().filter(|k| !values.contains_key(*k)).map(|k| format!("{GLOBAL_PREFIX}{k}")).collect();
            return Err(Error::State(format!(
                "{} state lacks {}: the file was written by another optimizer or is damaged",
                self.kind().name(),
                missing.join(", ")
            )));
        } else {
            self.engine.set_globals(&values)?;
        }
        let mut unused: BTreeMap<String, ()> = BTreeMap::new();
        for k in tensors.keys().filter(|k| !used.contains(*k)) {
            let param = k.rsplit_once('.').map_or(k.as_str(), |(p, _)| p);
            unused.insert(param.to_string(), ());
        }
        report.unused = unused.into_keys().collect();
        self.state = new_state;
        Ok(report)
    }

    /// Writes the state to a safetensors file (written to a temporary file, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.state_tensors()?;
        let metadata = HashMap::from([("format".to_string(), self.kind().state_format().to_string())]);
        write_safetensors_atomic(path, &tensors, metadata)
    }

    /// Reads a state file written by `save` with the same optimizer.
    pub fn load(&mut self, path: &Path) -> Result<LoadReport> {
        let bytes = std::fs::read(path).map_err(|e| Error::State(format!("cannot read optimizer state {}: {e}", path.display())))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::State(format!(
                "optimizer state {} is not a safetensors file ({e}): use the checkpoint's optimizer.safetensors",
                path.display()
            ))
        })?;
        let format = meta.metadata().as_ref().and_then(|m| m.get("format")).cloned();
        let expected = self.kind().state_format();
        if format.as_deref() != Some(expected) {
            let writer = OptimizerKind::ALL.iter().find(|k| Some(k.state_format()) == format.as_deref());
            return Err(match writer {
                Some(k) => Error::State(format!(
                    "{} holds {} state but the run uses {}: resume with `optimizer = \"{}\"` or start a new output_dir",
                    path.display(),
                    k.name(),
                    self.kind().name(),
                    k.name()
                )),
                None => Error::State(format!("{} is not a graft optimizer state (format {:?}, expected '{expected}')", path.display(), format)),
            });
        }
        let device = self.groups.iter().flat_map(|g| g.params.first()).map(|(_, v)| v.device().clone()).next();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device.unwrap_or(Device::Cpu))?;
        self.load_state_tensors(&tensors)
    }
}

/// torch's `clip_grad_norm_` coefficient, at most 1.
fn clip_coef(max_norm: f64, norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Writes named tensors with header metadata to `path` through a temporary file and a rename, so
/// a crash never leaves a half-written file where the last good one was.
pub(crate) fn write_safetensors_atomic(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<()> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let data: Vec<(&String, &Tensor)> = tensors.iter().collect();
    safetensors::serialize_to_file(data, Some(metadata), &tmp).map_err(|e| Error::State(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::State(format!("cannot move {} to {}: {e}", tmp.display(), path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(data: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(data, &Device::Cpu).unwrap()).unwrap()
    }

    fn grads(pairs: &[(&str, &[f32])]) -> Gradients {
        let mut g = Gradients::new();
        for (n, d) in pairs {
            g.insert(*n, Tensor::new(*d, &Device::Cpu).unwrap());
        }
        g
    }

    #[test]
    fn first_step_moves_by_lr() {
        // After one step m_hat/sqrt(v_hat) = sign(g): each weight moves by lr (no decay).
        let p = var(&[1.0, -2.0]);
        let mut opt = AdamW::new(vec![(GroupConfig::new("a", 0.1).weight_decay(0.0), vec![("p".into(), p.clone())])]).unwrap();
        let r = opt.step(&grads(&[("p", &[0.5, -3.0])]), 1.0).unwrap();
        assert!(!r.skipped);
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6, "{got:?}");
        assert_eq!(opt.step_count("p"), 1);
    }

    #[test]
    fn nonfinite_gradient_skips_the_step() {
        let p = var(&[1.0, 2.0]);
        let q = var(&[3.0]);
        let mut opt = AdamW::new(vec![(GroupConfig::new("a", 0.1), vec![("p".into(), p.clone()), ("q".into(), q.clone())])]).unwrap();
        let r = opt.step(&grads(&[("p", &[f32::NAN, 1.0]), ("q", &[1.0])]), 1.0).unwrap();
        assert!(r.skipped);
        assert_eq!(r.nonfinite, vec!["p".to_string()]);
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(q.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        assert_eq!(opt.step_count("q"), 0);
        let r = opt.step(&grads(&[("q", &[f32::INFINITY])]), 1.0).unwrap();
        assert!(r.skipped && r.nonfinite == vec!["q".to_string()]);
    }

    #[test]
    fn clipping_per_parameter_then_global() {
        let p = var(&[0.0, 0.0]);
        let q = var(&[0.0]);
        let mut opt = AdamW::new(vec![
            (GroupConfig::new("a", 0.1).clip_norm(Some(1.0)), vec![("p".into(), p)]),
            (GroupConfig::new("b", 0.1), vec![("q".into(), q)]),
        ])
        .unwrap();
        // p's norm 5 is clipped to 1; q's 1 is kept; global sqrt(2) is under 10.
        opt.max_grad_norm = Some(10.0);
        let r = opt.step(&grads(&[("p", &[3.0, 4.0]), ("q", &[1.0])]), 1.0).unwrap();
        assert!((r.grad_norm - 26f64.sqrt()).abs() < 1e-5);
        assert!((r.clipped_norm - 2f64.sqrt()).abs() < 1e-5, "{r:?}");
        opt.max_grad_norm = Some(0.5);
        let r = opt.step(&grads(&[("p", &[3.0, 4.0]), ("q", &[1.0])]), 1.0).unwrap();
        assert!((r.clipped_norm - 0.5).abs() < 1e-5, "{r:?}");
    }

    #[test]
    fn state_round_trip_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let make = |p: &Var| AdamW::new(vec![(GroupConfig::new("a", 0.01), vec![("layer.w".into(), p.clone())])]).unwrap();
        let g1 = grads(&[("layer.w", &[0.3, -0.7, 0.11])]);
        let g2 = grads(&[("layer.w", &[-0.2, 0.5, 0.9])]);

        // Uninterrupted: two steps, saving the state after the first.
        let p1 = var(&[1.0, 2.0, 3.0]);
        let mut a = make(&p1);
        a.step(&g1, 1.0).unwrap();
        a.save(&path).unwrap();
        a.step(&g2, 0.5).unwrap();

        // Interrupted: one step, then a new optimizer resumes from the file.
        let p2 = var(&[1.0, 2.0, 3.0]);
        make(&p2).step(&g1, 1.0).unwrap();
        let mut b = make(&p2);
        let report = b.load(&path).unwrap();
        assert!(report.fresh.is_empty() && report.unused.is_empty(), "{report:?}");
        assert_eq!(b.step_count("layer.w"), 1);
        b.step(&g2, 0.5).unwrap();
        assert_eq!(p1.as_tensor().to_vec1::<f32>().unwrap(), p2.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn accumulator_means() {
        let mut acc = GradAccumulator::new();
        acc.add(&grads(&[("p", &[1.0, 2.0])])).unwrap();
        acc.add(&grads(&[("p", &[3.0, 6.0]), ("q", &[2.0])])).unwrap();
        assert_eq!(acc.micro_steps(), 2);
        let mean = acc.take_mean().unwrap().unwrap();
        assert_eq!(mean.get("p").unwrap().to_vec1::<f32>().unwrap(), vec![2.0, 4.0]);
        assert_eq!(mean.get("q").unwrap().to_vec1::<f32>().unwrap(), vec![1.0]);
        assert!(acc.take_mean().unwrap().is_none());
    }

    #[test]
    fn bad_groups_are_refused() {
        let p = var(&[1.0]);
        let err = AdamW::new(vec![
            (GroupConfig::new("a", 0.1), vec![("p".into(), p.clone())]),
            (GroupConfig::new("b", 0.1), vec![("p".into(), p.clone())]),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("'p'"), "{err}");
        let err = AdamW::new(vec![(GroupConfig::new("a", -1.0), vec![])]).unwrap_err();
        assert!(err.to_string().contains("group 'a'"), "{err}");
        let mut opt = AdamW::new(vec![(GroupConfig::new("a", 0.1), vec![("p".into(), p)])]).unwrap();
        assert!(opt.set_lr_scale("zzz", 0.3).unwrap_err().to_string().contains("groups: a"));
        let err = opt.step(&grads(&[("nope", &[1.0])]), 1.0).unwrap_err();
        assert!(err.to_string().contains("'nope'"));
    }
}
