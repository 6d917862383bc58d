//! The contract between the graft host and its strategy plugins.
#![allow(non_local_definitions)]
//!
//! Everything here crosses a dynamic-library boundary, so every type is `#[repr(C)]` /
//! `#[repr(transparent)]` and derives `abi_stable::StableAbi`: the host checks the whole layout
//! (every type reachable from [`PluginMod`]) when it loads a plugin.
//!
//! Rules that keep old plugins loadable:
//! - the root module [`PluginMod`] never changes; growth goes through [`PluginMod::extension`]
//!   (versioned extension modules, the way CLAP and OpenFX grow);
//! - the trait objects ([`Strategy`], [`HostOps`]) never change either: abi_stable's layout check
//!   refuses a library whose copy of a type has fewer fields than the host's, so a method added
//!   to them would lock out every plugin built before. New ops and entry points come as
//!   extensions ([`OpsExtensionV1`]): a plugin built with an older SDK simply lacks them;
//! - the "kind" types ([`LayerKind`], [`InitKind`], ...) are open sets (a wrapped integer with
//!   named constants), so new kinds are not a layout change: match them with a fallback arm.
//!
//! Tensors never cross the boundary: a plugin sees [`TensorId`] handles and computes through the
//! host's [`HostOps`] table. Errors are values ([`GResult`]); a panic must never unwind across an
//! `extern "C"` function (graft-sdk's export macro catches them).
//!
//! Plugin authors use `graft-sdk`, not this crate directly.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::RMut,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    type_layout::TypeLayout,
    StableAbi,
};

pub use abi_stable;

/// The version of this contract. A plugin reports the version it was built against in its
/// manifest and from [`PluginMod::abi_version`]; the host refuses any other.
pub const ABI_VERSION: u32 = 1;

/// Symbol base name of the root module inside a plugin library.
pub const ROOT_MODULE_NAME: &str = "graft_plugin";

// ---------------------------------------------------------------------------------------------
// Open enums
// ---------------------------------------------------------------------------------------------

macro_rules! open_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:expr => $text:expr,)* }) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u8);

        impl $name {
            $($(#[$vdoc])* pub const $variant: Self = Self($value);)*

            /// The lower-case name, or `unknown(N)` for a kind this build does not know.
            pub fn name(self) -> std::borrow::Cow<'static, str> {
                match self.0 {
                    $($value => std::borrow::Cow::Borrowed($text),)*
                    n => std::borrow::Cow::Owned(format!("unknown({n})")),
                }
            }

            /// Parses the lower-case name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.name())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.name())
            }
        }
    };
}

open_enum! {
    /// What a hook point is.
    LayerKind {
        /// A `Linear`: the plugin sees its input and its base output.
        LINEAR = 0 => "linear",
        /// An attention module: the plugin sees its hidden states, context and output.
        ATTENTION = 1 => "attention",
        /// A 2-d convolution (added within ABI version 1: older plugins see `unknown(2)`). Its
        /// base weight is [out, in, kh, kw]; `in_features` / `out_features` are the channels and
        /// [`LayerInfo::extra`] holds the geometry as JSON (see [`ConvGeometry`]). The host never
        /// calls `forward` here: it asks `delta_weight` for a kernel difference of the base
        /// weight's shape and computes `conv(x, W + Σ m·ΔW)`.
        CONV = 2 => "conv",
    }
}

open_enum! {
    /// Which model a hook point lives in; the layer name starts with this prefix.
    Component {
        UNET = 0 => "unet",
        TEXT_ENCODER = 1 => "text_encoder",
        TEXT_ENCODER_2 = 2 => "text_encoder_2",
    }
}

open_enum! {
    /// The part of the model a hook point sits in.
    BlockKind {
        DOWN = 0 => "down",
        MID = 1 => "mid",
        UP = 2 => "up",
        /// A text-encoder layer.
        TEXT_LAYER = 3 => "text_layer",
    }
}

open_enum! {
    /// For attention modules and the linears inside them.
    AttentionKind {
        /// Not inside an attention module (feed-forward, projections).
        NONE = 0 => "none",
        SELF_ATTENTION = 1 => "self",
        CROSS_ATTENTION = 2 => "cross",
    }
}

open_enum! {
    /// How a parameter is initialised. See [`Init`] for the meaning of its numbers.
    InitKind {
        ZEROS = 0 => "zeros",
        NORMAL = 1 => "normal",
        KAIMING_UNIFORM = 2 => "kaiming_uniform",
        CONSTANT = 3 => "constant",
        /// Computed by the strategy's `init_param` from the layer (its base weight and bias)
        /// when the parameter is created or reset. Declare it in the plan, not through `param`.
        FROM_LAYER = 4 => "from_layer",
    }
}

open_enum! {
    /// What a [`StageDirective`] asks the host to do.
    DirectiveKind {
        /// Attach `layer` (declared in the plan with `attached = false`).
        ATTACH = 0 => "attach",
        /// Detach `layer`: the base computation runs there again; its parameters are kept.
        DETACH = 1 => "detach",
        /// Stop training `param` of `layer` (all of the layer's parameters when `param` is empty).
        FREEZE = 2 => "freeze",
        /// Train `param` of `layer` again (all when `param` is empty).
        UNFREEZE = 3 => "unfreeze",
        /// Add the layer's current `delta_weight` into its base weight and detach the layer.
        FOLD_INTO_BASE = 4 => "fold_into_base",
        /// Multiply the learning rate of optimizer `group` by `value` (relative to the plan's lr).
        LR_SCALE = 5 => "lr_scale",
        /// Re-initialise `param` of `layer` (all when empty) with its plan init, resetting its
        /// optimizer state.
        RESET = 6 => "reset",
    }
}

open_enum! {
    /// Classifies a [`GraftError`].
    ErrorKind {
        OTHER = 0 => "error",
        /// A plugin entry point panicked (caught by the SDK's guard).
        PANIC = 1 => "panic",
        /// The strategy's configuration is invalid.
        CONFIG = 2 => "config",
        /// A host op failed (unknown handle, shape mismatch, ...).
        OP = 3 => "op",
        /// The entry point or op is not supported by this plugin or host.
        UNSUPPORTED = 4 => "unsupported",
    }
}

open_enum! {
    /// Severity of a message a plugin logs through the host.
    LogLevel {
        ERROR = 0 => "error",
        WARN = 1 => "warn",
        INFO = 2 => "info",
        DEBUG = 3 => "debug",
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error as a value: every entry point and every host op returns one instead of panicking.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct GraftError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl GraftError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: RString::from(message.into()) }
    }
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OTHER, message)
    }
    pub fn op(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OP, message)
    }
}

impl std::fmt::Display for GraftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == ErrorKind::OTHER {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

impl std::error::Error for GraftError {}

pub type GResult<T> = RResult<T, GraftError>;

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// Where a hook point sits: UNet down/mid/up block with its index, or a text-encoder layer.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPosition {
    pub kind: BlockKind,
    /// Block index for down/up, layer index for text layers, 0 for mid.
    pub index: u32,
}

/// A hook point, as a plugin sees it (the host converts `graft_sdxl::hooks::LayerInfo`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct LayerInfo {
    /// Diffusers module path with the component prefix, e.g.
    /// `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`.
    pub name: RString,
    pub kind: LayerKind,
    pub component: Component,
    /// Linear: in / out features. Attention: the query dimension for both.
    pub in_features: u64,
    pub out_features: u64,
    pub block: BlockPosition,
    pub attention: AttentionKind,
    /// Kind-specific details as JSON; empty for linear and attention. A conv layer has
    /// `{"kernel": [kh, kw], "stride": s, "padding": p}` ([`ConvGeometry`]).
    pub extra: RString,
}

/// The geometry of a conv hook point, as [`LayerInfo::extra`] spells it (groups 1, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: [u64; 2],
    pub stride: u64,
    pub padding: u64,
}

impl ConvGeometry {
    /// The JSON the host puts in `extra`.
    pub fn to_json(&self) -> String {
        format!("{{\"kernel\": [{}, {}], \"stride\": {}, \"padding\": {}}}", self.kernel[0], self.kernel[1], self.stride, self.padding)
    }

    /// Reads `extra` (whitespace-tolerant, keys in any order); none when a key is missing.
    pub fn from_json(extra: &str) -> Option<Self> {
        let number_after = |key: &str| -> Option<Vec<u64>> {
            let at = extra.find(&format!("\"{key}\""))? + key.len() + 2;
            let rest = extra[at..].trim_start().strip_prefix(':')?.trim_start();
            if let Some(list) = rest.strip_prefix('[') {
                let end = list.find(']')?;
                list[..end].split(',').map(|v| v.trim().parse().ok()).collect()
            } else {
                let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
                Some(vec![rest[..end].parse().ok()?])
            }
        };
        let kernel = number_after("kernel")?;
        let (stride, padding) = (number_after("stride")?, number_after("padding")?);
        match (kernel.as_slice(), stride.as_slice(), padding.as_slice()) {
            ([kh, kw], [s], [p]) => Some(Self { kernel: [*kh, *kw], stride: *s, padding: *p }),
            _ => None,
        }
    }
}

impl LayerInfo {
    pub fn name(&self) -> &str {
        self.name.as_str()
    }
    pub fn is_linear(&self) -> bool {
        self.kind == LayerKind::LINEAR
    }
    pub fn is_attention(&self) -> bool {
        self.kind == LayerKind::ATTENTION
    }
    pub fn is_conv(&self) -> bool {
        self.kind == LayerKind::CONV
    }
    /// A conv layer's kernel, stride and padding (from `extra`).
    pub fn conv(&self) -> Option<ConvGeometry> {
        if self.is_conv() {
            ConvGeometry::from_json(self.extra.as_str())
        } else {
            None
        }
    }
    /// The base weight's shape: [out, in] for a linear, [out, in, kh, kw] for a conv.
    pub fn weight_shape(&self) -> Option<Vec<u64>> {
        if self.is_linear() {
            return Some(vec![self.out_features, self.in_features]);
        }
        let g = self.conv()?;
        Some(vec![self.out_features, self.in_features, g.kernel[0], g.kernel[1]])
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors and parameters
// ---------------------------------------------------------------------------------------------

/// An opaque handle to a host tensor, valid only during the entry-point call that made it.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u64);

/// A parameter initialisation: `kind` says how to read `a` and `b`.
///
/// - zeros;
/// - normal: mean `a`, standard deviation `b`;
/// - kaiming-uniform: negative slope `a`; uniform in ±`gain * sqrt(3 / fan_in)` with
///   `gain = sqrt(2 / (1 + a²))` and `fan_in` the product of all dimensions but the first
///   (torch's rule: `in` for an `[out, in]` weight; the size itself for a 1-d shape);
///   `a = sqrt(5)` is torch's `nn.Linear` default and kohya's `lora_down`;
/// - constant: every element `a`;
/// - from_layer: the strategy's `init_param` computes it from the layer (`a`, `b` unused).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub kind: InitKind,
    pub a: f64,
    pub b: f64,
}

impl Init {
    pub const fn zeros() -> Self {
        Self { kind: InitKind::ZEROS, a: 0.0, b: 0.0 }
    }
    pub const fn normal(mean: f64, std: f64) -> Self {
        Self { kind: InitKind::NORMAL, a: mean, b: std }
    }
    pub const fn kaiming_uniform(a: f64) -> Self {
        Self { kind: InitKind::KAIMING_UNIFORM, a, b: 0.0 }
    }
    pub const fn constant(value: f64) -> Self {
        Self { kind: InitKind::CONSTANT, a: value, b: 0.0 }
    }
    pub const fn from_layer() -> Self {
        Self { kind: InitKind::FROM_LAYER, a: 0.0, b: 0.0 }
    }
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            InitKind::ZEROS => write!(f, "zeros"),
            InitKind::NORMAL => write!(f, "normal(mean={}, std={})", self.a, self.b),
            InitKind::KAIMING_UNIFORM => write!(f, "kaiming_uniform(a={})", self.a),
            InitKind::CONSTANT => write!(f, "constant({})", self.a),
            InitKind::FROM_LAYER => write!(f, "from_layer"),
            k => write!(f, "{k}"),
        }
    }
}

/// One adapter parameter of an attached layer.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Name inside the layer, e.g. `down`; the host keys it by (strategy, layer, name).
    pub name: RString,
    pub shape: RVec<u64>,
    pub init: Init,
    /// Optimizer group (a name from [`Plan::groups`]).
    pub group: RString,
    /// False: the host keeps it fixed (it is still saved).
    pub trainable: bool,
}

/// A layer the strategy attaches to, with the parameters it needs there.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Attachment {
    pub layer: RString,
    pub params: RVec<ParamSpec>,
    /// False: declared (its parameters exist) but not attached until an `attach` directive.
    pub attached: bool,
}

/// An optimizer group.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct OptimizerGroup {
    pub name: RString,
    pub lr: f64,
    pub weight_decay: f64,
    /// Clip each parameter's gradient to this L2 norm; none: no clipping.
    pub clip_norm: ROption<f64>,
}

/// A base weight the strategy wants trained, with its own learning rate.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct BaseUnfreeze {
    /// A linear or conv hook point.
    pub layer: RString,
    pub lr: f64,
    pub weight_decay: f64,
    /// Train the bias too (when the layer has one).
    pub bias: bool,
}

/// A named stage of a staged strategy, for reports; the directives come from `on_step`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: RString,
    pub start_step: u64,
    pub description: RString,
}

/// What `plan` returns.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub attachments: RVec<Attachment>,
    pub groups: RVec<OptimizerGroup>,
    pub unfreeze: RVec<BaseUnfreeze>,
    pub stages: RVec<Stage>,
}

/// A request from `on_step`. Which fields matter depends on `kind` (see [`DirectiveKind`]);
/// unused ones are empty / 0.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct StageDirective {
    pub kind: DirectiveKind,
    pub layer: RString,
    pub param: RString,
    pub group: RString,
    pub value: f64,
}

/// The tensors a hook point gives to `forward`, as handles in the call's table.
///
/// Linear hook points set `input` ([.., in]) and `base_out` ([.., out] = input W^T + b); the
/// result replaces `base_out`. Attention hook points set `hidden`, `context` (cross-attention
/// only) and `out` (after `to_out`); the result replaces `out`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ForwardInputs {
    pub input: ROption<TensorId>,
    pub base_out: ROption<TensorId>,
    pub hidden: ROption<TensorId>,
    pub context: ROption<TensorId>,
    pub out: ROption<TensorId>,
    /// Training (dropout active) or inference.
    pub training: bool,
    /// The optimizer step (0 in inference).
    pub step: u64,
}

/// A named tensor handle.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: RString,
    pub tensor: TensorId,
}

/// What `export` returns for one layer: tensors in a key family the host's formats crate knows.
///
/// - `lora`: tensors `down` [r, in] and `up` [out, r] and `alpha`: the host writes kohya or PEFT
///   keys (`y = W x + alpha / r * up down x`); with a tensor `dora_scale` ([out, 1], DoRA's
///   magnitude: `W' = m * (W + dW) / ||W + dW||` per output row) it writes a LyCORIS file;
/// - `diff`: tensor `diff` [out, in], a full weight difference (LyCORIS `diff`);
/// - `native`: any tensors, written under graft-native keys `<layer>.<name>`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ExportForm {
    pub family: RString,
    pub tensors: RVec<NamedTensor>,
    pub alpha: ROption<f64>,
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Stable identifier, e.g. `lora`: parameters and exports are keyed by it.
    pub id: RString,
    /// The plugin's own version (semver).
    pub version: RString,
    /// The [`ABI_VERSION`] it was built against.
    pub abi_version: u32,
    pub description: RString,
    /// Free-form capability tags, e.g. `delta_weight`, `stages`, `export:lora`.
    pub capabilities: RVec<RString>,
    /// An example configuration (JSON) that `new_strategy` accepts.
    pub config_example: RString,
}

// ---------------------------------------------------------------------------------------------
// Host ops
// ---------------------------------------------------------------------------------------------

/// The host's tensor operations, handed to `forward`, `delta_weight` and `export`. Each call
/// runs on the host's device with the host's autograd; every op returns an error value on an
/// unknown handle or a shape error, never panics.
///
/// Dimensions (`dim: i64`) may be negative (counted from the end). Binary ops broadcast.
#[sabi_trait]
pub trait HostOps {
    /// The parameter `name` of the current (strategy, layer): created with `shape` and `init`
    /// when it does not exist yet, an error when it exists with another shape.
    fn param(&mut self, name: RStr<'_>, shape: RSlice<'_, u64>, init: Init) -> GResult<TensorId>;
    /// An existing parameter of the current (strategy, layer).
    fn get_param(&mut self, name: RStr<'_>) -> GResult<TensorId>;
    /// The base weight [out, in] of the current linear layer.
    fn base_weight(&mut self) -> GResult<TensorId>;
    /// A tensor filled with `value`.
    fn constant(&mut self, shape: RSlice<'_, u64>, value: f64) -> GResult<TensorId>;

    /// Matrix product over the last two dimensions (leading dimensions broadcast).
    fn matmul(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId>;
    /// `x W^T + b` for `x` [.., in], `W` [out, in].
    fn linear(&mut self, x: TensorId, weight: TensorId, bias: ROption<TensorId>) -> GResult<TensorId>;
    fn add(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId>;
    fn sub(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId>;
    fn mul(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId>;
    fn div(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId>;
    /// `x * mul + add`.
    fn affine(&mut self, x: TensorId, mul: f64, add: f64) -> GResult<TensorId>;
    /// `x * s`.
    fn scale(&mut self, x: TensorId, s: f64) -> GResult<TensorId>;

    fn sigmoid(&mut self, x: TensorId) -> GResult<TensorId>;
    fn tanh(&mut self, x: TensorId) -> GResult<TensorId>;
    fn silu(&mut self, x: TensorId) -> GResult<TensorId>;
    fn gelu(&mut self, x: TensorId) -> GResult<TensorId>;
    fn relu(&mut self, x: TensorId) -> GResult<TensorId>;
    fn exp(&mut self, x: TensorId) -> GResult<TensorId>;
    fn sqrt(&mut self, x: TensorId) -> GResult<TensorId>;
    /// Differentiable softmax along `dim`.
    fn softmax(&mut self, x: TensorId, dim: i64) -> GResult<TensorId>;

    /// New shape with the same element count; one dimension may be -1 (inferred).
    fn reshape(&mut self, x: TensorId, shape: RSlice<'_, i64>) -> GResult<TensorId>;
    fn transpose(&mut self, x: TensorId, dim0: i64, dim1: i64) -> GResult<TensorId>;
    fn narrow(&mut self, x: TensorId, dim: i64, start: u64, len: u64) -> GResult<TensorId>;
    fn concat(&mut self, xs: RSlice<'_, TensorId>, dim: i64) -> GResult<TensorId>;
    /// Sum over `dims` (all dimensions when empty).
    fn sum(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId>;
    /// Mean over `dims` (all dimensions when empty).
    fn mean(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId>;
    /// L2 norm over `dims` (all dimensions when empty).
    fn norm(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId>;
    /// Inverted dropout with the host's seeded RNG; the identity outside training.
    fn dropout(&mut self, x: TensorId, p: f64) -> GResult<TensorId>;
    /// The same values, cut from the autograd graph.
    fn detach(&mut self, x: TensorId) -> GResult<TensorId>;

    fn shape(&mut self, x: TensorId) -> GResult<RVec<u64>>;
    /// The value of a one-element tensor.
    fn to_scalar(&mut self, x: TensorId) -> GResult<f64>;
    /// A message in the host's log, tagged with the plugin and layer.
    #[sabi(last_prefix_field)]
    fn log(&mut self, level: LogLevel, message: RStr<'_>);
}

/// The ops table as passed to a plugin entry point.
pub type HostOpsMut<'a> = HostOps_TO<'a, RMut<'a, ()>>;

// ---------------------------------------------------------------------------------------------
// Strategy
// ---------------------------------------------------------------------------------------------

/// A configured strategy, created by [`PluginMod::new_strategy`]. It holds no tensors: its
/// parameters live in the host, its private scalars go through `save_state` / `load_state`.
#[sabi_trait]
pub trait Strategy: Send + Sync {
    fn manifest(&self) -> GResult<Manifest>;
    /// Which layers to attach to and with what parameters; called again with the same config
    /// after a hot reload.
    fn plan(&mut self, layers: RSlice<'_, LayerInfo>, config_json: RStr<'_>) -> GResult<Plan>;
    /// The output that replaces the hook point's output (see [`ForwardInputs`]).
    fn forward(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo, inputs: &ForwardInputs) -> GResult<TensorId>;
    /// The adapter as a weight difference [out, in] when it is linear in the input (for fusing
    /// and merging); none otherwise.
    fn delta_weight(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo) -> GResult<ROption<TensorId>>;
    /// Called before each optimizer step; returns what to change at this step.
    fn on_step(&mut self, step: u64) -> GResult<RVec<StageDirective>>;
    /// The tensors to save for one layer and the key family they belong to; none: nothing.
    fn export(&self, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo) -> GResult<ROption<ExportForm>>;
    /// The plugin's private scalars (JSON), kept across a hot reload and in checkpoints.
    fn save_state(&self) -> GResult<RString>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state_json: RStr<'_>) -> GResult<()>;
}

/// An owned strategy object.
pub type StrategyBox = Strategy_TO<'static, RBox<()>>;

// ---------------------------------------------------------------------------------------------
// Extension `graft.ops` version 1: ops and entry points added after ABI version 1 shipped
// ---------------------------------------------------------------------------------------------

/// Name of the extension [`OpsExtensionV1`] (with [`OPS_EXTENSION_VERSION`]).
pub const OPS_EXTENSION: &str = "graft.ops";
pub const OPS_EXTENSION_VERSION: u32 = 1;

/// The host's ops added after ABI version 1. Each works on the plugin call in progress on the
/// calling thread (the `forward`, `delta_weight`, `export` or `init_param` the host is running),
/// like the [`HostOps`] table handed to that call; called outside one, it returns an error.
/// Shapes: element-wise ops keep their input's shape, binary ones broadcast.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostOpsV1Ext {
    /// The bias [out] of the current linear layer; none when it has none.
    pub base_bias: extern "C" fn() -> GResult<ROption<TensorId>>,
    /// |x|; gradient sign(x) (0 at 0).
    pub abs: extern "C" fn(x: TensorId) -> GResult<TensorId>,
    /// x limited to [min, max]; the gradient passes inside, 0 where clamped.
    pub clamp: extern "C" fn(x: TensorId, min: f64, max: f64) -> GResult<TensorId>,
    /// Element-wise max / min (broadcast); the gradient goes to the operand taken.
    pub maximum: extern "C" fn(a: TensorId, b: TensorId) -> GResult<TensorId>,
    pub minimum: extern "C" fn(a: TensorId, b: TensorId) -> GResult<TensorId>,
    /// `a` where `cond` is not 0, else `b` (broadcast); gradients to `a` and `b` where taken.
    pub where_cond: extern "C" fn(cond: TensorId, a: TensorId, b: TensorId) -> GResult<TensorId>,
    /// 1 where `a > b`, else 0 (broadcast); no gradient.
    pub gt: extern "C" fn(a: TensorId, b: TensorId) -> GResult<TensorId>,
    /// Natural logarithm; x^e.
    pub ln: extern "C" fn(x: TensorId) -> GResult<TensorId>,
    pub powf: extern "C" fn(x: TensorId, e: f64) -> GResult<TensorId>,
    /// The identity matrix [n, n].
    pub eye: extern "C" fn(n: u64) -> GResult<TensorId>,
    /// The inverse of each square matrix in the last two dimensions; gradient −A⁻ᵀ G A⁻ᵀ.
    pub inverse: extern "C" fn(x: TensorId) -> GResult<TensorId>,
    /// Reorders the dimensions (`dims` a permutation of 0..rank, negative from the end).
    pub permute: extern "C" fn(x: TensorId, dims: RSlice<'_, i64>) -> GResult<TensorId>,
    /// The entries `indices` along `dim` (gather; the gradient scatters back).
    pub index_select: extern "C" fn(x: TensorId, dim: i64, indices: RSlice<'_, u64>) -> GResult<TensorId>,
    /// N(0, 1) values that depend only on `seed` and `shape`; no gradient.
    pub random_normal: extern "C" fn(shape: RSlice<'_, u64>, seed: u64) -> GResult<TensorId>,
}

/// What a plugin built with this extension offers the host, found with
/// `extension(OPS_EXTENSION, OPS_EXTENSION_VERSION)`.
#[repr(C)]
#[derive(StableAbi)]
pub struct OpsExtensionV1 {
    /// The host hands the plugin its [`HostOpsV1Ext`] once, right after loading it.
    pub connect: extern "C" fn(host: &'static HostOpsV1Ext),
    /// The initial value of parameter `name` of `layer`, declared with [`Init::from_layer`], for a
    /// strategy object this plugin made; computed through `ops` with the declared shape.
    pub init_param:
        extern "C" fn(strategy: &StrategyBox, ops: HostOps_TO<'_, RMut<'_, ()>>, layer: &LayerInfo, name: RStr<'_>) -> GResult<TensorId>,
}

// ---------------------------------------------------------------------------------------------
// Extension `graft.config_schema` version 1: the keys a strategy's configuration accepts
// ---------------------------------------------------------------------------------------------

/// Name of the extension [`ConfigSchemaExtensionV1`] (with [`CONFIG_SCHEMA_EXTENSION_VERSION`]).
pub const CONFIG_SCHEMA_EXTENSION: &str = "graft.config_schema";
pub const CONFIG_SCHEMA_EXTENSION_VERSION: u32 = 1;

/// What a plugin offers through `extension(CONFIG_SCHEMA_EXTENSION, 1)`: a description of every
/// configuration key (type, default, range, one line of help) that the host shows, draws forms
/// from and checks a configuration against before it calls `new_strategy`.
///
/// The schema travels as JSON (docs/PLUGINS.md, "Config schema"), so that keys and key types can
/// grow without a layout change. Memory: the returned `RString` belongs to the host once returned
/// (it is freed through its own vtable, like every `RString` of this ABI); the module itself is
/// `'static` in the plugin.
#[repr(C)]
#[derive(StableAbi)]
pub struct ConfigSchemaExtensionV1 {
    /// The schema as JSON; none: this plugin describes no schema (the host then takes the
    /// configuration as free JSON, as before the extension).
    pub config_schema: extern "C" fn() -> GResult<ROption<RString>>,
}

// ---------------------------------------------------------------------------------------------
// Root module
// ---------------------------------------------------------------------------------------------

/// A versioned extension module, found with [`PluginMod::extension`].
///
/// `module` points to a `'static` value whose type has the layout `layout`
/// (`<T as StableAbi>::LAYOUT`); the host checks that layout with abi_stable's checker against
/// the type it expects for (name, version) before it casts the pointer.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct Extension {
    #[sabi(unsafe_opaque_field)]
    pub layout: &'static TypeLayout,
    #[sabi(unsafe_opaque_field)]
    pub module: *const (),
}

/// The root module every plugin exports. **Frozen**: its layout never changes.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: extern "C" fn() -> u32,
    pub manifest: extern "C" fn() -> GResult<Manifest>,
    /// A strategy object for one configured run.
    pub new_strategy: extern "C" fn(config_json: RStr<'_>) -> GResult<StrategyBox>,
    /// A versioned extension module by (name, version); none when the plugin lacks it.
    #[sabi(last_prefix_field)]
    pub extension: extern "C" fn(name: RStr<'_>, version: u32) -> ROption<Extension>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = ROOT_MODULE_NAME;
    const NAME: &'static str = ROOT_MODULE_NAME;
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_enums_name_and_parse() {
        assert_eq!(LayerKind::LINEAR.name(), "linear");
        assert_eq!(LayerKind::CONV.name(), "conv");
        let g = ConvGeometry { kernel: [3, 3], stride: 2, padding: 1 };
        assert_eq!(ConvGeometry::from_json(&g.to_json()), Some(g));
        assert_eq!(
            ConvGeometry::from_json("{ \"padding\":0,\"stride\" : 1, \"kernel\":[1,1] }"),
            Some(ConvGeometry { kernel: [1, 1], stride: 1, padding: 0 })
        );
        assert_eq!(ConvGeometry::from_json("{}"), None);
        assert_eq!(Component::from_name("text_encoder_2"), Some(Component::TEXT_ENCODER_2));
        assert_eq!(format!("{:?}", InitKind(42)), "unknown(42)");
        assert_eq!(Init::kaiming_uniform(5f64.sqrt()).to_string(), format!("kaiming_uniform(a={})", 5f64.sqrt()));
    }

    #[test]
    fn error_display_names_kind() {
        assert_eq!(GraftError::op("unknown tensor handle 3").to_string(), "op: unknown tensor handle 3");
        assert_eq!(GraftError::other("plain").to_string(), "plain");
    }
}
