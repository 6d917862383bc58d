//! AdamW, torch.optim.AdamW's math step for step (checked against torch by a fixture):
//! ```text
//! t += 1
//! p  = p * (1 - lr * wd)                      decoupled weight decay, before the Adam update
//! m  = m + (g - m) * (1 - b1)
//! v  = v * b2 + g * g * (1 - b2)
//! p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! State: `exp_avg` (m) and `exp_avg_sq` (v), each the parameter's size: 8 bytes per f32 weight.

use candle_core::Var;

use crate::error::Result;

use super::spec::{Args, GroupOverrides};
use super::{Item, ParamState, SlotSpec};

/// `[optimizer_args]`: `weight_decay`, `betas = [b1, b2]`, `eps` (torch's names).
pub(super) fn parse_args(a: &mut Args) -> Result<GroupOverrides> {
    Ok(GroupOverrides {
        weight_decay: a.weight_decay()?,
        betas: a.betas("betas")?,
        eps: a.float_where("eps", |v| v.is_finite() && v >= 0.0, "must be >= 0")?,
    })
}

pub(super) fn init(var: &Var) -> Result<ParamState> {
    Ok(ParamState::new(vec![("exp_avg", var.zeros_like()?), ("exp_avg_sq", var.zeros_like()?)]))
}

pub(super) fn slots(var: &Var) -> Vec<SlotSpec> {
    vec![SlotSpec::like("exp_avg", var), SlotSpec::like("exp_avg_sq", var)]
}

/// One torch AdamW update of one parameter.
pub(super) fn update(it: &mut Item<'_>) -> Result<()> {
    let cfg = it.cfg;
    let (lr, g) = (it.lr, &it.grad);
    let (b1, b2) = cfg.betas;
    let step = it.state.step + 1;
    let mut p = it.var.as_tensor().detach();
    if cfg.weight_decay != 0.0 {
        p = p.affine(1.0 - lr * cfg.weight_decay, 0.0)?;
    }
    let m0 = it.state.get("exp_avg")?;
    let v0 = it.state.get("exp_avg_sq")?;
    // m.lerp_(g, 1 - b1) as torch writes it.
    let m = m0.add(&g.sub(m0)?.affine(1.0 - b1, 0.0)?)?.detach();
    let v = v0.affine(b2, 0.0)?.add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?.detach();
    let bias1 = 1.0 - b1.powi(step as i32);
    let bias2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
    let step_size = lr / bias1;
    let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, cfg.eps)?;
    let p = p.sub(&m.div(&denom)?.affine(step_size, 0.0)?)?;
    it.var.set(&p)?;
    it.state.set("exp_avg", m);
    it.state.set("exp_avg_sq", v);
    it.state.step = step;
    Ok(())
}
