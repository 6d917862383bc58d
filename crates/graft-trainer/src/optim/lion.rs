//! Lion (Chen et al. 2023), lion_pytorch.Lion's math (kohya's `Lion`):
//! ```text
//! p = p * (1 - lr * wd)
//! p = p - lr * sign(m * b1 + g * (1 - b1))
//! m = m * b2 + g * (1 - b2)
//! ```
//! State: `exp_avg` (m) only: 4 bytes per f32 weight. Lion's steps are all of size lr per
//! weight, so it wants a learning rate 3-10x smaller than AdamW's and a larger weight decay.

use candle_core::Var;

use crate::error::Result;

use super::spec::{Args, GroupOverrides};
use super::{Item, ParamState, SlotSpec};

/// lion_pytorch's default betas (AdamW's are (0.9, 0.999)).
pub(super) const DEFAULT_BETAS: (f64, f64) = (0.9, 0.99);

/// `[optimizer_args]`: `betas = [b1, b2]`, `weight_decay`.
pub(super) fn parse_args(a: &mut Args) -> Result<GroupOverrides> {
    Ok(GroupOverrides { weight_decay: a.weight_decay()?, betas: a.betas("betas")?, eps: None })
}

pub(super) fn init(var: &Var) -> Result<ParamState> {
    Ok(ParamState::new(vec![("exp_avg", var.zeros_like()?)]))
}

pub(super) fn slots(var: &Var) -> Vec<SlotSpec> {
    vec![SlotSpec::like("exp_avg", var)]
}

pub(super) fn update(it: &mut Item<'_>) -> Result<()> {
    let (lr, g) = (it.lr, &it.grad);
    let (b1, b2) = it.cfg.betas;
    let p = it.var.as_tensor().detach().affine(1.0 - lr * it.cfg.weight_decay, 0.0)?;
    let m = it.state.get("exp_avg")?;
    let direction = m.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?.sign()?;
    it.var.set(&p.sub(&direction.affine(lr, 0.0)?)?)?;
    let m = m.affine(b2, 0.0)?.add(&g.affine(1.0 - b2, 0.0)?)?.detach();
    it.state.set("exp_avg", m);
    it.state.step += 1;
    Ok(())
}
