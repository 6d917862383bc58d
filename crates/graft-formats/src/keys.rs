//! Layer names across formats.
//!
//! graft names a layer by its diffusers module path with a component prefix:
//! `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`,
//! `text_encoder_2.text_model.encoder.layers.0.mlp.fc2`.
//!
//! kohya flattens the module path with `_` (`to_out.0` -> `to_out_0`) behind `lora_unet_`,
//! `lora_te1_`, `lora_te2_` (`lora_te_` in single text-encoder files). SDXL files name UNet modules
//! in the SGM layout (`input_blocks.4.1...`), some in the diffusers one (`down_blocks.1.attentions.0...`).
//! Because the underscores cannot be undone by rule (`to_out_0`, `ff_net_0_proj`,
//! `transformer_blocks`), [`KeyMap`] goes the other way: it spells every known layer in every
//! kohya form and looks names up.

use std::collections::{BTreeMap, HashMap};

use candle_core::{bail, Result};
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::{Component, LayerInfo, LayerKind};

/// Components in the order of the longest prefix first (`text_encoder_2` before `text_encoder`).
const COMPONENTS: [Component; 3] = [Component::TextEncoder2, Component::TextEncoder, Component::Unet];

/// Splits a graft layer name into its component and module path.
pub fn split_layer(name: &str) -> Option<(Component, &str)> {
    COMPONENTS.iter().find_map(|c| name.strip_prefix(c.prefix()).and_then(|rest| rest.strip_prefix('.')).map(|rest| (*c, rest)))
}

/// True for a UNet layer that is a convolution in every SDXL-family config: resnet `conv1`,
/// `conv2`, `conv_shortcut` and resampler `conv` (kohya's LoCon targets). Writers use it to store
/// a 1x1 conv's factors as kernels ([r, in, 1, 1]) as kohya and LyCORIS do.
pub fn is_unet_conv_name(layer: &str) -> bool {
    let Some(path) = layer.strip_prefix("unet.") else { return false };
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        [.., "resnets", _, last] => matches!(*last, "conv1" | "conv2" | "conv_shortcut"),
        [.., "downsamplers" | "upsamplers", _, "conv"] => true,
        _ => false,
    }
}

/// The kohya prefix of a component (`lora_unet_`, `lora_te1_`, `lora_te2_`).
pub fn kohya_prefix(component: Component) -> &'static str {
    match component {
        Component::Unet => "lora_unet_",
        Component::TextEncoder => "lora_te1_",
        Component::TextEncoder2 => "lora_te2_",
    }
}

/// A known layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub name: String,
    pub component: Component,
    /// (in, out) features when known.
    pub in_out: Option<(usize, usize)>,
    /// Linear, conv or attention hook point, when known (names alone: assumed linear).
    pub kind: Option<LayerKind>,
    /// A conv hook point's kernel (kh, kw).
    pub kernel: Option<(usize, usize)>,
}

impl LayerEntry {
    /// LoRA-family tensors (kohya, PEFT, LyCORIS) go on linear and conv layers.
    pub fn is_linear(&self) -> bool {
        self.kind != Some(LayerKind::Attention)
    }
}

/// The valid layers of a model and their names in every format.
#[derive(Debug, Clone)]
pub struct KeyMap {
    layout: SgmLayout,
    layers: BTreeMap<String, LayerEntry>,
    /// Every kohya spelling (with its `lora_*_` prefix) -> graft name.
    kohya: HashMap<String, String>,
}

impl KeyMap {
    /// From the hook points of a model (their shapes are checked against adapters).
    pub fn from_layers(layers: &[LayerInfo], layout: &SgmLayout) -> Self {
        Self::build(
            layers.iter().map(|l| (l.name.clone(), Some((l.in_features, l.out_features)), Some(l.kind), l.conv.map(|c| c.kernel))),
            layout,
        )
    }

    /// From layer names alone (no shape checks).
    pub fn from_names<S: AsRef<str>>(names: &[S], layout: &SgmLayout) -> Self {
        Self::build(names.iter().map(|n| (n.as_ref().to_string(), None, None, None)), layout)
    }

    fn build(
        items: impl Iterator<Item = (String, Option<(usize, usize)>, Option<LayerKind>, Option<(usize, usize)>)>,
        layout: &SgmLayout,
    ) -> Self {
        let mut layers = BTreeMap::new();
        let mut kohya = HashMap::new();
        for (name, in_out, kind, kernel) in items {
            let Some((component, path)) = split_layer(&name) else {
                continue;
            };
            if kind != Some(LayerKind::Attention) {
                for spelling in kohya_spellings(component, path, layout) {
                    kohya.entry(spelling).or_insert_with(|| name.clone());
                }
            }
            layers.insert(name.clone(), LayerEntry { name, component, in_out, kind, kernel });
        }
        Self { layout: layout.clone(), layers, kohya }
    }

    pub fn layout(&self) -> &SgmLayout {
        &self.layout
    }

    /// Any known hook point (linear or attention).
    pub fn layer(&self, name: &str) -> Option<&LayerEntry> {
        self.layers.get(name)
    }

    /// A known linear hook point (where LoRA-family tensors can go).
    pub fn linear(&self, name: &str) -> Option<&LayerEntry> {
        self.layers.get(name).filter(|l| l.is_linear())
    }

    pub fn layers(&self) -> impl Iterator<Item = &LayerEntry> {
        self.layers.values()
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// A kohya module name (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, SGM or
    /// diffusers spelling; `lora_te_`, `lora_te1_`, `lora_te2_`) -> graft layer name.
    pub fn from_kohya(&self, kohya_name: &str) -> Option<&str> {
        self.kohya.get(kohya_name).map(|s| s.as_str())
    }

    /// The longest known layer name that `key` starts with, followed by `.` (graft-native keys
    /// `<layer>.<param>`): (layer, param).
    pub fn split_native_key<'a>(&self, key: &'a str) -> Option<(&str, &'a str)> {
        let mut best: Option<(&str, &'a str)> = None;
        let mut end = key.len();
        // Try every `.` from the right: the first known prefix is the longest.
        while let Some(dot) = key[..end].rfind('.') {
            if let Some((name, _)) = self.layers.get_key_value(&key[..dot]) {
                best = Some((name.as_str(), &key[dot + 1..]));
                break;
            }
            end = dot;
        }
        best
    }
}

/// The kohya name graft writes for a layer: SGM module names for the UNet.
pub fn to_kohya(layer: &str, layout: &SgmLayout) -> Result<String> {
    let Some((component, path)) = split_layer(layer) else {
        bail!("`{layer}` is not a graft layer name (expected a unet., text_encoder. or text_encoder_2. prefix)");
    };
    let path = match component {
        Component::Unet => match layout.unet_module_to_sgm(path) {
            Some(p) => p,
            None => bail!("`{layer}` has no SGM module name in this UNet layout, so it has no kohya name"),
        },
        _ => path.to_string(),
    };
    Ok(format!("{}{}", kohya_prefix(component), path.replace('.', "_")))
}

/// Every kohya spelling of a layer.
fn kohya_spellings(component: Component, path: &str, layout: &SgmLayout) -> Vec<String> {
    let flat = path.replace('.', "_");
    let mut out = vec![format!("{}{flat}", kohya_prefix(component))];
    match component {
        Component::Unet => {
            if let Some(sgm) = layout.unet_module_to_sgm(path) {
                out.push(format!("lora_unet_{}", sgm.replace('.', "_")));
            }
        }
        // Single text-encoder files (SD 1.x style) say `lora_te_`.
        Component::TextEncoder => out.push(format!("lora_te_{flat}")),
        Component::TextEncoder2 => {}
    }
    out
}
