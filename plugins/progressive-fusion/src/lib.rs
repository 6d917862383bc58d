//! progressive-fusion: LoRA trained in three stages, each adding adapters where the previous
//! one left off.
//!
//! | stage | steps (defaults) | adapters trained | group, lr |
//! | --- | --- | --- | --- |
//! | 1 | `[0, 500)` | UNet mid block `proj_out` (rank 4, alpha 16); text encoders frozen | `stage1`, 1e-4 |
//! | 2 | `[500, 1000)` | + self-attention `q/k/v/out_proj` of the last two layers of each text encoder (rank 12, alpha 24); stage 1 keeps training | `stage2`, 5e-5 |
//! | 3 | `[1000, end)` | stages 1 and 2 frozen as one composite; + every UNet cross-attention `attn2.to_q/k/v/to_out.0` (rank 8, alpha 16) | `stage3`, 1e-4 x 0.3 |
//!
//! Every module is plain LoRA: `y = base_out + (alpha / r) * up(down(x))`, `down` [r, in]
//! kaiming-uniform(a = sqrt 5) and `up` [out, r] zeros, as kohya initialises them. So each
//! module has a `delta_weight` (`(alpha / r) * up @ down`) and exports in the `lora` family: the
//! host writes the whole composite as one kohya (or PEFT) file with per-module ranks and alphas.
//!
//! **The composite.** At the start of stage 3 the stage 1 and 2 adapters become one composite
//! adapter by being *frozen and kept attached*, not folded into the base weights
//! (`fold_into_base`). The result is the same function, but the composite stays a LoRA: it is
//! exported with the stage-3 modules as one file, it can be ejected or re-weighted at
//! generation time, and the base model is never modified.
//!
//! **"The last two layers"** of a text encoder are found from the hook points (the largest
//! text-layer index of each encoder), so the same config works for the tiny test model and for
//! SDXL. SDXL conditions the UNet on CLIP-L's *penultimate* hidden state, so CLIP-L's final layer
//! never reaches the UNet and an adapter there would get no gradient: by default
//! (`stage2_skip_final_layer_of: ["text_encoder"]`) CLIP-L's window ends one layer earlier
//! (layers 9 and 10 of 12), bigG's is its last two (30 and 31 of 32: its final layer feeds the
//! pooled embedding). `[]` takes the literal last two layers of both.
//!
//! **Stage transitions** come from `on_step` as directives. All modules are declared by `plan`
//! from the start (later stages detached and frozen), so the optimizer sees every parameter and
//! a checkpoint has the same keys at every step. The plugin keeps the stage the host is in and
//! whether that is certain:
//! - `on_step(step)` computes the stage of `step`; when it equals the known stage it returns
//!   nothing; when it differs, it returns the directives from the known stage's state to the new
//!   one (at step 500: attach and unfreeze the stage-2 layers; at step 1000: freeze the stage 1
//!   and 2 layers, attach and unfreeze the stage-3 layers, `lr_scale(stage3, 0.3)`), so each
//!   boundary produces them exactly once, and a jump (step 0 to 1200) goes straight to the
//!   target state.
//! - after `load_state` (resume or hot reload) the host's state is not certain (it may have
//!   re-applied the plan), so the next `on_step` returns the *full* set for its stage: attach or
//!   detach of every layer, freeze or unfreeze of every layer and the three learning-rate
//!   scales. Every directive sets a state, so repeating one is harmless.
//! - `plan` describes the known stage (stage 1 for a new strategy; the loaded stage after
//!   `load_state`), so a hot reload's re-plan does not undo the stage either.
//!
//! What the host must do with them: `attach` / `detach` start and stop calling `forward` at a
//! layer; `freeze` / `unfreeze` (all of a layer's parameters) change what the optimizer
//! updates; `lr_scale` sets a group's learning rate to `plan lr * value` (not cumulative). While
//! stage 2's text-encoder adapters are attached, text-encoder outputs cannot be cached.
//!
//! **Configuration** (JSON, every key optional; see `settings.rs`): `stage1_steps` (500),
//! `stage2_steps` (500); `stage1_targets` (`["unet.mid_block.*proj_out"]`), `stage1_rank` (4),
//! `stage1_alpha` (16), `stage1_lr` (1e-4); `stage2_text_layers` (2),
//! `stage2_skip_final_layer_of` (`["text_encoder"]`), `stage2_modules`
//! (`self_attn.{q,k,v,out}_proj`), `stage2_rank` (12), `stage2_alpha` (24), `stage2_lr` (5e-5),
//! `stage2_train_stage1` (true); `stage3_targets` (`unet.*.attn2.to_{q,k,v}`, `to_out.0`),
//! `stage3_rank` (8), `stage3_alpha` (16), `stage3_lr` (1e-4), `stage3_lr_scale` (0.3);
//! `weight_decay` (0). For a quick run: `{"stage1_steps": 4, "stage2_steps": 4}`.

mod settings;
mod stages;

use std::collections::BTreeMap;

use graft_sdk::prelude::*;
use serde::Deserialize;

use settings::Config;
use stages::{Module, StageNo};

/// The strategy id (parameters and exports are keyed by it).
pub(crate) const ID: &str = "progressive-fusion";

struct ProgressiveFusion {
    config: Config,
    /// The modules of the last plan, in plan order (stage 1, 2, 3).
    modules: Vec<Module>,
    /// Index into `modules` by layer name.
    by_layer: BTreeMap<String, usize>,
    /// The stage the host is in (or was in, when `synced` is false).
    stage: StageNo,
    /// Whether the host is known to be in `stage`'s state. False after `load_state`.
    synced: bool,
    last_step: Option<u64>,
}

impl ProgressiveFusion {
    fn module(&self, layer: &LayerInfo) -> Result<&Module> {
        self.by_layer
            .get(layer.name())
            .map(|&i| &self.modules[i])
            .ok_or_else(|| Error::msg(format!("{ID}: layer `{}` is not one of this strategy's layers (was `plan` called?)", layer.name())))
    }
}

impl Strategy for ProgressiveFusion {
    fn manifest() -> Manifest {
        Manifest::new(ID, env!("CARGO_PKG_VERSION"))
            .description(
                "Three-stage progressive LoRA: UNet mid-block proj_out, then the last text-encoder layers' \
                 self-attention, then every UNet cross-attention at a reduced learning rate over the frozen \
                 stage 1+2 composite",
            )
            .capability("delta_weight")
            .capability("stages")
            .capability("export:lora")
            .config_example(settings::EXAMPLE)
    }

    fn config_schema() -> Option<ConfigSchema> {
        Some(settings::schema())
    }

    fn new(config: &str) -> Result<Self> {
        Ok(Self { config: Config::parse(config)?, modules: Vec::new(), by_layer: BTreeMap::new(), stage: 1, synced: true, last_step: None })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let c = &self.config;
        let modules = stages::select(c, layers)?;
        let state = stages::state_of(c, self.stage);
        let mut plan = Plan::new();
        for (stage, lr) in [(1, c.stage1_lr), (2, c.stage2_lr), (3, c.stage3_lr)] {
            plan = plan.group(OptimizerGroup::new(stages::group(stage), lr).weight_decay(c.weight_decay));
        }
        for m in &modules {
            let i = m.stage - 1;
            let group = stages::group(m.stage);
            let param = |name: &str, shape: &[usize], init: Init| {
                let p = ParamSpec::new(name, shape, init).group(group.as_str());
                if state.trainable[i] {
                    p
                } else {
                    p.frozen()
                }
            };
            let mut a = Attachment::new(m.layer.as_str())
                .param(param("down", &[m.rank, m.in_features], Init::kaiming_uniform(5f64.sqrt())))
                .param(param("up", &[m.out_features, m.rank], Init::zeros()));
            if !state.attached[i] {
                a = a.detached();
            }
            plan = plan.attach(a);
        }
        let count = |s: StageNo| modules.iter().filter(|m| m.stage == s).count();
        plan = plan
            .stage("stage1", 0, format!("LoRA r{} on {} UNet mid-block layer(s); text encoders frozen", c.stage1_rank, count(1)))
            .stage(
                "stage2",
                stages::start_of(c, 2),
                format!(
                    "+ LoRA r{} on the self-attention of the last {} layers of each text encoder ({} layers){}",
                    c.stage2_rank,
                    c.stage2_text_layers,
                    count(2),
                    if c.stage2_train_stage1 { "; stage 1 keeps training" } else { "; stage 1 frozen" }
                ),
            )
            .stage(
                "stage3",
                stages::start_of(c, 3),
                format!(
                    "stages 1+2 frozen as one composite; + LoRA r{} on {} UNet cross-attention layers at {}x lr",
                    c.stage3_rank,
                    count(3),
                    c.stage3_lr_scale
                ),
            );
        self.by_layer = modules.iter().enumerate().map(|(i, m)| (m.layer.clone(), i)).collect();
        self.modules = modules;
        Ok(plan)
    }

    fn forward<'o>(&self, ops: Ops<'o>, layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        let m = self.module(layer)?;
        let x = inputs.input()?; // [.., in]
        let lora = x.linear(ops.get_param("down"), None).linear(ops.get_param("up"), None);
        Ok(inputs.base_out()? + lora.scale(m.scale()))
    }

    fn delta_weight<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        let m = self.module(layer)?;
        Ok(Some(ops.get_param("up").matmul(ops.get_param("down")).scale(m.scale())))
    }

    fn export<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        // Every module, whatever the stage: one kohya / PEFT file for the whole composite. A
        // module of a stage not reached yet has `up` = 0 and changes nothing.
        let m = self.module(layer)?;
        Ok(Some(Export::Lora { down: ops.get_param("down"), up: ops.get_param("up"), alpha: m.alpha }))
    }

    fn on_step(&mut self, step: u64) -> Result<Vec<Directive>> {
        if self.modules.is_empty() {
            bail!("{ID}: on_step({step}) before plan: the host must plan the strategy first");
        }
        let target = stages::stage_of(&self.config, step);
        let to = stages::state_of(&self.config, target);
        let directives = if !self.synced {
            stages::directives(&self.modules, None, to)
        } else if target != self.stage {
            stages::directives(&self.modules, Some(stages::state_of(&self.config, self.stage)), to)
        } else {
            Vec::new()
        };
        self.stage = target;
        self.synced = true;
        self.last_step = Some(step);
        Ok(directives)
    }

    fn save_state(&self) -> Result<String> {
        let last = self.last_step.map_or("null".to_string(), |s| s.to_string());
        Ok(format!(r#"{{"stage": {}, "last_step": {last}}}"#, self.stage))
    }

    fn load_state(&mut self, state: &str) -> Result<()> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct State {
            stage: Option<usize>,
            last_step: Option<u64>,
        }
        let s: State = config::parse(&format!("{ID} state"), state)?;
        let stage = s.stage.unwrap_or(1);
        if !(1..=3).contains(&stage) {
            bail!("{ID}: saved state has stage {stage}; expected 1, 2 or 3");
        }
        self.stage = stage;
        self.last_step = s.last_step;
        // The host may have re-applied the plan or restored its own flags: resend everything.
        self.synced = false;
        Ok(())
    }
}

graft_sdk::export_strategy!(ProgressiveFusion);

#[cfg(test)]
mod tests;

#[cfg(test)]
mod conformance {
    /// Every key the parser accepts is in the schema, with a default it takes, and no other.
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::ProgressiveFusion>();
    }

    /// The host's conformance checks (`graft plugins check`) on this plugin.
    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }
}
