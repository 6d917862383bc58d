//! The hook dispatcher: which strategies are attached where, and the `Hooks` the models call.
//!
//! An [`AdapterSet`] holds the configured strategies of one model, their plans, the parameter
//! store and the host RNG. At a hook point with something attached it calls each strategy's
//! `forward` through the ops table and combines the results as `base + Σ m·(out − base)` (`m`
//! the strategy's weight for that component: A1111's `<lora:name:te:unet>`). A strategy that
//! fails (panic, error, wrong shape) is reported, detached everywhere, and the base output is
//! used: its parameters stay in the store.
//!
//! Unfrozen, folded and fused base weights are overrides pushed onto the registries' shared
//! weights ([`graft_sdxl::overrides`]), owned by this set (a strategy, or the set for a fuse):
//! `eject` and `unfuse` pop them, and dropping the set takes out whatever it still has there, so
//! a dropped set leaves the model's base weights exactly as it found them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use candle_core::{Tensor, Var};
use graft_abi as abi;
use graft_sdxl::hooks::{HookRegistry, Hooks, LayerIndex, LinearWeights, SharedLinear};
use graft_sdxl::overrides::{Holder, OverrideKind, Owner};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::{PipelineHooks, SdxlModel};

use crate::adapters::store::{InitKind, ParamKey, ParamStore, PlanDiff};
use crate::error::{Error, Result};
use crate::plugins::loader::LoadedPlugin;
use crate::plugins::strategy::{layer_to_abi, CallContext, ExportedLayer, PluginError, StrategyInstance};

/// A strategy's place in its [`AdapterSet`] (the order of [`AdapterSet::add`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StrategyId(usize);

impl StrategyId {
    pub fn index(self) -> usize {
        self.0
    }
}

impl std::ops::Index<StrategyId> for [ActiveStrategy] {
    type Output = ActiveStrategy;
    fn index(&self, s: StrategyId) -> &ActiveStrategy {
        &self[s.0]
    }
}

impl std::ops::IndexMut<StrategyId> for [ActiveStrategy] {
    fn index_mut(&mut self, s: StrategyId) -> &mut ActiveStrategy {
        &mut self[s.0]
    }
}

impl std::ops::Index<StrategyId> for Vec<ActiveStrategy> {
    type Output = ActiveStrategy;
    fn index(&self, s: StrategyId) -> &ActiveStrategy {
        &self[s.0]
    }
}

impl std::ops::IndexMut<StrategyId> for Vec<ActiveStrategy> {
    fn index_mut(&mut self, s: StrategyId) -> &mut ActiveStrategy {
        &mut self[s.0]
    }
}

/// A hook point's place among all of a model's hook points: UNet, text_encoder,
/// text_encoder_2, each in its registry's order (see [`AdapterSet::layer_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId(usize);

impl LayerId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// A strategy in use, with its plan and where it is attached.
pub struct ActiveStrategy {
    pub instance: StrategyInstance,
    pub plan: abi::Plan,
    /// Hook points it runs at now.
    attached: BTreeSet<LayerId>,
    /// Output weight on the text encoders and on the UNet.
    pub te_weight: f64,
    pub unet_weight: f64,
}

impl ActiveStrategy {
    pub fn name(&self) -> &str {
        self.instance.name()
    }
}

/// A base weight a plan made trainable (pushed onto the layer's stack), and the tensors below it.
pub struct UnfrozenBase {
    pub strategy: String,
    pub layer: String,
    pub weight: Var,
    pub bias: Option<Var>,
    pub lr: f64,
    pub weight_decay: f64,
    /// The weights it was made from (for the trained difference).
    original: LinearWeights,
}

/// What a directive asks of the optimizer (the rest the set applies itself).
#[derive(Debug, Clone, PartialEq)]
pub struct LrScale {
    pub strategy: String,
    pub group: String,
    pub scale: f64,
}

pub struct AdapterSet {
    /// The owner of every base weight override this set pushes.
    holder: Holder,
    store: ParamStore,
    rng: Mutex<GraftRng>,
    /// Every hook point of the model: UNet, text_encoder, text_encoder_2, in registry order.
    layers: Vec<abi::LayerInfo>,
    by_name: HashMap<String, LayerId>,
    /// Start of each component's indices in `layers`.
    offsets: [usize; 3],
    weights: Vec<Option<SharedLinear>>,
    strategies: Vec<ActiveStrategy>,
    /// For each hook point, the strategies attached there.
    table: Vec<Vec<StrategyId>>,
    /// Strategies detached because they failed, and the failures not yet taken by the caller.
    detached: Mutex<BTreeSet<StrategyId>>,
    failures: Mutex<Vec<PluginError>>,
    unfrozen: Vec<UnfrozenBase>,
    /// Fused hook points and the strategies fused there.
    fused: Vec<(LayerId, Vec<StrategyId>)>,
    training: bool,
    step: u64,
}

impl AdapterSet {
    /// An empty set over `model`'s hook points. `seed` seeds parameter inits and dropout.
    pub fn new(model: &SdxlModel, seed: u64) -> Self {
        let registries: [&HookRegistry; 3] = model.registries();
        let mut layers = Vec::new();
        let mut weights = Vec::new();
        let mut offsets = [0; 3];
        for (slot, reg) in registries.iter().enumerate() {
            offsets[slot] = layers.len();
            for (i, info) in reg.layers().iter().enumerate() {
                layers.push(layer_to_abi(info));
                weights.push(reg.linear_weights(i).cloned());
            }
        }
        let by_name = layers.iter().enumerate().map(|(i, l)| (l.name().to_string(), LayerId(i))).collect();
        let n = layers.len();
        Self {
            holder: Holder::new("adapter set"),
            store: ParamStore::new(&model.device, candle_core::DType::F32, seed),
            rng: Mutex::new(GraftRng::new(seed ^ 0x5eed_d15b_a7c4_0000)),
            layers,
            by_name,
            offsets,
            weights,
            strategies: Vec::new(),
            table: vec![Vec::new(); n],
            detached: Mutex::default(),
            failures: Mutex::default(),
            unfrozen: Vec::new(),
            fused: Vec::new(),
            training: false,
            step: 0,
        }
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    pub fn layers(&self) -> &[abi::LayerInfo] {
        &self.layers
    }

    pub fn strategies(&self) -> &[ActiveStrategy] {
        &self.strategies
    }

    pub fn strategies_mut(&mut self) -> &mut [ActiveStrategy] {
        &mut self.strategies
    }

    pub fn unfrozen(&self) -> &[UnfrozenBase] {
        &self.unfrozen
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// The dispatcher's RNG (dropout), for checkpoints.
    pub fn rng_state(&self) -> graft_sdxl::rng::RngState {
        self.rng.lock().expect("rng lock").state()
    }

    pub fn set_rng_state(&self, state: graft_sdxl::rng::RngState) {
        *self.rng.lock().expect("rng lock") = GraftRng::from_state(state);
    }

    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The id of the hook point named `layer`.
    pub fn layer_id(&self, layer: &str) -> Result<LayerId> {
        self.by_name.get(layer).copied().ok_or_else(|| Error::NoLayer(layer.to_string()))
    }

    /// The hook point `g`.
    pub fn layer(&self, g: LayerId) -> &abi::LayerInfo {
        &self.layers[g.0]
    }

    /// The strategies attached at `g` now.
    fn row(&mut self, g: LayerId) -> &mut Vec<StrategyId> {
        &mut self.table[g.0]
    }

    /// The shared base weights of `g`, when it is a linear or conv hook point.
    fn linear(&self, g: LayerId) -> Result<&SharedLinear> {
        self.weights[g.0].as_ref().ok_or_else(|| Error::NotLinear(self.layers[g.0].name().to_string()))
    }

    /// Plans `instance` over the model's hook points, creates or reuses its parameters, unfreezes
    /// the base weights it asks for, and attaches it where the plan says. Returns the index of the
    /// strategy and what the store did.
    pub fn add(&mut self, mut instance: StrategyInstance, te_weight: f64, unet_weight: f64) -> Result<(StrategyId, PlanDiff)> {
        if self.strategies.iter().any(|s| s.name() == instance.name()) {
            return Err(Error::DuplicateStrategy(instance.name().to_string()));
        }
        let plan = instance.plan(&self.layers)?;
        let diff = self.store.apply_plan(instance.name(), &plan)?;
        let fresh: Vec<ParamKey> = diff.created.iter().chain(diff.reshaped.iter().map(|(k, _, _)| k)).cloned().collect();
        self.init_from_layer(&instance, &fresh)?;
        let s = StrategyId(self.strategies.len());
        let mut attached = BTreeSet::new();
        for att in plan.attachments.iter().filter(|a| a.attached) {
            attached.insert(self.layer_id(&att.layer)?);
        }
        for &g in &attached {
            self.row(g).push(s);
        }
        let unfreeze: Vec<abi::BaseUnfreeze> = plan.unfreeze.iter().cloned().collect();
        self.strategies.push(ActiveStrategy { instance, plan, attached, te_weight, unet_weight });
        for u in unfreeze {
            self.unfreeze_base(s, &u)?;
        }
        Ok((s, diff))
    }

    /// The owner of strategy `s`'s overrides of `kind`.
    fn owner(&self, s: StrategyId, kind: OverrideKind) -> Owner {
        self.holder.owner(Some((s.0, self.strategies[s].name())), kind)
    }

    /// Pushes a trainable f32 copy of `u.layer`'s weights (and bias) for strategy `s`.
    fn unfreeze_base(&mut self, s: StrategyId, u: &abi::BaseUnfreeze) -> Result<()> {
        let g = self.layer_id(&u.layer)?;
        if self.unfrozen.iter().any(|b| b.layer == u.layer.to_string()) {
            return Err(Error::Strategy {
                strategy: self.strategies[s].name().to_string(),
                layer: Some(u.layer.to_string()),
                problem: format!("base weight of `{}` is unfrozen twice", u.layer),
            });
        }
        let shared = self.linear(g)?;
        let original = shared.current();
        // f32 master weight, whatever precision the base is kept in (a copy: the optimizer
        // updates it in place, the tensor below stays as it is).
        let weight = Var::from_tensor(&original.weight_f32()?)?;
        let bias = match (&original.bias, u.bias) {
            (Some(b), true) => Some(Var::from_tensor(b)?),
            _ => None,
        };
        let mut w = original.clone();
        w.weight = weight.as_tensor().clone();
        if let Some(b) = &bias {
            w.bias = Some(b.as_tensor().clone());
        }
        shared.push(self.owner(s, OverrideKind::Unfreeze), w)?;
        self.unfrozen.push(UnfrozenBase {
            strategy: self.strategies[s].name().to_string(),
            layer: u.layer.to_string(),
            weight,
            bias,
            lr: u.lr,
            weight_decay: u.weight_decay,
            original,
        });
        Ok(())
    }

    /// The trained difference (weight - loaded weight, bias difference) of each base weight
    /// strategy `s` unfroze: what a LyCORIS `diff` file holds.
    pub fn base_diffs(&self, s: StrategyId) -> Result<Vec<(String, Tensor, Option<Tensor>)>> {
        let name = self.strategies[s].name();
        let mut out = Vec::new();
        for b in self.unfrozen.iter().filter(|b| b.strategy == name) {
            let diff = (b.weight.as_tensor() - b.original.weight_f32()?)?.detach();
            let diff_b = match (&b.bias, &b.original.bias) {
                (Some(v), Some(o)) => Some((v.as_tensor() - o)?.detach()),
                _ => None,
            };
            out.push((b.layer.clone(), diff, diff_b));
        }
        Ok(out)
    }

    /// Applies `on_step` directives of strategy `s`; returns the learning-rate scales for the
    /// optimizer.
    pub fn apply_directives(&mut self, s: StrategyId, directives: &[abi::StageDirective]) -> Result<Vec<LrScale>> {
        use abi::DirectiveKind as K;
        let name = self.strategies[s].name().to_string();
        let mut scales = Vec::new();
        for d in directives {
            let param = (!d.param.is_empty()).then_some(d.param.as_str());
            match d.kind {
                K::ATTACH => {
                    let g = self.layer_id(&d.layer)?;
                    if self.strategies[s].attached.insert(g) {
                        self.row(g).push(s);
                    }
                }
                K::DETACH => {
                    let g = self.layer_id(&d.layer)?;
                    self.strategies[s].attached.remove(&g);
                    self.row(g).retain(|&x| x != s);
                }
                K::FREEZE | K::UNFREEZE => {
                    self.store.set_trainable(&name, &d.layer, param, d.kind == K::UNFREEZE);
                }
                K::RESET => {
                    let keys = self.store.reset(&name, &d.layer, param)?;
                    self.init_from_layer(&self.strategies[s].instance, &keys)?;
                }
                K::FOLD_INTO_BASE => {
                    let g = self.layer_id(&d.layer)?;
                    let delta = self.delta(s, g)?.ok_or_else(|| Error::Strategy {
                        strategy: name.clone(),
                        layer: Some(d.layer.to_string()),
                        problem: format!("strategy `{name}` asked to fold `{}` into the base weight, but it has no delta weight there", d.layer),
                    })?;
                    let shared = self.linear(g)?;
                    // One fold entry per strategy and hook point: a second fold replaces it.
                    let owner = self.owner(s, OverrideKind::Fold);
                    let mut w = shared.current();
                    w.weight = w.plus(&delta.detach())?;
                    if shared.top_owner().as_ref() == Some(&owner) {
                        shared.pop(&owner)?;
                    }
                    shared.push(owner, w)?;
                    self.strategies[s].attached.remove(&g);
                    self.row(g).retain(|&x| x != s);
                }
                K::LR_SCALE => scales.push(LrScale { strategy: name.clone(), group: d.group.to_string(), scale: d.value }),
                other => {
                    return Err(Error::Strategy {
                        strategy: name.clone(),
                        layer: (!d.layer.is_empty()).then(|| d.layer.to_string()),
                        problem: format!("strategy `{name}` sent directive `{other}`, which this host does not know"),
                    })
                }
            }
        }
        Ok(scales)
    }

    /// Fills in the parameters among `keys` that start from the layer (`from_layer` init): the
    /// strategy's `init_param` computes each from the layer's current base weight and bias.
    fn init_from_layer(&self, instance: &StrategyInstance, keys: &[ParamKey]) -> Result<()> {
        for key in keys {
            let Some(p) = self.store.get(key).filter(|p| p.init == InitKind::FromLayer) else { continue };
            let g = self.layer_id(&key.layer)?;
            let base = self.base(g);
            let value = {
                let mut rng = self.rng.lock().expect("rng lock");
                let mut cx = self.cx(&mut rng);
                instance.init_param(&mut cx, self.layer(g), base.as_ref(), &key.name, &p.dims())?
            };
            self.store.set(key, &value).map_err(|e| Error::SetParam { key: key.clone(), cause: Box::new(e) })?;
        }
        Ok(())
    }

    /// Takes strategy `s` out of the model (refiners' eject): detached from every hook point,
    /// the base weights it unfroze or folded into popped off their stacks, so the model computes
    /// exactly what it did before [`AdapterSet::add`]. Its parameters stay in the store. Unfuse
    /// first; refused (changing nothing) when another owner's override is on top of one of its.
    pub fn eject(&mut self, s: StrategyId) -> Result<()> {
        let name = self.strategies[s].name().to_string();
        if !self.fused.is_empty() {
            return Err(Error::EjectFused(name));
        }
        let id = self.holder.id();
        let mine = |o: &Owner| o.holder() == id && o.part() == Some(s.0);
        let refused = |cause| Error::Eject { strategy: name.clone(), cause: Box::new(cause) };
        for shared in self.weights.iter().flatten() {
            shared.check_pop_all(mine).map_err(refused)?;
        }
        for shared in self.weights.iter().flatten() {
            shared.pop_all(mine).map_err(refused)?;
        }
        for row in &mut self.table {
            row.retain(|&x| x != s);
        }
        self.strategies[s].attached.clear();
        self.unfrozen.retain(|b| b.strategy != name);
        Ok(())
    }

    /// Asks every strategy for its directives at `step` and applies them. A strategy whose
    /// `on_step` fails is detached and reported, as in `forward`.
    pub fn on_step(&mut self, step: u64) -> Result<Vec<LrScale>> {
        self.step = step;
        let mut scales = Vec::new();
        for s in (0..self.strategies.len()).map(StrategyId) {
            if self.failed(s) {
                continue;
            }
            let directives = match self.strategies[s].instance.on_step(step) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(s, e);
                    continue;
                }
            };
            scales.extend(self.apply_directives(s, &directives)?);
        }
        Ok(scales)
    }

    fn failed(&self, s: StrategyId) -> bool {
        self.detached.lock().expect("detached lock").contains(&s)
    }

    /// True when some strategy is attached at a hook point whose info satisfies `pred`.
    pub fn any_attached(&self, pred: impl Fn(&abi::LayerInfo) -> bool) -> bool {
        self.table.iter().zip(&self.layers).any(|(row, info)| !row.is_empty() && pred(info))
    }

    /// Failures since the last call (each strategy stays detached until it is reloaded).
    pub fn take_failures(&self) -> Vec<PluginError> {
        std::mem::take(&mut *self.failures.lock().expect("failures lock"))
    }

    /// Strategies currently detached because they failed.
    pub fn failed_strategies(&self) -> Vec<String> {
        self.detached.lock().expect("detached lock").iter().map(|&s| self.strategies[s].name().to_string()).collect()
    }

    fn fail(&self, s: StrategyId, e: PluginError) {
        if self.detached.lock().expect("detached lock").insert(s) {
            tracing::error!("{e}; strategy `{}` is detached, its parameters are kept", self.strategies[s].name());
            self.failures.lock().expect("failures lock").push(e);
        }
    }

    /// The base weight and bias of hook point `g` now (none for an attention module).
    fn base(&self, g: LayerId) -> Option<LinearWeights> {
        self.weights[g.0].as_ref().map(|w| w.current())
    }

    fn cx<'a>(&'a self, rng: &'a mut GraftRng) -> CallContext<'a> {
        CallContext { store: &self.store, rng, training: self.training, step: self.step }
    }

    /// The delta weight of strategy `s` at hook point `g`, if it has one.
    pub fn delta(&self, s: StrategyId, g: LayerId) -> Result<Option<Tensor>> {
        let w = self.base(g);
        let mut rng = self.rng.lock().expect("rng lock");
        let mut cx = self.cx(&mut rng);
        Ok(self.strategies[s].instance.delta_weight(&mut cx, self.layer(g), w.as_ref())?)
    }

    fn weight_of(&self, s: StrategyId, g: LayerId) -> f64 {
        let st = &self.strategies[s];
        if g.0 < self.offsets[1] {
            st.unet_weight
        } else {
            st.te_weight
        }
    }

    /// Folds every attached adapter that has a delta weight into the base weights (for sampling
    /// at the base model's speed). Returns how many hook points were fused; adapters without a
    /// delta weight stay unfused. [`AdapterSet::unfuse`] pops them: the base weights are exactly
    /// what they were.
    pub fn fuse(&mut self) -> Result<usize> {
        for g in (0..self.layers.len()).map(LayerId) {
            if self.table[g.0].is_empty() || self.weights[g.0].is_none() {
                continue;
            }
            let mut total: Option<Tensor> = None;
            let mut fused_here = Vec::new();
            for &s in &self.table[g.0] {
                if let Some(d) = self.delta(s, g)? {
                    let d = (d.detach() * self.weight_of(s, g))?;
                    total = Some(match total {
                        Some(t) => (t + d)?,
                        None => d,
                    });
                    fused_here.push(s);
                }
            }
            let Some(total) = total else { continue };
            let shared = self.linear(g)?;
            let mut w = shared.current();
            w.weight = w.plus(&total)?;
            shared.push(self.holder.owner(None, OverrideKind::Fuse), w)?;
            self.row(g).retain(|s| !fused_here.contains(s));
            self.fused.push((g, fused_here));
        }
        Ok(self.fused.len())
    }

    /// Pops what [`AdapterSet::fuse`] pushed and re-attaches the adapters. A hook point where
    /// another owner's override is on top of the fuse stays fused (an error is logged, naming
    /// both); dropping the set takes it out.
    pub fn unfuse(&mut self) {
        let owner = self.holder.owner(None, OverrideKind::Fuse);
        let mut kept = Vec::new();
        for (g, strategies) in self.fused.drain(..).rev() {
            match self.weights[g.0].as_ref().expect("linear").pop(&owner) {
                Ok(_) => self.table[g.0].extend(strategies),
                Err(e) => {
                    tracing::error!("unfuse: {e}");
                    kept.push((g, strategies));
                }
            }
        }
        kept.reverse();
        self.fused = kept;
    }

    /// What strategy `s` exports, layer by layer.
    pub fn export(&self, s: StrategyId) -> Result<Vec<(String, ExportedLayer)>> {
        let st = &self.strategies[s];
        let mut out = Vec::new();
        for att in st.plan.attachments.iter() {
            let g = self.layer_id(&att.layer)?;
            let w = self.base(g);
            let mut rng = self.rng.lock().expect("rng lock");
            let mut cx = self.cx(&mut rng);
            if let Some(e) = st.instance.export(&mut cx, self.layer(g), w.as_ref())? {
                out.push((att.layer.to_string(), e));
            }
        }
        Ok(out)
    }

    /// Switches strategy `s` to a new build of its plugin (between steps or requests): keeps the
    /// parameters whose names and shapes still match, re-attaches from the new plan, and clears
    /// a failure. On error the old build keeps running.
    pub fn reload(&mut self, s: StrategyId, plugin: &LoadedPlugin) -> Result<PlanDiff> {
        let (plan, diff) = self.strategies[s].instance.reload(plugin, &self.layers, &self.store)?;
        let fresh: Vec<ParamKey> = diff.created.iter().chain(diff.reshaped.iter().map(|(k, _, _)| k)).cloned().collect();
        self.init_from_layer(&self.strategies[s].instance, &fresh)?;
        let mut attached = BTreeSet::new();
        for att in plan.attachments.iter().filter(|a| a.attached) {
            attached.insert(self.layer_id(&att.layer)?);
        }
        for row in &mut self.table {
            row.retain(|&x| x != s);
        }
        for &g in &attached {
            self.row(g).push(s);
        }
        self.strategies[s].attached = attached;
        self.strategies[s].plan = plan;
        self.detached.lock().expect("detached lock").remove(&s);
        Ok(diff)
    }

    /// The hooks of each component, for a pipeline call.
    pub fn hooks(&self) -> SetHooks<'_> {
        SetHooks {
            unet: ComponentHooks { set: self, offset: self.offsets[0] },
            te1: ComponentHooks { set: self, offset: self.offsets[1] },
            te2: ComponentHooks { set: self, offset: self.offsets[2] },
        }
    }

    fn dispatch(
        &self,
        g: LayerId,
        base: Tensor,
        run: impl Fn(&StrategyInstance, &mut CallContext<'_>) -> std::result::Result<Tensor, PluginError>,
    ) -> candle_core::Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        let mut single: Option<Tensor> = None;
        let active: Vec<StrategyId> = self.table[g.0].iter().copied().filter(|&s| !self.failed(s)).collect();
        for &s in &active {
            let result = {
                let mut rng = self.rng.lock().expect("rng lock");
                let mut cx = self.cx(&mut rng);
                run(&self.strategies[s].instance, &mut cx)
            };
            match result {
                Ok(out) => {
                    let m = self.weight_of(s, g);
                    if active.len() == 1 && m == 1.0 {
                        single = Some(out);
                    } else {
                        let d = ((out - &base)? * m)?;
                        acc = Some(match acc {
                            Some(a) => (a + d)?,
                            None => d,
                        });
                    }
                }
                Err(e) => self.fail(s, e),
            }
        }
        match (single, acc) {
            (Some(out), _) => Ok(out),
            (None, Some(d)) => base + d,
            (None, None) => Ok(base),
        }
    }
}

/// A set that goes away takes its overrides with it: the base weights are what they were
/// before it pushed anything (a trainer dropped mid-run included).
impl Drop for AdapterSet {
    fn drop(&mut self) {
        let n: usize = self.weights.iter().flatten().map(|w| w.drop_holder(self.holder.id())).sum();
        if n > 0 {
            tracing::debug!("{}: {n} base weight overrides taken out", self.holder.name());
        }
    }
}

/// The `Hooks` of one component.
pub struct ComponentHooks<'a> {
    set: &'a AdapterSet,
    offset: usize,
}

impl ComponentHooks<'_> {
    fn id(&self, layer: LayerIndex) -> LayerId {
        LayerId(self.offset + layer)
    }
}

impl Hooks for ComponentHooks<'_> {
    fn attached(&self, layer: LayerIndex) -> bool {
        !self.set.table[self.id(layer).0].is_empty()
    }

    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> candle_core::Result<Tensor> {
        let g = self.id(layer);
        let w = self.set.base(g);
        let info = self.set.layer(g);
        let dtype = base_out.dtype();
        let (input, base_out) = (f32(input)?, f32(&base_out)?);
        self.set.dispatch(g, base_out.clone(), |inst, cx| inst.forward_linear(cx, info, w.as_ref(), &input, &base_out))?.to_dtype(dtype)
    }

    /// `base_out + conv(x, Σ m·ΔW)`: each attached strategy's kernel difference (its
    /// `delta_weight`) at its weight, in one extra convolution with the layer's stride, the same
    /// math as convolving with `W + Σ m·ΔW`. Gradients reach the adapters through the kernel.
    fn conv(&self, layer: LayerIndex, input: &Tensor, padding: usize, base_out: Tensor) -> candle_core::Result<Tensor> {
        let g = self.id(layer);
        let set = self.set;
        let info = set.layer(g);
        let stride = info.conv().map_or(1, |c| c.stride as usize);
        let w = set.base(g);
        let mut total: Option<Tensor> = None;
        for s in set.table[g.0].iter().copied().filter(|&s| !set.failed(s)) {
            let delta = {
                let mut rng = set.rng.lock().expect("rng lock");
                let mut cx = set.cx(&mut rng);
                set.strategies[s].instance.conv_delta(&mut cx, info, w.as_ref())
            };
            match delta {
                Ok(d) => {
                    let d = (d * set.weight_of(s, g))?;
                    total = Some(match total {
                        Some(t) => (t + d)?,
                        None => d,
                    });
                }
                Err(e) => set.fail(s, e),
            }
        }
        let Some(delta) = total else { return Ok(base_out) };
        let dtype = base_out.dtype();
        let extra = f32(input)?.conv2d(&delta, padding, stride, 1, 1)?;
        (f32(&base_out)? + extra)?.to_dtype(dtype)
    }

    fn attention(&self, layer: LayerIndex, hidden: &Tensor, context: Option<&Tensor>, out: Tensor) -> candle_core::Result<Tensor> {
        let g = self.id(layer);
        let info = self.set.layer(g);
        let dtype = out.dtype();
        let (hidden, context, out) = (f32(hidden)?, context.map(f32).transpose()?, f32(&out)?);
        self.set.dispatch(g, out.clone(), |inst, cx| inst.forward_attention(cx, info, &hidden, context.as_ref(), &out))?.to_dtype(dtype)
    }

    fn random_state(&self) -> Option<graft_sdxl::rng::RngState> {
        Some(self.set.rng_state())
    }

    fn set_random_state(&self, state: graft_sdxl::rng::RngState) {
        self.set.set_rng_state(state)
    }
}

/// Adapters compute in f32, as their parameters are (PEFT does the same): bf16 activations
/// (on a GPU) are widened on the way in, the result narrowed on the way out.
fn f32(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(candle_core::DType::F32)
}

/// The three components' hooks; [`SetHooks::pipeline`] hands them to the pipeline.
pub struct SetHooks<'a> {
    pub unet: ComponentHooks<'a>,
    pub te1: ComponentHooks<'a>,
    pub te2: ComponentHooks<'a>,
}

impl SetHooks<'_> {
    pub fn pipeline(&self) -> PipelineHooks<'_> {
        PipelineHooks { unet: &self.unet, text_encoder: &self.te1, text_encoder_2: &self.te2 }
    }
}
