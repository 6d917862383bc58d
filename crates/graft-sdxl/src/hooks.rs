//! Named hook points.
//!
//! Every `Linear` inside the UNet's transformer blocks and inside both text encoders, every
//! attention module, and the UNet's convolutions (resnet `conv1` / `conv2` / `conv_shortcut`,
//! down- and upsampler `conv`, and `proj_in` / `proj_out` where they are 1x1 convs) is a hook point. A model registers its hook points in a [`HookRegistry`] while
//! it is built (so the list comes from the same code path as the forward, and a model built with
//! [`crate::varbuilder::shape_only`] lists them without loading any weight). Forward passes take a
//! `&dyn Hooks`; a layer with nothing attached runs exactly the base computation.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::overrides::{AsLoaded, BaseWeight};

/// Which model a hook point lives in. The name prefix is the diffusers component folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LayerKind {
    Linear,
    Attention,
    /// A 2-d convolution: its weight is [out, in, kh, kw], its geometry in [`LayerInfo::conv`].
    Conv,
}

/// The geometry of a convolution hook point (groups 1, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvInfo {
    /// (kh, kw)
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: usize,
}

/// Where a hook point sits: UNet down/mid/up block with its index, or a text-encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlockPosition {
    Down(usize),
    Mid,
    Up(usize),
    TextLayer(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AttentionKind {
    SelfAttention,
    CrossAttention,
}

/// What a plugin learns about a hook point.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerInfo {
    /// Diffusers module path with the component prefix, e.g.
    /// `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`.
    pub name: String,
    pub kind: LayerKind,
    pub component: Component,
    /// Linear: in / out features. Attention: the query dimension for both. Conv: in / out
    /// channels.
    pub in_features: usize,
    pub out_features: usize,
    pub block: BlockPosition,
    /// For attention modules and the linears inside them.
    pub attention: Option<AttentionKind>,
    /// For convolutions: kernel, stride, padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<ConvInfo>,
}

impl LayerInfo {
    /// The shape of the base weight: [out, in] or [out, in, kh, kw]; none for attention modules.
    pub fn weight_shape(&self) -> Option<Vec<usize>> {
        match (self.kind, self.conv) {
            (LayerKind::Linear, _) => Some(vec![self.out_features, self.in_features]),
            (LayerKind::Conv, Some(c)) => Some(vec![self.out_features, self.in_features, c.kernel.0, c.kernel.1]),
            _ => None,
        }
    }
}

/// The weight and bias of a linear (or conv: [out, in, kh, kw]) hook point: as loaded, or an
/// override of them ([`crate::overrides`]).
#[derive(Debug, Clone)]
pub struct LinearWeights {
    /// [out, in]
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// A weight without a bias.
impl From<Tensor> for LinearWeights {
    fn from(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }
}

impl LinearWeights {
    /// The weight in f32 (a copy when it is kept in half precision): what adapter parameters and
    /// deltas combine with.
    pub fn weight_f32(&self) -> candle_core::Result<Tensor> {
        self.weight.to_dtype(candle_core::DType::F32)
    }

    /// The weight plus an f32 `delta`, in f32: rounding the sum back to half precision would lose
    /// most of a small delta, so a changed weight is held in f32.
    pub fn plus(&self, delta: &Tensor) -> candle_core::Result<Tensor> {
        self.weight_f32()? + delta
    }
}

/// The base weights of a hook point, shared between the module and the registry so the host can
/// override them (fuse, fold, unfreeze as a `Var`) without walking the model; only push and pop
/// change them ([`crate::overrides`]).
pub type SharedLinear = Arc<BaseWeight>;

/// Index of a hook point inside its component's registry.
pub type LayerIndex = usize;

/// The hook points of one component, in registration order.
#[derive(Debug, Default, Clone)]
pub struct HookRegistry {
    layers: Vec<LayerInfo>,
    /// For each layer: the shared base weights of a linear, `None` for an attention module.
    weights: Vec<Option<SharedLinear>>,
}

impl HookRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register_linear(&mut self, info: LayerInfo, weights: SharedLinear) -> LayerIndex {
        debug_assert_eq!(info.kind, LayerKind::Linear);
        self.layers.push(info);
        self.weights.push(Some(weights));
        self.layers.len() - 1
    }

    /// A convolution hook point; its weights are [out, in, kh, kw] and the bias [out].
    pub fn register_conv(&mut self, info: LayerInfo, weights: SharedLinear) -> LayerIndex {
        debug_assert_eq!(info.kind, LayerKind::Conv);
        self.layers.push(info);
        self.weights.push(Some(weights));
        self.layers.len() - 1
    }

    pub fn register_attention(&mut self, info: LayerInfo) -> LayerIndex {
        debug_assert_eq!(info.kind, LayerKind::Attention);
        self.layers.push(info);
        self.weights.push(None);
        self.layers.len() - 1
    }

    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn index_of(&self, name: &str) -> Option<LayerIndex> {
        self.layers.iter().position(|l| l.name == name)
    }

    /// The shared base weights of a linear or conv hook point (`None` for attention modules).
    pub fn linear_weights(&self, index: LayerIndex) -> Option<&SharedLinear> {
        self.weights.get(index).and_then(|w| w.as_ref())
    }

    /// Replaces every linear's loaded weights with an empty tensor, freeing their memory wherever
    /// they are shared (the model and the adapters see the same slots). Returns the bytes freed.
    pub fn release_linears(&self) -> usize {
        let mut freed = 0;
        for shared in self.weights.iter().flatten() {
            let w = shared.loaded();
            let empty = Tensor::zeros(0, w.weight.dtype(), w.weight.device()).unwrap_or_else(|_| w.weight.clone());
            drop(w);
            freed += shared.replace_loaded(LinearWeights { weight: empty, bias: None });
        }
        freed
    }

    /// True after [`HookRegistry::release_linears`] (until [`HookRegistry::take_linears`]).
    pub fn released(&self) -> bool {
        self.weights.iter().flatten().next().is_some_and(|w| w.loaded().weight.elem_count() == 0)
    }

    /// Puts `other`'s loaded linear weights (a fresh build of the same component) into this
    /// registry's shared slots, layer by layer.
    pub fn take_linears(&self, other: &HookRegistry) -> Result<()> {
        if self.layers != other.layers {
            candle_core::bail!("take_linears: the registries list different hook points");
        }
        for (mine, theirs) in self.weights.iter().zip(&other.weights) {
            if let (Some(mine), Some(theirs)) = (mine, theirs) {
                mine.replace_loaded(theirs.loaded());
            }
        }
        Ok(())
    }

    /// Every linear and conv hook point's shared weights, in registration order.
    pub fn shared_weights(&self) -> impl Iterator<Item = &SharedLinear> {
        self.weights.iter().flatten()
    }

    /// Sets every override of this component aside while the guard lives ([`AsLoaded`]).
    pub fn as_loaded(&self) -> AsLoaded {
        AsLoaded::new(self.shared_weights().cloned())
    }

    /// The hook points with an override on their stack.
    pub fn overridden(&self) -> Vec<&str> {
        self.shared_weights().filter(|w| w.depth() > 0).map(|w| w.layer()).collect()
    }
}

/// Called by the models at every hook point. Implemented by the host's adapter dispatcher.
///
/// `attached` is asked first; only when it says yes does the model call `linear` / `attention`,
/// so an unhooked layer costs one virtual call and no tensor work.
pub trait Hooks {
    fn attached(&self, layer: LayerIndex) -> bool;

    /// A linear hook point: `input` [.., in], `base_out` = input @ W^T + b. Returns the output to
    /// use instead of `base_out`.
    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor>;

    /// A convolution hook point: `input` [b, in, h, w] exactly as the base convolution read it,
    /// with `padding` (the layer's, or 0 when the model padded `input` itself) and the layer's
    /// stride; `base_out` = conv(input, W) + b. Returns the output to use instead of `base_out`.
    fn conv(&self, _layer: LayerIndex, _input: &Tensor, _padding: usize, base_out: Tensor) -> Result<Tensor> {
        Ok(base_out)
    }

    /// An attention hook point: its input hidden states, its context (`None` for self-attention)
    /// and its output (after `to_out`). Returns the output to use instead.
    fn attention(&self, layer: LayerIndex, hidden: &Tensor, context: Option<&Tensor>, out: Tensor) -> Result<Tensor>;

    /// The random state the hooks draw from (adapter dropout), if any: gradient checkpointing
    /// rewinds it so that a segment's replay draws what its forward drew.
    fn random_state(&self) -> Option<crate::rng::RngState> {
        None
    }

    fn set_random_state(&self, _state: crate::rng::RngState) {}
}

/// Nothing attached anywhere: the plain model.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn attached(&self, _layer: LayerIndex) -> bool {
        false
    }
    fn linear(&self, _layer: LayerIndex, _input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        Ok(base_out)
    }
    fn attention(&self, _layer: LayerIndex, _hidden: &Tensor, _context: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        Ok(out)
    }
}
