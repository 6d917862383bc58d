//! Gradients reach everything attached to the text encoders: a small LoRA at every linear hook
//! point and a gated additive term at every attention hook point of both tiny encoders. Each
//! parameter must receive a non-zero gradient (candle 0.11's fused softmax / LayerNorm would
//! silently cut them).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use graft_sdxl::clip::{ClipConfig, ClipTextModel};
use graft_sdxl::hooks::{Component, HookRegistry, Hooks, LayerIndex, LayerKind, NoHooks};
use graft_sdxl::nn::linear;
use graft_sdxl::rng::GraftRng;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny(sub: &str, component: Component, with_projection: bool, dev: &Device) -> ClipTextModel {
    let dir = fixtures().join("tiny-sdxl").join(sub);
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = ClipConfig::from_json_str(&json, sub).unwrap();
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, dev) }.unwrap();
    ClipTextModel::new(vb, &config, component, with_projection).unwrap()
}

/// LoRA `base + up(down(x))` at linears, `out + gate * hidden` at attention modules.
struct Adapters {
    lora: HashMap<LayerIndex, (Var, Var)>,
    gates: HashMap<LayerIndex, Var>,
}

impl Adapters {
    fn everywhere(registry: &HookRegistry, rng: &mut GraftRng, dev: &Device) -> Self {
        let mut small = |shape: (usize, usize)| Var::from_tensor(&(rng.randn(shape, dev).unwrap() * 0.1).unwrap()).unwrap();
        let (mut lora, mut gates) = (HashMap::new(), HashMap::new());
        for (i, layer) in registry.layers().iter().enumerate() {
            match layer.kind {
                LayerKind::Linear => {
                    let down = small((2, layer.in_features));
                    let up = small((layer.out_features, 2));
                    lora.insert(i, (down, up));
                }
                LayerKind::Attention => {
                    gates.insert(i, Var::from_tensor(&Tensor::new(&[0.3f32], dev).unwrap()).unwrap());
                }
                LayerKind::Conv => panic!("the text encoders have no conv hook points"),
            }
        }
        Self { lora, gates }
    }

    fn vars(&self) -> Vec<(String, &Var)> {
        let mut v: Vec<(String, &Var)> = Vec::new();
        for (i, (down, up)) in &self.lora {
            v.push((format!("{i}.down"), down));
            v.push((format!("{i}.up"), up));
        }
        for (i, g) in &self.gates {
            v.push((format!("{i}.gate"), g));
        }
        v
    }
}

impl Hooks for Adapters {
    fn attached(&self, layer: LayerIndex) -> bool {
        self.lora.contains_key(&layer) || self.gates.contains_key(&layer)
    }
    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        let (down, up) = &self.lora[&layer];
        base_out + linear(&linear(input, down.as_tensor(), None)?, up.as_tensor(), None)?
    }
    fn attention(&self, layer: LayerIndex, hidden: &Tensor, context: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        assert!(context.is_none(), "text-encoder attention is self-attention");
        out + hidden.broadcast_mul(self.gates[&layer].as_tensor())?
    }
}

/// A fixed random weighting, so the loss depends on every output element.
fn weighted_sum(t: &Tensor, rng: &mut GraftRng) -> Tensor {
    let w = rng.randn(t.shape(), t.device()).unwrap();
    (t * w).unwrap().sum_all().unwrap()
}

fn check(sub: &str, component: Component, with_projection: bool) {
    let dev = Device::Cpu;
    let model = tiny(sub, component, with_projection, &dev);
    let layers = model.config().num_hidden_layers;
    assert_eq!(model.registry().len(), 7 * layers, "6 linears + 1 attention per layer");
    let mut rng = GraftRng::new(11);
    let adapters = Adapters::everywhere(model.registry(), &mut rng, &dev);

    let ids = Tensor::new(&[[998u32, 5, 17, 999, 999, 999], [998, 42, 999, 0, 0, 0]], &dev).unwrap();
    let plain = model.forward(&ids, &NoHooks).unwrap();
    let out = model.forward(&ids, &adapters).unwrap();
    let changed = (&out.pooled - &plain.pooled).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(changed > 1e-4, "{sub}: the adapters change nothing");

    // SDXL uses the penultimate state; the last layer is reached through text_embeds (bigG) or the
    // pooled state (ViT-L, whose last layer SDXL itself never uses).
    let head = out.text_embeds.as_ref().unwrap_or(&out.pooled);
    let loss = (weighted_sum(out.penultimate(), &mut rng) + weighted_sum(head, &mut rng)).unwrap();
    let grads = loss.backward().unwrap();
    let vars = adapters.vars();
    assert_eq!(vars.len(), 2 * 6 * layers + layers);
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{sub}: {name} got no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{sub}: {name} got a zero gradient");
    }
}

#[test]
fn every_text_encoder_adapter_gets_a_gradient() {
    check("text_encoder", Component::TextEncoder, false);
}

#[test]
fn every_text_encoder_2_adapter_gets_a_gradient() {
    check("text_encoder_2", Component::TextEncoder2, true);
}
