//! Prodigy (Mishchenko & Defazio 2023), prodigyopt.Prodigy's math (kohya's `Prodigy`): Adam
//! whose step size `d` is estimated as it goes, so the learning rate is a multiplier of `d`
//! (use 1.0). Per step, with `dlr = d * lr * bias_correction` (`bias_correction` is
//! `sqrt(1 - b2^(k+1)) / (1 - b1^(k+1))` with `use_bias_correction`, else 1):
//! ```text
//! g  = g + wd * p                              only when decouple = false
//! num = num * b3 + sum over params of (d / d0) * dlr * <g, p0 - p>
//! m  = m * b1 + g * d * (1 - b1)
//! v  = v * b2 + g * g * d^2 * (1 - b2)
//! s  = s * b3 + g * (d / d0) * dlr              (* d instead of * dlr with safeguard_warmup)
//! d_hat = d_coef * num / sum of |s|;  d = max(d, d_hat) on the first growth; d_max = max(d_max,
//! d_hat);  d = min(d_max, d * growth_rate)
//! p  = p * (1 - wd * dlr)                       when decouple = true
//! p  = p - dlr * m / (sqrt(v) + d * eps)
//! ```
//! `b3` defaults to `sqrt(b2)`; `p0` is the parameter at its first step (0-d zero when it was
//! all zeros, as prodigyopt keeps it). State: `exp_avg`, `exp_avg_sq`, `s`, `p0`: 16 bytes per
//! f32 weight, plus `d`, `d_max`, the numerator and the step count for the whole optimizer.
//!
//! Groups: prodigyopt refuses groups with different learning rates (other than 0). Here each
//! group's rate (with its `lr_scale` and the schedule) scales its own `dlr`, which is the same
//! update when the rates agree; a group at rate 0 does not move (prodigyopt still moves it with
//! the others' rate).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

use super::spec::{Args, GroupOverrides};
use super::{Item, ParamState, SlotSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct ProdigyArgs {
    pub betas: (f64, f64),
    pub beta3: Option<f64>,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub decouple: bool,
}

impl Default for ProdigyArgs {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            beta3: None,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
            use_bias_correction: false,
            safeguard_warmup: false,
            decouple: true,
        }
    }
}

/// `[optimizer_args]`: prodigyopt's `betas`, `beta3`, `eps`, `weight_decay`, `d0`, `d_coef`,
/// `growth_rate`, `use_bias_correction`, `safeguard_warmup`, `decouple`, `slice_p` (1 only).
pub(super) fn parse_args(a: &mut Args) -> Result<(GroupOverrides, ProdigyArgs)> {
    let d = ProdigyArgs::default();
    let positive = |v: f64| v > 0.0 && !v.is_nan();
    let args = ProdigyArgs {
        betas: a.betas("betas")?.unwrap_or(d.betas),
        beta3: a.float_where("beta3", |v| (0.0..1.0).contains(&v), "must be in [0, 1)")?,
        d0: a.float_where("d0", |v| positive(v) && v.is_finite(), "must be a finite number > 0")?.unwrap_or(d.d0),
        d_coef: a.float_where("d_coef", |v| positive(v) && v.is_finite(), "must be a finite number > 0")?.unwrap_or(d.d_coef),
        growth_rate: a.float_where("growth_rate", positive, "must be > 0 (inf: no limit)")?.unwrap_or(d.growth_rate),
        use_bias_correction: a.boolean("use_bias_correction")?.unwrap_or(d.use_bias_correction),
        safeguard_warmup: a.boolean("safeguard_warmup")?.unwrap_or(d.safeguard_warmup),
        decouple: a.boolean("decouple")?.unwrap_or(d.decouple),
    };
    if let Some(s) = a.integer("slice_p")? {
        if s != 1 {
            return Err(a.err("slice_p", format!("{s}: only 1 (no slicing) is supported")));
        }
    }
    let groups = GroupOverrides {
        weight_decay: a.weight_decay()?,
        // One set of betas for every group, as prodigyopt reads them from the first group.
        betas: Some(args.betas),
        eps: a.float_where("eps", |v| v > 0.0 && v.is_finite(), "must be a finite number > 0")?,
    };
    Ok((groups, args))
}

#[derive(Debug, Clone)]
pub(super) struct Prodigy {
    pub args: ProdigyArgs,
    pub d: f64,
    d_max: f64,
    d_numerator: f64,
    k: u64,
}

impl Prodigy {
    pub fn new(args: ProdigyArgs) -> Self {
        Self { d: args.d0, d_max: args.d0, d_numerator: 0.0, k: 0, args }
    }

    fn uses_exp_avg(&self) -> bool {
        self.args.betas.0 > 0.0
    }

    pub fn init(&self, var: &Var) -> Result<ParamState> {
        let p = var.as_tensor().detach();
        let nonzero = p.abs()?.to_dtype(DType::F32)?.max_all()?.to_scalar::<f32>()? > 0.0;
        let p0 = if nonzero { p.copy()? } else { Tensor::zeros((), p.dtype(), p.device())? };
        let mut slots = vec![("exp_avg_sq", var.zeros_like()?), ("s", var.zeros_like()?), ("p0", p0)];
        if self.uses_exp_avg() {
            slots.push(("exp_avg", var.zeros_like()?));
        }
        Ok(ParamState::new(slots))
    }

    pub fn slots(&self, var: &Var) -> Vec<SlotSpec> {
        let mut p0 = SlotSpec::like("p0", var);
        p0.shapes.push(Vec::new());
        let mut out = vec![SlotSpec::like("exp_avg_sq", var), SlotSpec::like("s", var), p0];
        if self.uses_exp_avg() {
            out.push(SlotSpec::like("exp_avg", var));
        }
        out
    }

    pub fn step(&mut self, items: &mut [Item<'_>]) -> Result<()> {
        let a = self.args.clone();
        let (b1, b2) = a.betas;
        let b3 = a.beta3.unwrap_or_else(|| b2.sqrt());
        let bias_correction =
            if a.use_bias_correction { (1.0 - b2.powi(self.k as i32 + 1)).sqrt() / (1.0 - b1.powi(self.k as i32 + 1)) } else { 1.0 };
        let d = self.d;
        let max_lr = items.iter().map(|it| it.lr).fold(0.0, f64::max);
        let d_numerator = self.d_numerator * b3;

        // First pass: the moments, `s`, and the sums that estimate d (read in one round trip).
        let mut dots = Vec::new();
        let mut abs_sums = Vec::new();
        let mut dot_weights = Vec::new();
        for it in items.iter_mut() {
            let wd = it.cfg.weight_decay;
            let p = it.var.as_tensor();
            if wd != 0.0 && !a.decouple {
                it.grad = it.grad.add(&p.affine(wd, 0.0)?)?;
            }
            if it.lr <= 0.0 {
                continue;
            }
            let g = &it.grad;
            let dlr = d * it.lr * bias_correction;
            let p0 = it.state.get("p0")?;
            dots.push(g.mul(&p0.broadcast_sub(p)?)?.to_dtype(DType::F32)?.sum_all()?);
            dot_weights.push((d / a.d0) * dlr);
            if b1 > 0.0 {
                let m = it.state.get("exp_avg")?.affine(b1, 0.0)?.add(&g.affine(d * (1.0 - b1), 0.0)?)?;
                it.state.set("exp_avg", m);
            }
            let v = it.state.get("exp_avg_sq")?.affine(b2, 0.0)?.add(&g.sqr()?.affine(d * d * (1.0 - b2), 0.0)?)?;
            it.state.set("exp_avg_sq", v);
            let s_coef = (d / a.d0) * if a.safeguard_warmup { d } else { dlr };
            let s = it.state.get("s")?.affine(b3, 0.0)?.add(&g.affine(s_coef, 0.0)?)?;
            abs_sums.push(s.abs()?.to_dtype(DType::F32)?.sum_all()?);
            it.state.set("s", s);
        }
        let (delta_numerator, d_denom) = if dots.is_empty() {
            (0.0, 0.0)
        } else {
            let dots = Tensor::stack(&dots, 0)?.to_vec1::<f32>()?;
            let abs_sums = Tensor::stack(&abs_sums, 0)?.to_vec1::<f32>()?;
            // Added one at a time in f64, as prodigyopt adds Python floats.
            let delta = dots.iter().zip(&dot_weights).fold(0.0, |acc, (dot, w)| acc + w * f64::from(*dot));
            (delta, abs_sums.iter().fold(0.0, |acc, s| acc + f64::from(*s)))
        };
        // No progress measured yet (all gradients zero): prodigyopt returns before the update.
        if d_denom == 0.0 {
            return Ok(());
        }
        let mut new_d = d;
        let global_numerator = d_numerator + delta_numerator;
        if max_lr > 0.0 {
            let d_hat = a.d_coef * global_numerator / d_denom;
            if d == a.d0 {
                new_d = new_d.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            new_d = self.d_max.min(new_d * a.growth_rate);
        }
        self.d_numerator = global_numerator;
        self.d = new_d;

        // Second pass: the parameters, with the step size of before the estimate and the new d in eps.
        for it in items.iter_mut() {
            let dlr = d * it.lr * bias_correction;
            let wd = it.cfg.weight_decay;
            it.state.step += 1;
            let denom = it.state.get("exp_avg_sq")?.sqrt()?.affine(1.0, new_d * it.cfg.eps)?;
            let mut p = it.var.as_tensor().detach();
            if wd != 0.0 && a.decouple {
                p = p.add(&p.affine(-wd * dlr, 0.0)?)?;
            }
            let num = if b1 > 0.0 { it.state.get("exp_avg")? } else { &it.grad };
            p = p.sub(&num.div(&denom)?.affine(dlr, 0.0)?)?;
            it.var.set(&p)?;
        }
        self.k += 1;
        Ok(())
    }

    pub fn globals(&self) -> Vec<(&'static str, f64)> {
        vec![("d", self.d), ("d_max", self.d_max), ("d_numerator", self.d_numerator), ("k", self.k as f64)]
    }

    pub fn set_globals(&mut self, v: &HashMap<&str, f64>) -> Result<()> {
        let get = |k: &str| v.get(k).copied().ok_or_else(|| Error::State(format!("Prodigy state lacks `{k}`")));
        let (d, d_max, num, k) = (get("d")?, get("d_max")?, get("d_numerator")?, get("k")?);
        if !(d > 0.0 && d_max > 0.0 && num.is_finite() && k >= 0.0 && k.fract() == 0.0) {
            return Err(Error::State(format!("Prodigy state is damaged (d {d}, d_max {d_max}, numerator {num}, k {k})")));
        }
        (self.d, self.d_max, self.d_numerator, self.k) = (d, d_max, num, k as u64);
        Ok(())
    }
}
