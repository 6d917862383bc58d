//! AdamW over candle `Var`s with parameter groups, the host's own (candle's has no groups, no
//! clipping and no state to save).
//!
//! The math is torch.optim.AdamW's, step for step (checked against torch by a fixture):
//! ```text
//! t += 1
//! p  = p * (1 - lr * wd)                      decoupled weight decay, before the Adam update
//! m  = m + (g - m) * (1 - b1)
//! v  = v * b2 + g * g * (1 - b2)
//! p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! `lr` is the group's learning rate times its `lr_scale` (staged strategies) times the schedule's
//! factor. Before the update, in this order:
//! 1. a non-finite gradient anywhere skips the whole step (nothing changes, the report names the
//!    parameters) so the caller can count it;
//! 2. each parameter of a group with `clip_norm` has its gradient clipped to that L2 norm on its own;
//! 3. with `max_grad_norm`, all gradients together are clipped to that global L2 norm.
//!
//! Both clips use torch's `clip_grad_norm_` rule: `g *= min(1, max / (norm + 1e-6))`.
//!
//! The state (m, v and the step count of each parameter) is saved to safetensors keyed by the
//! parameter name, so a resumed run continues bit-exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Error, Result, Tensor, Var};

/// File-format tag written into the state file's metadata.
const STATE_FORMAT: &str = "graft-adamw/1";

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
        Self {
            name: name.into(),
            lr,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            clip_norm: None,
            lr_scale: 1.0,
        }
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
        let bad = |what: &str| Error::Msg(format!("optimizer group '{}': {what}", self.name));
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

#[derive(Debug)]
struct ParamState {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// AdamW with parameter groups. See the module documentation for the math.
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    state: HashMap<String, ParamState>,
    /// Clip all gradients together to this global L2 norm.
    pub max_grad_norm: Option<f64>,
}

impl AdamW {
    pub fn new(groups: Vec<(GroupConfig, Vec<(String, Var)>)>) -> Result<Self> {
        let mut opt = Self { groups: Vec::new(), state: HashMap::new(), max_grad_norm: None };
        for (config, params) in groups {
            opt.add_group(config, params)?;
        }
        Ok(opt)
    }

    /// Adds a group. Group and parameter names must be unique across the optimizer.
    pub fn add_group(&mut self, config: GroupConfig, params: Vec<(String, Var)>) -> Result<()> {
        config.check()?;
        if self.groups.iter().any(|g| g.config.name == config.name) {
            return Err(Error::Msg(format!("optimizer group '{}' is defined twice", config.name)));
        }
        let mut seen: HashSet<&str> = self.param_names().collect();
        for (name, _) in &params {
            if !seen.insert(name) {
                return Err(Error::Msg(format!(
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
            .ok_or_else(|| Error::Msg(format!("no optimizer group '{name}' (groups: {})", known.join(", "))))
    }

    /// Sets a group's learning-rate scale (for staged strategies).
    pub fn set_lr_scale(&mut self, group: &str, scale: f64) -> Result<()> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(Error::Msg(format!("learning-rate scale {scale} for group '{group}' must be >= 0")));
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

    /// One AdamW update with the given gradients. `lr_factor` is the schedule's factor for this
    /// step. Parameters without a gradient are left alone (their step count does not move).
    pub fn step(&mut self, grads: &Gradients, lr_factor: f64) -> Result<StepReport> {
        let known: HashSet<&str> = self.param_names().collect();
        for name in grads.map.keys() {
            if !known.contains(name.as_str()) {
                return Err(Error::Msg(format!("gradient for '{name}', which is not a parameter of this optimizer")));
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
        for (gi, pi, g) in clipped {
            let group = &self.groups[gi];
            let (name, var) = &group.params[pi];
            let cfg = &group.config;
            let lr = cfg.lr * cfg.lr_scale * lr_factor;
            let st = match self.state.remove(name) {
                Some(st) => st,
                None => ParamState { m: var.zeros_like()?, v: var.zeros_like()?, step: 0 },
            };
            let st = adamw_update(var, &g, st, lr, cfg)?;
            self.state.insert(name.clone(), st);
        }
        Ok(StepReport { skipped: false, nonfinite: Vec::new(), grad_norm: check.global_norm, clipped_norm, updated })
    }

    /// The state as named tensors: `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step` (i64, 0-d).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in self.param_names() {
            if let Some(st) = self.state.get(name) {
                out.insert(format!("{name}.exp_avg"), st.m.to_device(&Device::Cpu)?);
                out.insert(format!("{name}.exp_avg_sq"), st.v.to_device(&Device::Cpu)?);
                out.insert(format!("{name}.step"), Tensor::new(st.step as i64, &Device::Cpu)?);
            }
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
                let keys = [format!("{name}.exp_avg"), format!("{name}.exp_avg_sq"), format!("{name}.step")];
                let found: Vec<Option<&Tensor>> = keys.iter().map(|k| tensors.get(k)).collect();
                if found.iter().all(|t| t.is_none()) {
                    report.fresh.push(name.clone());
                    continue;
                }
                let (Some(m), Some(v), Some(step)) = (found[0], found[1], found[2]) else {
                    return Err(Error::Msg(format!(
                        "optimizer state of '{name}' is incomplete (needs {}): the file is damaged, resume from another checkpoint",
                        keys.join(", ")
                    )));
                };
                for (k, t) in [(&keys[0], m), (&keys[1], v)] {
                    if t.dims() != var.dims() {
                        return Err(Error::Msg(format!(
                            "optimizer state '{k}' has shape {:?} but the parameter has {:?}: the checkpoint belongs to another configuration",
                            t.dims(),
                            var.dims()
                        )));
                    }
                }
                let step = step.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                let step = match step.as_slice() {
                    [s] if *s >= 0 => *s as u64,
                    _ => return Err(Error::Msg(format!("optimizer state '{}' is not one step count >= 0", keys[2]))),
                };
                let to_param = |t: &Tensor| -> Result<Tensor> { t.to_dtype(var.dtype())?.to_device(var.device()) };
                new_state.insert(name.clone(), ParamState { m: to_param(m)?, v: to_param(v)?, step });
                used.extend(keys);
            }
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
        let metadata = HashMap::from([("format".to_string(), STATE_FORMAT.to_string())]);
        write_safetensors_atomic(path, &tensors, metadata)
    }

    /// Reads a state file written by `save`.
    pub fn load(&mut self, path: &Path) -> Result<LoadReport> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Msg(format!("cannot read optimizer state {}: {e}", path.display())))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Msg(format!("optimizer state {} is not a safetensors file ({e}): use the checkpoint's optimizer.safetensors", path.display()))
        })?;
        let format = meta.metadata().as_ref().and_then(|m| m.get("format")).cloned();
        if format.as_deref() != Some(STATE_FORMAT) {
            return Err(Error::Msg(format!(
                "{} is not a graft optimizer state (format {:?}, expected '{STATE_FORMAT}')",
                path.display(),
                format
            )));
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

/// One torch AdamW update of one parameter.
fn adamw_update(var: &Var, g: &Tensor, st: ParamState, lr: f64, cfg: &GroupConfig) -> Result<ParamState> {
    let (b1, b2) = cfg.betas;
    let step = st.step + 1;
    let mut p = var.as_tensor().detach();
    if cfg.weight_decay != 0.0 {
        p = p.affine(1.0 - lr * cfg.weight_decay, 0.0)?;
    }
    // m.lerp_(g, 1 - b1) as torch writes it.
    let m = st.m.add(&g.sub(&st.m)?.affine(1.0 - b1, 0.0)?)?.detach();
    let v = st.v.affine(b2, 0.0)?.add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?.detach();
    let bias1 = 1.0 - b1.powi(step as i32);
    let bias2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
    let step_size = lr / bias1;
    let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, cfg.eps)?;
    let p = p.sub(&m.div(&denom)?.affine(step_size, 0.0)?)?;
    var.set(&p)?;
    Ok(ParamState { m, v, step })
}

/// Writes named tensors with header metadata to `path` through a temporary file and a rename, so
/// a crash never leaves a half-written file where the last good one was.
pub(crate) fn write_safetensors_atomic(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let data: Vec<(&String, &Tensor)> = tensors.iter().collect();
    safetensors::serialize_to_file(data, Some(metadata), &tmp)
        .map_err(|e| Error::Msg(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Msg(format!("cannot move {} to {}: {e}", tmp.display(), path.display()))
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
