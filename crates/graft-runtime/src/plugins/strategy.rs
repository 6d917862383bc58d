//! Calling a strategy plugin from the host: [`StrategyInstance`] wraps the ABI object with the
//! conversions, the result checks (shape of a forward output, of a delta weight) and errors that
//! name the strategy, the entry point and the layer.

use std::fmt;

use abi_stable::std_types::{RNone, ROption, RResult, RSome, RStr};
use candle_core::Tensor;
use graft_abi as abi;
use graft_abi::{ErrorKind, GResult, StrategyBox};
use graft_sdxl::hooks;
use graft_sdxl::hooks::LinearWeights;
use graft_sdxl::rng::GraftRng;

use super::loader::{LoadedPlugin, PluginManifest};
use crate::adapters::ops::CandleOps;
use crate::adapters::store::{ParamStore, PlanDiff};

/// The ABI form of a host hook point.
pub fn layer_to_abi(l: &hooks::LayerInfo) -> abi::LayerInfo {
    let component = match l.component {
        hooks::Component::Unet => abi::Component::UNET,
        hooks::Component::TextEncoder => abi::Component::TEXT_ENCODER,
        hooks::Component::TextEncoder2 => abi::Component::TEXT_ENCODER_2,
    };
    let kind = match l.kind {
        hooks::LayerKind::Linear => abi::LayerKind::LINEAR,
        hooks::LayerKind::Attention => abi::LayerKind::ATTENTION,
        hooks::LayerKind::Conv => abi::LayerKind::CONV,
    };
    let extra = match l.conv {
        Some(c) => {
            abi::ConvGeometry { kernel: [c.kernel.0 as u64, c.kernel.1 as u64], stride: c.stride as u64, padding: c.padding as u64 }.to_json()
        }
        None => String::new(),
    };
    let block = match l.block {
        hooks::BlockPosition::Down(i) => abi::BlockPosition { kind: abi::BlockKind::DOWN, index: i as u32 },
        hooks::BlockPosition::Mid => abi::BlockPosition { kind: abi::BlockKind::MID, index: 0 },
        hooks::BlockPosition::Up(i) => abi::BlockPosition { kind: abi::BlockKind::UP, index: i as u32 },
        hooks::BlockPosition::TextLayer(i) => abi::BlockPosition { kind: abi::BlockKind::TEXT_LAYER, index: i as u32 },
    };
    let attention = match l.attention {
        None => abi::AttentionKind::NONE,
        Some(hooks::AttentionKind::SelfAttention) => abi::AttentionKind::SELF_ATTENTION,
        Some(hooks::AttentionKind::CrossAttention) => abi::AttentionKind::CROSS_ATTENTION,
    };
    abi::LayerInfo {
        name: l.name.as_str().into(),
        kind,
        component,
        in_features: l.in_features as u64,
        out_features: l.out_features as u64,
        block,
        attention,
        extra: extra.into(),
    }
}

pub fn layers_to_abi(layers: &[hooks::LayerInfo]) -> Vec<abi::LayerInfo> {
    layers.iter().map(layer_to_abi).collect()
}

/// A failure inside (or reported by) a plugin entry point.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginError {
    /// The strategy instance (its parameters' key).
    pub strategy: String,
    /// `id version` of the plugin build.
    pub plugin: String,
    /// The entry point: `new_strategy`, `plan`, `forward`, ...
    pub entry: &'static str,
    pub layer: Option<String>,
    pub kind: ErrorKind,
    pub message: String,
}

impl PluginError {
    /// The plugin panicked (the SDK caught it).
    pub fn is_panic(&self) -> bool {
        self.kind == ErrorKind::PANIC
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "strategy `{}` (plugin {}) failed in {}", self.strategy, self.plugin, self.entry)?;
        if let Some(layer) = &self.layer {
            write!(f, " at layer `{layer}`")?;
        }
        match self.kind {
            ErrorKind::OTHER | ErrorKind::PANIC => write!(f, ": {}", self.message),
            k => write!(f, ": {k} error: {}", self.message),
        }
    }
}

impl std::error::Error for PluginError {}

/// What a step of a call needs from the host: the parameter store, the RNG for dropout, the
/// mode and the step.
pub struct CallContext<'a> {
    pub store: &'a ParamStore,
    pub rng: &'a mut GraftRng,
    pub training: bool,
    pub step: u64,
}

/// One layer's export, as candle tensors (see `graft_abi::ExportForm` for the families).
#[derive(Debug, Clone)]
pub struct ExportedLayer {
    pub family: String,
    pub tensors: Vec<(String, Tensor)>,
    pub alpha: Option<f64>,
}

/// A configured strategy: one plugin's strategy object for one run.
pub struct StrategyInstance {
    name: String,
    config: String,
    manifest: PluginManifest,
    generation: u64,
    obj: StrategyBox,
    ops_ext: Option<&'static abi::OpsExtensionV1>,
}

impl fmt::Debug for StrategyInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StrategyInstance")
            .field("name", &self.name)
            .field("plugin", &self.manifest.id)
            .field("version", &self.manifest.version)
            .field("generation", &self.generation)
            .finish()
    }
}

impl StrategyInstance {
    /// Creates the strategy object of `plugin` with `config` (JSON; empty means `{}`). `name`
    /// keys its parameters in the store; by default the plugin id.
    pub fn new(plugin: &LoadedPlugin, name: Option<&str>, config: &str) -> Result<Self, PluginError> {
        let name = name.unwrap_or(&plugin.manifest.id).to_string();
        let config = if config.trim().is_empty() { "{}".to_string() } else { config.to_string() };
        // Checked against the plugin's schema first: the error names the key, whatever the
        // plugin's own parser would have said (or let through).
        if let Some(schema) = &plugin.config_schema {
            schema.validate_json(&config).map_err(|message| PluginError {
                strategy: name.clone(),
                plugin: plugin.label(),
                entry: "new_strategy",
                layer: None,
                kind: ErrorKind::CONFIG,
                message: format!("invalid configuration for strategy `{}` (by its config schema): {message}", plugin.manifest.id),
            })?;
        }
        let obj = plugin.new_strategy(&config).map_err(|e| PluginError {
            strategy: name.clone(),
            plugin: plugin.label(),
            entry: "new_strategy",
            layer: None,
            kind: e.kind,
            message: e.message.to_string(),
        })?;
        Ok(Self { name, config, manifest: plugin.manifest.clone(), generation: plugin.generation, obj, ops_ext: plugin.ops_ext })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &str {
        &self.config
    }

    /// The manifest of the build in use.
    pub fn manifest(&self) -> &PluginManifest {
        &self.manifest
    }

    /// Which load of the plugin is in use (grows with each hot reload).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn label(&self) -> String {
        format!("{} {}", self.manifest.id, self.manifest.version)
    }

    fn fail(&self, entry: &'static str, layer: Option<&str>, kind: ErrorKind, message: impl Into<String>) -> PluginError {
        PluginError { strategy: self.name.clone(), plugin: self.label(), entry, layer: layer.map(str::to_string), kind, message: message.into() }
    }

    fn check<T>(&self, entry: &'static str, layer: Option<&str>, r: GResult<T>) -> Result<T, PluginError> {
        match r {
            RResult::ROk(v) => Ok(v),
            RResult::RErr(e) => Err(self.fail(entry, layer, e.kind, e.message.as_str())),
        }
    }

    /// The strategy's plan over `layers`, checked against them (see [`check_plan`]).
    pub fn plan(&mut self, layers: &[abi::LayerInfo]) -> Result<abi::Plan, PluginError> {
        let r = self.obj.plan(layers.into(), RStr::from(self.config.as_str()));
        let plan = self.check("plan", None, r)?;
        check_plan(&plan, layers).map_err(|m| self.fail("plan", None, ErrorKind::OTHER, m))?;
        Ok(plan)
    }

    /// Runs `forward` at a linear hook point; the result must have `base_out`'s shape.
    pub fn forward_linear(
        &self,
        cx: &mut CallContext<'_>,
        layer: &abi::LayerInfo,
        base: Option<&LinearWeights>,
        input: &Tensor,
        base_out: &Tensor,
    ) -> Result<Tensor, PluginError> {
        let mut ops = CandleOps::new(cx.store, cx.rng, &self.name, layer.name(), base.cloned(), cx.training);
        let inputs = abi::ForwardInputs {
            input: RSome(ops.insert(input.clone())),
            base_out: RSome(ops.insert(base_out.clone())),
            hidden: RNone,
            context: RNone,
            out: RNone,
            training: cx.training,
            step: cx.step,
        };
        let r = ops.call(|abi| self.obj.forward(abi, layer, &inputs));
        self.finish_forward(&ops, layer, r, base_out)
    }

    /// Runs `forward` at an attention hook point; the result must have `out`'s shape.
    pub fn forward_attention(
        &self,
        cx: &mut CallContext<'_>,
        layer: &abi::LayerInfo,
        hidden: &Tensor,
        context: Option<&Tensor>,
        out: &Tensor,
    ) -> Result<Tensor, PluginError> {
        let mut ops = CandleOps::new(cx.store, cx.rng, &self.name, layer.name(), None, cx.training);
        let inputs = abi::ForwardInputs {
            input: RNone,
            base_out: RNone,
            hidden: RSome(ops.insert(hidden.clone())),
            context: match context {
                Some(c) => RSome(ops.insert(c.clone())),
                None => RNone,
            },
            out: RSome(ops.insert(out.clone())),
            training: cx.training,
            step: cx.step,
        };
        let r = ops.call(|abi| self.obj.forward(abi, layer, &inputs));
        self.finish_forward(&ops, layer, r, out)
    }

    fn finish_forward(
        &self,
        ops: &CandleOps<'_>,
        layer: &abi::LayerInfo,
        r: GResult<abi::TensorId>,
        expected: &Tensor,
    ) -> Result<Tensor, PluginError> {
        let name = Some(layer.name());
        let id = self.check("forward", name, r)?;
        let t = ops.tensor(id).map_err(|e| self.fail("forward", name, ErrorKind::OP, format!("returned {}", e.message)))?;
        if t.dims() != expected.dims() {
            return Err(self.fail(
                "forward",
                name,
                ErrorKind::OP,
                format!("returned a tensor of shape {:?}, the hook point's output has shape {:?}", t.dims(), expected.dims()),
            ));
        }
        if t.dtype() != expected.dtype() {
            return t.to_dtype(expected.dtype()).map_err(|e| self.fail("forward", name, ErrorKind::OP, e.to_string()));
        }
        Ok(t)
    }

    /// The layer's adapter as a weight difference of the base weight's shape ([out, in], or
    /// [out, in, kh, kw] at a conv hook point), when the strategy has one.
    pub fn delta_weight(
        &self,
        cx: &mut CallContext<'_>,
        layer: &abi::LayerInfo,
        base: Option<&LinearWeights>,
    ) -> Result<Option<Tensor>, PluginError> {
        let name = Some(layer.name());
        let mut ops = CandleOps::new(cx.store, cx.rng, &self.name, layer.name(), base.cloned(), false);
        let r = ops.call(|abi| self.obj.delta_weight(abi, layer));
        let Some(id) = self.check("delta_weight", name, r)?.into_option() else {
            return Ok(None);
        };
        let t = ops.tensor(id).map_err(|e| self.fail("delta_weight", name, ErrorKind::OP, format!("returned {}", e.message)))?;
        let want: Vec<usize> = match layer.weight_shape() {
            Some(s) => s.iter().map(|&d| d as usize).collect(),
            None => vec![layer.out_features as usize, layer.in_features as usize],
        };
        if t.dims() != want.as_slice() {
            let what = if layer.is_conv() { "[out, in, kh, kw]" } else { "[out, in]" };
            return Err(self.fail(
                "delta_weight",
                name,
                ErrorKind::OP,
                format!("returned a tensor of shape {:?}, expected {what} = {want:?}", t.dims()),
            ));
        }
        Ok(Some(t))
    }

    /// The kernel difference [out, in, kh, kw] at a conv hook point: conv hook points run
    /// through `delta_weight` (the host convolves), so a strategy without one there fails.
    pub fn conv_delta(&self, cx: &mut CallContext<'_>, layer: &abi::LayerInfo, base: Option<&LinearWeights>) -> Result<Tensor, PluginError> {
        self.delta_weight(cx, layer, base)?.ok_or_else(|| {
            self.fail(
                "delta_weight",
                Some(layer.name()),
                ErrorKind::UNSUPPORTED,
                "returned none at a conv hook point (the host applies conv adapters as kernel differences: delta_weight must give one)",
            )
        })
    }

    /// What the strategy saves for one layer.
    pub fn export(
        &self,
        cx: &mut CallContext<'_>,
        layer: &abi::LayerInfo,
        base: Option<&LinearWeights>,
    ) -> Result<Option<ExportedLayer>, PluginError> {
        let name = Some(layer.name());
        let mut ops = CandleOps::new(cx.store, cx.rng, &self.name, layer.name(), base.cloned(), false);
        let r = ops.call(|abi| self.obj.export(abi, layer));
        let Some(form) = self.check("export", name, r)?.into_option() else {
            return Ok(None);
        };
        let mut tensors = Vec::new();
        for nt in form.tensors.iter() {
            let t =
                ops.tensor(nt.tensor).map_err(|e| self.fail("export", name, ErrorKind::OP, format!("tensor `{}`: {}", nt.name, e.message)))?;
            tensors.push((nt.name.to_string(), t.detach()));
        }
        let has = |n: &str| tensors.iter().any(|(k, _)| k == n);
        let missing = match form.family.as_str() {
            "lora" if !(has("down") && has("up")) => Some("the `lora` family needs tensors `down` and `up`"),
            "diff" if !has("diff") => Some("the `diff` family needs a tensor `diff`"),
            _ => None,
        };
        if let Some(m) = missing {
            return Err(self.fail("export", name, ErrorKind::OTHER, m));
        }
        Ok(Some(ExportedLayer { family: form.family.to_string(), tensors, alpha: form.alpha.into_option() }))
    }

    /// The initial value of parameter `param` of `layer` (declared `from_layer`): what the
    /// strategy's `init_param` computes, detached, with the shape `shape`.
    pub fn init_param(
        &self,
        cx: &mut CallContext<'_>,
        layer: &abi::LayerInfo,
        base: Option<&LinearWeights>,
        param: &str,
        shape: &[usize],
    ) -> Result<Tensor, PluginError> {
        let name = Some(layer.name());
        let mut ops = CandleOps::new(cx.store, cx.rng, &self.name, layer.name(), base.cloned(), false);
        let Some(ext) = self.ops_ext else {
            return Err(self.fail(
                "init_param",
                name,
                ErrorKind::UNSUPPORTED,
                format!("`{param}` is declared from_layer, but this build of the plugin has no init_param (rebuild it with a newer graft-sdk)"),
            ));
        };
        let r = ops.call(|abi| (ext.init_param)(&self.obj, abi, layer, param.into()));
        let id = self.check("init_param", name, r)?;
        let t = ops.tensor(id).map_err(|e| self.fail("init_param", name, ErrorKind::OP, format!("`{param}`: returned {}", e.message)))?;
        if t.dims() != shape {
            return Err(self.fail(
                "init_param",
                name,
                ErrorKind::OP,
                format!("returned a tensor of shape {:?} for `{param}`, which the plan declares {shape:?}", t.dims()),
            ));
        }
        Ok(t.detach())
    }

    /// The directives for this step.
    pub fn on_step(&mut self, step: u64) -> Result<Vec<abi::StageDirective>, PluginError> {
        let r = self.obj.on_step(step);
        Ok(self.check("on_step", None, r)?.into_iter().collect())
    }

    pub fn save_state(&self) -> Result<String, PluginError> {
        let r = self.obj.save_state();
        Ok(self.check("save_state", None, r)?.into_string())
    }

    pub fn load_state(&mut self, state: &str) -> Result<(), PluginError> {
        let r = self.obj.load_state(state.into());
        self.check("load_state", None, r)
    }

    /// Switches to a new build of the plugin (call between steps or requests): creates the new
    /// strategy object with the same config, carries the private state over, re-plans, and
    /// lets the store keep every parameter whose name and shape still match. On any error the
    /// old build stays in use and nothing changed except parameters `apply_plan` created.
    pub fn reload(
        &mut self,
        plugin: &LoadedPlugin,
        layers: &[abi::LayerInfo],
        store: &ParamStore,
    ) -> Result<(abi::Plan, PlanDiff), PluginError> {
        let mut next = StrategyInstance::new(plugin, Some(&self.name), &self.config)?;
        let state = self.save_state()?;
        next.load_state(&state)?;
        let plan = next.plan(layers)?;
        let diff = store.apply_plan(&self.name, &plan).map_err(|e| next.fail("plan", None, ErrorKind::OTHER, e.to_string()))?;
        *self = next;
        Ok((plan, diff))
    }
}

/// Checks a plan against the hook points: every attached and unfrozen layer exists (unfrozen
/// ones are linears), no layer or group appears twice, learning rates are finite and >= 0.
pub fn check_plan(plan: &abi::Plan, layers: &[abi::LayerInfo]) -> Result<(), String> {
    use std::collections::{BTreeSet, HashMap};
    let by_name: HashMap<&str, &abi::LayerInfo> = layers.iter().map(|l| (l.name(), l)).collect();
    let mut seen = BTreeSet::new();
    for a in plan.attachments.iter() {
        if !by_name.contains_key(a.layer.as_str()) {
            return Err(format!("the plan attaches to `{}`, which is not a hook point of this model", a.layer));
        }
        if !seen.insert(a.layer.as_str()) {
            return Err(format!("the plan attaches to `{}` twice", a.layer));
        }
    }
    let mut groups = BTreeSet::new();
    for g in plan.groups.iter() {
        if !groups.insert(g.name.as_str()) {
            return Err(format!("the plan defines optimizer group `{}` twice", g.name));
        }
        let lr_ok = g.lr.is_finite() && g.lr >= 0.0;
        if !lr_ok || !g.weight_decay.is_finite() {
            return Err(format!("optimizer group `{}`: lr {} / weight decay {} must be finite, lr >= 0", g.name, g.lr, g.weight_decay));
        }
        if let ROption::RSome(c) = g.clip_norm {
            if c.is_nan() || c <= 0.0 {
                return Err(format!("optimizer group `{}`: clip norm must be > 0, got {c}", g.name));
            }
        }
    }
    for u in plan.unfreeze.iter() {
        match by_name.get(u.layer.as_str()) {
            None => return Err(format!("the plan unfreezes `{}`, which is not a hook point of this model", u.layer)),
            Some(l) if !l.is_linear() && !l.is_conv() => {
                return Err(format!(
                    "the plan unfreezes `{}`, which is not a linear or a conv (only their base weights can be trained)",
                    u.layer
                ))
            }
            _ => {}
        }
        if !u.lr.is_finite() || u.lr < 0.0 {
            return Err(format!("the plan unfreezes `{}` with lr {}: must be finite and >= 0", u.layer, u.lr));
        }
    }
    Ok(())
}
