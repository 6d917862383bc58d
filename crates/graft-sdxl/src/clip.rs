//! The two SDXL text encoders: CLIP ViT-L (`text_encoder`, transformers `CLIPTextModel`) and
//! OpenCLIP bigG (`text_encoder_2`, `CLIPTextModelWithProjection`, bias-free `text_projection`).
//!
//! Pre-LayerNorm transformer with a causal mask and no attention mask. Every linear of the encoder
//! layers (`self_attn.{q,k,v,out}_proj`, `mlp.fc1`, `mlp.fc2`) is a linear hook point, and every
//! `self_attn` module is an attention hook point. Weights live under `text_model.` (and
//! `text_projection.weight` for bigG), as in the SDXL diffusers files.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::hooks::{AttentionKind, BlockPosition, Component, HookRegistry, Hooks, LayerIndex, LayerInfo, LayerKind};
use crate::nn::{self, HookedLinear, LayerNorm, Linear};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: CLIP ViT-L.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP bigG.
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

/// A transformers `CLIPTextConfig` (`text_encoder/config.json`). Missing fields take transformers'
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (used only with a projection).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// 2 in the SDXL configs (a legacy value): the pooled position is then the argmax of the ids.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}
fn default_eos_token_id() -> u32 {
    49407
}

impl ClipConfig {
    /// SDXL base 1.0 `text_encoder`: CLIP ViT-L/14, 768 wide, 12 layers, quick_gelu.
    pub fn sdxl_text_encoder() -> Self {
        Self::from_json_str(include_str!("../configs/sdxl-base-1.0/text_encoder/config.json"), "built-in sdxl-base-1.0 text_encoder config")
            .expect("the built-in SDXL text_encoder config is valid")
    }

    /// SDXL base 1.0 `text_encoder_2`: OpenCLIP bigG/14, 1280 wide, 32 layers, gelu.
    pub fn sdxl_text_encoder_2() -> Self {
        Self::from_json_str(include_str!("../configs/sdxl-base-1.0/text_encoder_2/config.json"), "built-in sdxl-base-1.0 text_encoder_2 config")
            .expect("the built-in SDXL text_encoder_2 config is valid")
    }

    /// Parses and validates a transformers `CLIPTextConfig`; `source` names it in errors.
    pub fn from_json_str(json: &str, source: &str) -> std::result::Result<Self, crate::ConfigError> {
        let config: Self = serde_json::from_str(json).map_err(|e| crate::ConfigError::new(source, format!("invalid CLIP text config ({e})")))?;
        config.validate().map_err(|e| crate::ConfigError::new(source, e))?;
        Ok(config)
    }

    /// Checks the numbers the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("`{field}` must be positive"));
            }
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if head_dim * self.num_attention_heads != self.hidden_size {
            return Err(format!(
                "`hidden_size` ({}) must be a multiple of `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The embeddings, then the output of each layer (before the final LayerNorm), like
    /// transformers' `output_hidden_states`: `num_hidden_layers + 1` tensors [b, n, hidden].
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after the final LayerNorm, [b, n, hidden].
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the end-of-text position, [b, hidden].
    pub pooled: Tensor,
    /// `pooled @ text_projection^T`, [b, projection_dim]: only for a model with a projection.
    pub text_embeds: Option<Tensor>,
}

impl ClipOutput {
    /// The penultimate layer's output (before the final LayerNorm): what SDXL conditions on.
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len().saturating_sub(2)]
    }
}

/// A `LayerInfo` template for a text-encoder hook point; names and features are filled in later.
fn info(component: Component, kind: LayerKind, layer: usize, attention: Option<AttentionKind>) -> LayerInfo {
    LayerInfo {
        name: String::new(),
        kind,
        component,
        in_features: 0,
        out_features: 0,
        block: BlockPosition::TextLayer(layer),
        attention,
        conv: None,
    }
}

/// `self_attn`: q, k, v, out projections with bias, causal multi-head attention. The module is an
/// attention hook point.
#[derive(Debug, Clone)]
struct SelfAttention {
    index: LayerIndex,
    q_proj: HookedLinear,
    k_proj: HookedLinear,
    v_proj: HookedLinear,
    out_proj: HookedLinear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &ClipConfig, component: Component, layer: usize, registry: &mut HookRegistry) -> Result<Self> {
        let dim = config.hidden_size;
        let attention = Some(AttentionKind::SelfAttention);
        let mut module = info(component, LayerKind::Attention, layer, attention);
        module.name = format!("{}.{}", component.prefix(), vb.prefix());
        module.in_features = dim;
        module.out_features = dim;
        let index = registry.register_attention(module);
        let template = info(component, LayerKind::Linear, layer, attention);
        let mut proj = |name: &str| HookedLinear::new(vb.pp(name), dim, dim, true, registry, template.clone());
        Ok(Self {
            index,
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            out_proj: proj("out_proj")?,
            heads: config.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let q = self.q_proj.forward(x, hooks)?;
        let k = self.k_proj.forward(x, hooks)?;
        let v = self.v_proj.forward(x, hooks)?;
        let out = nn::attention(&q, &k, &v, self.heads, true, self.q_proj.weight_dtype())?;
        let out = self.out_proj.forward(&out, hooks)?;
        if hooks.attached(self.index) {
            hooks.attention(self.index, x, None, out)
        } else {
            Ok(out)
        }
    }
}

/// One encoder layer: `x + self_attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: HookedLinear,
    fc2: HookedLinear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &ClipConfig, component: Component, layer: usize, registry: &mut HookRegistry) -> Result<Self> {
        let (dim, inner, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        let self_attn = SelfAttention::new(vb.pp("self_attn"), config, component, layer, registry)?;
        let template = info(component, LayerKind::Linear, layer, None);
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), dim, eps)?,
            self_attn,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), dim, eps)?,
            fc1: HookedLinear::new(mlp.pp("fc1"), dim, inner, true, registry, template.clone())?,
            fc2: HookedLinear::new(mlp.pp("fc2"), inner, dim, true, registry, template)?,
            act: config.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, hooks)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?, hooks)?;
        let m = self.fc2.forward(&self.act.apply(&m)?, hooks)?;
        h + m
    }
}

/// A CLIP text encoder, with or without the (bias-free) text projection.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    registry: HookRegistry,
    /// The dtype it computes in ([`crate::precision::activation_dtype`]); outputs are f32.
    activations: DType,
}

impl ClipTextModel {
    /// `vb` is rooted at the weight file's root (keys `text_model.*`, `text_projection.weight`).
    /// `component` is `TextEncoder` or `TextEncoder2` and prefixes the hook point names.
    pub fn new(vb: VarBuilder, config: &ClipConfig, component: Component, with_projection: bool) -> Result<Self> {
        config.validate().map_err(|e| candle_core::Error::Msg(format!("{} config: {e}", component.prefix())))?;
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").get((config.vocab_size, dim), "weight")?;
        let position_embedding = emb.pp("position_embedding").get((config.max_position_embeddings, dim), "weight")?;
        let mut registry = HookRegistry::new();
        let layers_vb = tm.pp("encoder").pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(layers_vb.pp(i), config, component, i, &mut registry))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(tm.pp("final_layer_norm"), dim, eps)?;
        let text_projection =
            if with_projection { Some(Linear::new(vb.pp("text_projection"), dim, config.projection_dim, false)?) } else { None };
        let activations = crate::precision::activation_dtype(token_embedding.dtype(), token_embedding.device());
        Ok(Self {
            activations,
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            registry,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Computes in `dtype` from now on (default: [`crate::precision::activation_dtype`] of the
    /// weights); the outputs stay f32.
    pub fn set_activations(&mut self, dtype: DType) {
        self.activations = dtype;
    }

    /// The hook points, in registration order: for each layer `self_attn`, its four projections,
    /// `mlp.fc1`, `mlp.fc2`.
    pub fn registry(&self) -> &HookRegistry {
        &self.registry
    }

    /// `input_ids` [b, n] (u32 or i64, n <= `max_position_embeddings`).
    pub fn forward(&self, input_ids: &Tensor, hooks: &dyn Hooks) -> Result<ClipOutput> {
        let rows = self.read_ids(input_ids)?;
        let (b, n) = (rows.len(), rows[0].len());
        let device = self.token_embedding.device();
        let ids = Tensor::from_vec(rows.concat(), b * n, device)?;
        // The tables may be kept in half precision: the rows read are converted.
        let dt = self.activations;
        let tokens = self.token_embedding.index_select(&ids, 0)?.to_dtype(dt)?.reshape((b, n, self.config.hidden_size))?;
        let positions = self.position_embedding.narrow(0, 0, n)?.to_dtype(dt)?;
        let mut x = tokens.broadcast_add(&positions)?;

        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(f32(&x)?);
        for layer in &self.layers {
            x = layer.forward(&x, hooks)?;
            hidden_states.push(f32(&x)?);
        }
        let last_hidden_state = f32(&self.final_layer_norm.forward(&x)?)?;

        // The final-LN state at each row's end-of-text token.
        let flat: Vec<u32> = rows.iter().enumerate().map(|(i, r)| (i * n + self.eos_position(r)) as u32).collect();
        let flat = Tensor::from_vec(flat, b, device)?;
        let pooled = last_hidden_state.reshape((b * n, self.config.hidden_size))?.index_select(&flat, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput { hidden_states, last_hidden_state, pooled, text_embeds })
    }

    /// The pooled position: with the legacy `eos_token_id` 2 (the SDXL configs) the first position
    /// of the largest id, as transformers does (`<|endoftext|>` is the largest id); else the first
    /// position holding `eos_token_id` (0 when there is none, as transformers' argmax gives).
    fn eos_position(&self, row: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            let mut best = 0;
            for (i, &id) in row.iter().enumerate() {
                if id > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter().position(|&id| id == self.config.eos_token_id).unwrap_or(0)
        }
    }

    /// The ids as host rows, checked against the vocabulary and the position table.
    fn read_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
        let (b, n) = input_ids.dims2().map_err(|_| {
            candle_core::Error::Msg(format!("text encoder: input ids must be [batch, tokens], got shape {:?}", input_ids.dims()))
        })?;
        if b == 0 || n == 0 || n > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: input ids of shape [{b}, {n}]: need at least one row and 1..={} tokens",
                self.config.max_position_embeddings
            )
        }
        let ids = input_ids.to_device(&Device::Cpu)?;
        let rows: Vec<Vec<i64>> = match ids.dtype() {
            DType::U32 => ids.to_vec2::<u32>()?.into_iter().map(|r| r.into_iter().map(i64::from).collect()).collect(),
            DType::I64 => ids.to_vec2::<i64>()?,
            other => candle_core::bail!("text encoder: input ids must be u32 or i64, got {other:?}"),
        };
        let vocab = self.config.vocab_size as i64;
        rows.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|id| {
                        if (0..vocab).contains(&id) {
                            Ok(id as u32)
                        } else {
                            candle_core::bail!("text encoder: token id {id} is outside the vocabulary (size {vocab})")
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_configs_parse() {
        let te1 = ClipConfig::sdxl_text_encoder();
        assert_eq!((te1.hidden_size, te1.num_hidden_layers, te1.hidden_act), (768, 12, Activation::QuickGelu));
        let te2 = ClipConfig::sdxl_text_encoder_2();
        assert_eq!((te2.hidden_size, te2.num_hidden_layers, te2.hidden_act), (1280, 32, Activation::Gelu));
        assert_eq!((te2.projection_dim, te2.eos_token_id), (1280, 2));
    }

    #[test]
    fn bad_config_is_named() {
        let err = ClipConfig::from_json_str(r#"{"hidden_act": "relu6"}"#, "x/config.json").unwrap_err();
        assert!(err.to_string().contains("x/config.json"), "{err}");
        let err = ClipConfig::from_json_str(r#"{"hidden_size": 10, "num_attention_heads": 3}"#, "y").unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");
    }
}
