//! Plain-Rust forms of the manifest, the plan, stage directives and exports, converted to the
//! ABI types by the SDK.

use abi_stable::std_types::{RNone, ROption, RSome, RString, RVec};
use graft_abi as abi;
use graft_abi::{DirectiveKind, Init};

use crate::ops::Tensor;

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Stable identifier (parameters and exports are keyed by it), e.g. `lora`.
    pub id: String,
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    pub version: String,
    pub description: String,
    /// Free-form tags, e.g. `delta_weight`, `stages`, `export:lora`.
    pub capabilities: Vec<String>,
    /// An example configuration (JSON) that `Strategy::new` accepts.
    pub config_example: String,
}

impl Manifest {
    pub fn new(id: impl Into<String>, version: impl Into<String>) -> Self {
        Self { id: id.into(), version: version.into(), description: String::new(), capabilities: Vec::new(), config_example: "{}".to_string() }
    }

    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    pub fn capability(mut self, tag: impl Into<String>) -> Self {
        self.capabilities.push(tag.into());
        self
    }

    pub fn config_example(mut self, json: impl Into<String>) -> Self {
        self.config_example = json.into();
        self
    }

    pub(crate) fn into_abi(self) -> abi::Manifest {
        abi::Manifest {
            id: self.id.into(),
            version: self.version.into(),
            abi_version: abi::ABI_VERSION,
            description: self.description.into(),
            capabilities: self.capabilities.into_iter().map(RString::from).collect(),
            config_example: self.config_example.into(),
        }
    }
}

/// One adapter parameter of an attached layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Optimizer group: a name in [`Plan::groups`] (training refuses a parameter in a group the
    /// plan does not declare; `graft plugins check` reports it).
    pub group: String,
    pub trainable: bool,
}

impl ParamSpec {
    /// A trainable parameter in group `default`.
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), init, group: "default".to_string(), trainable: true }
    }

    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Kept fixed by the optimizer (still saved and exported).
    pub fn frozen(mut self) -> Self {
        self.trainable = false;
        self
    }

    fn into_abi(self) -> abi::ParamSpec {
        abi::ParamSpec {
            name: self.name.into(),
            shape: self.shape.into_iter().map(|d| d as u64).collect(),
            init: self.init,
            group: self.group.into(),
            trainable: self.trainable,
        }
    }
}

/// A layer the strategy attaches to.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub layer: String,
    pub params: Vec<ParamSpec>,
    /// False: the parameters exist but the layer waits for a `Directive::Attach`.
    pub attached: bool,
}

impl Attachment {
    pub fn new(layer: impl Into<String>) -> Self {
        Self { layer: layer.into(), params: Vec::new(), attached: true }
    }

    pub fn param(mut self, spec: ParamSpec) -> Self {
        self.params.push(spec);
        self
    }

    /// Declared now, attached later by a stage directive.
    pub fn detached(mut self) -> Self {
        self.attached = false;
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerGroup {
    pub name: String,
    pub lr: f64,
    pub weight_decay: f64,
    /// Per-parameter gradient clip (L2 norm).
    pub clip_norm: Option<f64>,
}

impl OptimizerGroup {
    pub fn new(name: impl Into<String>, lr: f64) -> Self {
        Self { name: name.into(), lr, weight_decay: 0.0, clip_norm: None }
    }

    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }

    pub fn clip_norm(mut self, norm: f64) -> Self {
        self.clip_norm = Some(norm);
        self
    }
}

/// A base weight to train, with its own learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseUnfreeze {
    pub layer: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub bias: bool,
}

impl BaseUnfreeze {
    pub fn new(layer: impl Into<String>, lr: f64) -> Self {
        Self { layer: layer.into(), lr, weight_decay: 0.0, bias: false }
    }
}

/// A named stage, for reports (the directives come from `on_step`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub start_step: u64,
    pub description: String,
}

/// What `plan` returns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub attachments: Vec<Attachment>,
    pub groups: Vec<OptimizerGroup>,
    pub unfreeze: Vec<BaseUnfreeze>,
    pub stages: Vec<Stage>,
}

impl Plan {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn attach(mut self, attachment: Attachment) -> Self {
        self.attachments.push(attachment);
        self
    }

    pub fn group(mut self, group: OptimizerGroup) -> Self {
        self.groups.push(group);
        self
    }

    pub fn unfreeze(mut self, base: BaseUnfreeze) -> Self {
        self.unfreeze.push(base);
        self
    }

    pub fn stage(mut self, name: impl Into<String>, start_step: u64, description: impl Into<String>) -> Self {
        self.stages.push(Stage { name: name.into(), start_step, description: description.into() });
        self
    }

    pub(crate) fn into_abi(self) -> abi::Plan {
        abi::Plan {
            attachments: self
                .attachments
                .into_iter()
                .map(|a| abi::Attachment {
                    layer: a.layer.into(),
                    params: a.params.into_iter().map(ParamSpec::into_abi).collect(),
                    attached: a.attached,
                })
                .collect(),
            groups: self
                .groups
                .into_iter()
                .map(|g| abi::OptimizerGroup { name: g.name.into(), lr: g.lr, weight_decay: g.weight_decay, clip_norm: g.clip_norm.into() })
                .collect(),
            unfreeze: self
                .unfreeze
                .into_iter()
                .map(|u| abi::BaseUnfreeze { layer: u.layer.into(), lr: u.lr, weight_decay: u.weight_decay, bias: u.bias })
                .collect(),
            stages: self
                .stages
                .into_iter()
                .map(|s| abi::Stage { name: s.name.into(), start_step: s.start_step, description: s.description.into() })
                .collect(),
        }
    }
}

/// A change a staged strategy asks for at a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    /// Attach a layer declared with `Attachment::detached`.
    Attach {
        layer: String,
    },
    /// Detach a layer (its parameters are kept).
    Detach {
        layer: String,
    },
    /// Stop training `param` of `layer` (all of its parameters when `None`).
    Freeze {
        layer: String,
        param: Option<String>,
    },
    Unfreeze {
        layer: String,
        param: Option<String>,
    },
    /// Add the layer's `delta_weight` into its base weight, then detach it.
    FoldIntoBase {
        layer: String,
    },
    /// Scale the learning rate of an optimizer group (relative to the plan's).
    LrScale {
        group: String,
        scale: f64,
    },
    /// Re-initialise `param` of `layer` (all when `None`) with its plan init.
    Reset {
        layer: String,
        param: Option<String>,
    },
}

impl Directive {
    pub(crate) fn into_abi(self) -> abi::StageDirective {
        let d = |kind, layer: String, param: Option<String>, group: String, value| abi::StageDirective {
            kind,
            layer: layer.into(),
            param: param.unwrap_or_default().into(),
            group: group.into(),
            value,
        };
        match self {
            Directive::Attach { layer } => d(DirectiveKind::ATTACH, layer, None, String::new(), 0.0),
            Directive::Detach { layer } => d(DirectiveKind::DETACH, layer, None, String::new(), 0.0),
            Directive::Freeze { layer, param } => d(DirectiveKind::FREEZE, layer, param, String::new(), 0.0),
            Directive::Unfreeze { layer, param } => d(DirectiveKind::UNFREEZE, layer, param, String::new(), 0.0),
            Directive::FoldIntoBase { layer } => d(DirectiveKind::FOLD_INTO_BASE, layer, None, String::new(), 0.0),
            Directive::LrScale { group, scale } => d(DirectiveKind::LR_SCALE, String::new(), None, group, scale),
            Directive::Reset { layer, param } => d(DirectiveKind::RESET, layer, param, String::new(), 0.0),
        }
    }
}

/// What one layer exports (see `graft_abi::ExportForm` for the key families).
#[derive(Debug, Clone)]
pub enum Export<'o> {
    /// Standard LoRA: the host writes kohya or PEFT keys. `down` [r, in], `up` [out, r]. On a
    /// conv layer (LoCon, kohya keys only): `down` [r, in, kh, kw], `up` [out, r, 1, 1].
    Lora { down: Tensor<'o>, up: Tensor<'o>, alpha: f64 },
    /// LoCon with LyCORIS' Tucker decomposition on a conv layer: `down` [r, in, 1, 1], `mid`
    /// [r, r, kh, kw], `up` [out, r, 1, 1]; `dW[o, i] = alpha / r * Σ up[o, a] mid[a, b] down[b, i]`.
    Tucker { down: Tensor<'o>, mid: Tensor<'o>, up: Tensor<'o>, alpha: f64 },
    /// DoRA: a LoRA with a magnitude [out, 1] (or [out]), `W' = magnitude * (W + dW) /
    /// ||W + dW||` per output row. The host writes a LyCORIS file (kohya keys plus
    /// `dora_scale`) that A1111, ComfyUI and `graft generate` apply.
    Dora { down: Tensor<'o>, up: Tensor<'o>, alpha: f64, magnitude: Tensor<'o> },
    /// A full weight difference [out, in].
    Diff(Tensor<'o>),
    /// Any tensors, saved under graft-native keys `<layer>.<name>`.
    Native(Vec<(String, Tensor<'o>)>),
    /// Another key family the host's formats crate knows.
    Family { family: String, tensors: Vec<(String, Tensor<'o>)>, alpha: Option<f64> },
}

impl Export<'_> {
    pub(crate) fn into_abi(self) -> abi::ExportForm {
        let named = |v: Vec<(String, Tensor<'_>)>| -> RVec<abi::NamedTensor> {
            v.into_iter().map(|(name, t)| abi::NamedTensor { name: name.into(), tensor: t.id() }).collect()
        };
        let (family, tensors, alpha): (&str, RVec<abi::NamedTensor>, ROption<f64>) = match self {
            Export::Lora { down, up, alpha } => ("lora", named(vec![("down".into(), down), ("up".into(), up)]), RSome(alpha)),
            Export::Tucker { down, mid, up, alpha } => {
                ("lora", named(vec![("down".into(), down), ("mid".into(), mid), ("up".into(), up)]), RSome(alpha))
            }
            Export::Dora { down, up, alpha, magnitude } => {
                ("lora", named(vec![("down".into(), down), ("up".into(), up), ("dora_scale".into(), magnitude)]), RSome(alpha))
            }
            Export::Diff(t) => ("diff", named(vec![("diff".into(), t)]), RNone),
            Export::Native(v) => ("native", named(v), RNone),
            Export::Family { family, tensors, alpha } => {
                return abi::ExportForm { family: family.into(), tensors: named(tensors), alpha: alpha.into() }
            }
        };
        abi::ExportForm { family: family.into(), tensors, alpha }
    }
}
