//! Adafactor (Shazeer & Stern 2018), transformers.optimization.Adafactor's math (kohya's
//! `Adafactor`). For a parameter of 2 or more dimensions the second moment is factored into a
//! row and a column average over its last two dimensions; a vector keeps a full one. Per step t:
//! ```text
//! rho  = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))   with relative_step, else lr
//! lr   = rho * max(eps2, rms(p))                                  max(..) only with scale_parameter
//! b2t  = 1 - t^decay_rate
//! u    = g^2 + eps1
//! row  = row * b2t + mean(u, last dim) * (1 - b2t)            (factored)
//! col  = col * b2t + mean(u, second-last dim) * (1 - b2t)
//! u    = g / sqrt(row / mean(row) (x) col)                     (outer product over the last two dims)
//!   or v = v * b2t + u * (1 - b2t);  u = g / sqrt(v)           (not factored)
//! u    = u / max(1, rms(u) / clip_threshold) * lr
//! m    = m * beta1 + u * (1 - beta1);  u = m                   (only with beta1)
//! p    = p * (1 - wd * lr) - u
//! ```
//! With `relative_step` (the default, as in transformers) the step size comes from the step
//! count: the group's learning rate and the schedule are not used, its `lr_scale` still is.
//! State: `exp_avg_sq_row` + `exp_avg_sq_col` (rows + columns numbers) or `exp_avg_sq`, and
//! `exp_avg` with beta1; computed in f32.

use candle_core::{DType, Tensor, Var, D};

use crate::error::Result;

use super::spec::{Args, GroupOverrides};
use super::{Item, ParamState, SlotSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorArgs {
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorArgs {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

/// `[optimizer_args]`: transformers' `eps = [eps1, eps2]`, `clip_threshold`, `decay_rate`,
/// `beta1`, `weight_decay`, `scale_parameter`, `relative_step`, `warmup_init`.
pub(super) fn parse_args(a: &mut Args) -> Result<(GroupOverrides, AdafactorArgs)> {
    let d = AdafactorArgs::default();
    let eps = match a.pair("eps")? {
        Some((e1, e2)) if !(e1 >= 0.0 && e2 >= 0.0 && e1.is_finite() && e2.is_finite()) => {
            return Err(a.err("eps", format!("[{e1}, {e2}]: both must be finite numbers >= 0")));
        }
        e => e.unwrap_or(d.eps),
    };
    let args = AdafactorArgs {
        eps,
        clip_threshold: a
            .float_where("clip_threshold", |v| v > 0.0 && v.is_finite(), "must be a finite number > 0")?
            .unwrap_or(d.clip_threshold),
        decay_rate: a
            .float_where("decay_rate", |v| (-1.0..=0.0).contains(&v), "must be in [-1, 0] (beta2 of step t is 1 - t^decay_rate)")?
            .unwrap_or(d.decay_rate),
        beta1: a.float_where("beta1", |v| (0.0..1.0).contains(&v), "must be in [0, 1)")?,
        scale_parameter: a.boolean("scale_parameter")?.unwrap_or(d.scale_parameter),
        relative_step: a.boolean("relative_step")?.unwrap_or(d.relative_step),
        warmup_init: a.boolean("warmup_init")?.unwrap_or(d.warmup_init),
    };
    if args.warmup_init && !args.relative_step {
        return Err(a.err("warmup_init", "true needs relative_step = true (as transformers requires)"));
    }
    Ok((GroupOverrides { weight_decay: a.weight_decay()?, betas: None, eps: None }, args))
}

#[derive(Debug, Clone)]
pub(super) struct Adafactor {
    args: AdafactorArgs,
}

/// The row and column shapes of a factored second moment.
fn factored_shapes(dims: &[usize]) -> Option<(Vec<usize>, Vec<usize>)> {
    let n = dims.len();
    (n >= 2).then(|| {
        let row = dims[..n - 1].to_vec();
        let mut col = dims[..n - 2].to_vec();
        col.push(dims[n - 1]);
        (row, col)
    })
}

fn f32_slot(name: &'static str, shape: Vec<usize>) -> SlotSpec {
    SlotSpec { name, shapes: vec![shape], dtype: DType::F32, on_cpu: false }
}

/// rms(t) = ||t|| / sqrt(numel), as a 0-d tensor (no device round trip).
fn rms(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.sum_all()?.affine(1.0 / t.elem_count() as f64, 0.0)?.sqrt()?)
}

impl Adafactor {
    pub fn new(args: AdafactorArgs) -> Self {
        Self { args }
    }

    pub fn slots(&self, var: &Var) -> Vec<SlotSpec> {
        let mut out = match factored_shapes(var.dims()) {
            Some((row, col)) => vec![f32_slot("exp_avg_sq_row", row), f32_slot("exp_avg_sq_col", col)],
            None => vec![f32_slot("exp_avg_sq", var.dims().to_vec())],
        };
        if self.args.beta1.is_some() {
            out.push(f32_slot("exp_avg", var.dims().to_vec()));
        }
        out
    }

    pub fn init(&self, var: &Var) -> Result<ParamState> {
        let slots = self
            .slots(var)
            .into_iter()
            .map(|s| Ok((s.name, Tensor::zeros(s.shapes[0].as_slice(), DType::F32, var.device())?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamState::new(slots))
    }

    pub fn update(&self, it: &mut Item<'_>) -> Result<()> {
        let a = &self.args;
        let step = it.state.step + 1;
        let g = it.grad.to_dtype(DType::F32)?;
        let p = it.var.as_tensor().detach().to_dtype(DType::F32)?;
        let t = step as f64;
        let rho = if a.relative_step {
            let min_step = if a.warmup_init { 1e-6 * t } else { 1e-2 };
            min_step.min(1.0 / t.sqrt()) * it.cfg.lr_scale
        } else {
            it.lr
        };
        // lr as a 0-d tensor: rho * max(eps2, rms(p)).
        let lr = if a.scale_parameter { rms(&p)?.maximum(a.eps.1)?.affine(rho, 0.0)? } else { Tensor::new(rho as f32, p.device())? };
        let beta2t = 1.0 - t.powf(a.decay_rate);
        let sq = g.sqr()?.affine(1.0, a.eps.0)?;
        let mut u = if factored_shapes(g.dims()).is_some() {
            let row = it.state.get("exp_avg_sq_row")?.affine(beta2t, 0.0)?.add(&sq.mean(D::Minus1)?.affine(1.0 - beta2t, 0.0)?)?;
            let col = it.state.get("exp_avg_sq_col")?.affine(beta2t, 0.0)?.add(&sq.mean(D::Minus2)?.affine(1.0 - beta2t, 0.0)?)?;
            let r = row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
            let c = col.unsqueeze(col.rank() - 1)?.sqrt()?.recip()?;
            let u = r.broadcast_mul(&c)?.mul(&g)?;
            it.state.set("exp_avg_sq_row", row);
            it.state.set("exp_avg_sq_col", col);
            u
        } else {
            let v = it.state.get("exp_avg_sq")?.affine(beta2t, 0.0)?.add(&sq.affine(1.0 - beta2t, 0.0)?)?;
            let u = v.sqrt()?.recip()?.mul(&g)?;
            it.state.set("exp_avg_sq", v);
            u
        };
        let clip = rms(&u)?.affine(1.0 / a.clip_threshold, 0.0)?.maximum(1.0)?;
        u = u.broadcast_div(&clip)?.broadcast_mul(&lr)?;
        if let Some(b1) = a.beta1 {
            let m = it.state.get("exp_avg")?.affine(b1, 0.0)?.add(&u.affine(1.0 - b1, 0.0)?)?;
            it.state.set("exp_avg", m.clone());
            u = m;
        }
        let wd = it.cfg.weight_decay;
        let mut p = p;
        if wd != 0.0 {
            p = p.add(&p.broadcast_mul(&lr.affine(-wd, 0.0)?)?)?;
        }
        let p = p.sub(&u)?.to_dtype(it.var.dtype())?;
        it.var.set(&p)?;
        it.state.step = step;
        Ok(())
    }
}
