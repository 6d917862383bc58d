//! Which layers each stage adapts, what state each stage puts the run in, and the directives
//! that move the host from one state to another.

use std::collections::BTreeMap;

use graft_sdk::{bail, BlockKind, Directive, LayerInfo, LayerMatcher, Result};

use crate::settings::Config;

/// A stage number: 1, 2 or 3.
pub type StageNo = usize;

pub const STAGES: [StageNo; 3] = [1, 2, 3];

/// The optimizer group of a stage's adapters.
pub fn group(stage: StageNo) -> String {
    format!("stage{stage}")
}

/// The stage a step belongs to: `[0, s1)` is 1, `[s1, s1 + s2)` is 2, the rest is 3.
pub fn stage_of(config: &Config, step: u64) -> StageNo {
    if step < config.stage1_steps {
        1
    } else if step < config.stage1_steps + config.stage2_steps {
        2
    } else {
        3
    }
}

/// The first step of a stage.
pub fn start_of(config: &Config, stage: StageNo) -> u64 {
    match stage {
        1 => 0,
        2 => config.stage1_steps,
        _ => config.stage1_steps + config.stage2_steps,
    }
}

/// One LoRA module: the stage that adds it and its rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub layer: String,
    pub stage: StageNo,
    pub rank: usize,
    pub alpha: f64,
    pub in_features: usize,
    pub out_features: usize,
}

impl Module {
    fn new(layer: &LayerInfo, stage: StageNo, rank: usize, alpha: f64) -> Self {
        Self {
            layer: layer.name().to_string(),
            stage,
            rank,
            alpha,
            in_features: layer.in_features as usize,
            out_features: layer.out_features as usize,
        }
    }

    /// The LoRA scale `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Every module of the three stages, stage 1 first, each stage in the order of `layers`.
/// A layer claimed by two stages is an error (one adapter per layer).
pub fn select(config: &Config, layers: &[LayerInfo]) -> Result<Vec<Module>> {
    let id = crate::ID;
    let mut modules = Vec::new();

    let stage1 = LayerMatcher::new(&config.stage1_targets)?;
    modules
        .extend(stage1.filter(layers).into_iter().filter(|l| l.is_linear()).map(|l| Module::new(l, 1, config.stage1_rank, config.stage1_alpha)));
    if modules.is_empty() {
        bail!("{id}: stage 1: no linear layer matches `stage1_targets` {:?}", config.stage1_targets);
    }

    let before = modules.len();
    if config.stage2_text_layers > 0 {
        for l in text_layers(config, layers)? {
            modules.push(Module::new(l, 2, config.stage2_rank, config.stage2_alpha));
        }
        if modules.len() == before {
            bail!(
                "{id}: stage 2: no text-encoder layer has a module named {:?}; set `stage2_modules` or `stage2_text_layers: 0`",
                config.stage2_modules
            );
        }
    }

    let stage3 = LayerMatcher::new(&config.stage3_targets)?;
    let before = modules.len();
    modules
        .extend(stage3.filter(layers).into_iter().filter(|l| l.is_linear()).map(|l| Module::new(l, 3, config.stage3_rank, config.stage3_alpha)));
    if modules.len() == before {
        bail!("{id}: stage 3: no linear layer matches `stage3_targets` {:?}", config.stage3_targets);
    }

    let mut owner: BTreeMap<&str, StageNo> = BTreeMap::new();
    for m in &modules {
        if let Some(first) = owner.insert(&m.layer, m.stage) {
            bail!(
                "{id}: layer `{}` is selected by stage {first} and stage {}: each layer takes one adapter; narrow the targets",
                m.layer,
                m.stage
            );
        }
    }
    Ok(modules)
}

/// The stage-2 layers: in each text encoder, the modules of its last `stage2_text_layers`
/// layers (by the largest text-layer index among its hook points, less the final one where the
/// pipeline never uses it).
fn text_layers<'l>(config: &Config, layers: &'l [LayerInfo]) -> Result<Vec<&'l LayerInfo>> {
    let text = |l: &&LayerInfo| l.block.kind == BlockKind::TEXT_LAYER && l.is_linear();
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for l in layers.iter().filter(text) {
        let top = last.entry(l.component.name().into_owned()).or_insert(0);
        *top = (*top).max(l.block.index);
    }
    if last.is_empty() {
        bail!("{}: stage 2: the model has no text-encoder layers; set `stage2_text_layers` to 0", crate::ID);
    }
    let window: BTreeMap<String, (u32, u32)> = last
        .into_iter()
        .map(|(component, top)| {
            let skip = config.stage2_skip_final_layer_of.contains(&component) as u32;
            let hi = top.saturating_sub(skip);
            let lo = (hi + 1).saturating_sub(config.stage2_text_layers);
            (component, (lo, hi))
        })
        .collect();
    let wanted = |l: &LayerInfo| {
        let Some(&(lo, hi)) = window.get(l.component.name().as_ref()) else { return false };
        (lo..=hi).contains(&l.block.index) && config.stage2_modules.iter().any(|m| l.name().ends_with(&format!(".{m}")))
    };
    Ok(layers.iter().filter(text).filter(|l| wanted(l)).collect())
}

/// What a stage asks of the host, per adapter stage (index 0 = the stage-1 adapters) and per
/// optimizer group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageState {
    pub attached: [bool; 3],
    pub trainable: [bool; 3],
    pub lr_scale: [f64; 3],
}

/// Stage 1 trains its adapters only; stage 2 adds the text-encoder adapters (stage 1 keeps
/// training unless configured otherwise); stage 3 freezes both as one composite and trains the
/// cross-attention adapters at a scaled learning rate. Adapters of a later stage stay detached
/// and frozen until it starts.
pub fn state_of(config: &Config, stage: StageNo) -> StageState {
    match stage {
        1 => StageState { attached: [true, false, false], trainable: [true, false, false], lr_scale: [1.0; 3] },
        2 => StageState { attached: [true, true, false], trainable: [config.stage2_train_stage1, true, false], lr_scale: [1.0; 3] },
        _ => StageState { attached: [true, true, true], trainable: [false, false, true], lr_scale: [1.0, 1.0, config.stage3_lr_scale] },
    }
}

/// The directives that take the host from `from` to `to`; with `from` unknown (`None`), every
/// directive that sets `to` (idempotent: attaching an attached layer changes nothing).
///
/// Order: for the stage-1, then stage-2, then stage-3 adapters, attach / detach of each layer,
/// then freeze / unfreeze of each layer; then the learning-rate scales of the three groups.
pub fn directives(modules: &[Module], from: Option<StageState>, to: StageState) -> Vec<Directive> {
    let mut out = Vec::new();
    for (i, stage) in STAGES.into_iter().enumerate() {
        let of_stage = || modules.iter().filter(move |m| m.stage == stage);
        if from.map(|f| f.attached[i]) != Some(to.attached[i]) {
            for m in of_stage() {
                let layer = m.layer.clone();
                out.push(if to.attached[i] { Directive::Attach { layer } } else { Directive::Detach { layer } });
            }
        }
        if from.map(|f| f.trainable[i]) != Some(to.trainable[i]) {
            for m in of_stage() {
                let layer = m.layer.clone();
                out.push(if to.trainable[i] { Directive::Unfreeze { layer, param: None } } else { Directive::Freeze { layer, param: None } });
            }
        }
    }
    for (i, stage) in STAGES.into_iter().enumerate() {
        if from.map(|f| f.lr_scale[i]) != Some(to.lr_scale[i]) {
            out.push(Directive::LrScale { group: group(stage), scale: to.lr_scale[i] });
        }
    }
    out
}
