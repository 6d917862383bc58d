//! Hook points with an in-process LoRA: a zero-initialised adapter changes nothing, a trained one
//! equals its delta fused into the base weights, and restoring the base weights restores the model
//! exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use graft_sdxl::hooks::{Hooks, LayerIndex, NoHooks};
use graft_sdxl::nn::linear;
use graft_sdxl::rng::GraftRng;
use graft_sdxl::unet::{UNet, UNetConfig};
use graft_sdxl::varbuilder::TensorSource;

/// y = base + scale * up(down(x)) at the attached layers.
struct Lora {
    layers: HashMap<LayerIndex, (Tensor, Tensor, f64)>,
}

impl Hooks for Lora {
    fn attached(&self, layer: LayerIndex) -> bool {
        self.layers.contains_key(&layer)
    }
    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        let (down, up, scale) = &self.layers[&layer];
        base_out + (linear(&linear(input, down, None)?, up, None)? * *scale)?
    }
    fn attention(&self, _: LayerIndex, _: &Tensor, _: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        Ok(out)
    }
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl/unet")
}

fn tiny_unet() -> UNet {
    let config: UNetConfig = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let src = TensorSource::new(vec![fixture().join("diffusion_pytorch_model.safetensors")], "unet").unwrap();
    UNet::new(src.var_builder(&Device::Cpu), &config).unwrap()
}

fn inputs(rng: &mut GraftRng) -> [Tensor; 5] {
    let d = Device::Cpu;
    [
        rng.randn((2, 4, 8, 12), &d).unwrap(),
        Tensor::new(&[500f32, 20.0], &d).unwrap(),
        rng.randn((2, 77, 80), &d).unwrap(),
        rng.randn((2, 40), &d).unwrap(),
        Tensor::new(&[[64f32, 96., 0., 0., 64., 96.], [64., 96., 0., 0., 64., 96.]], &d).unwrap(),
    ]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn lora_at_hook_points_zero_init_fuse_and_restore() {
    let unet = tiny_unet();
    let mut rng = GraftRng::new(1);
    let [x, t, ctx, pooled, ids] = inputs(&mut rng);
    let run = |hooks: &dyn Hooks| unet.forward(&x, &t, &ctx, &pooled, &ids, hooks).unwrap();
    let base = run(&NoHooks);

    // Attach rank-4 adapters at every cross-attention projection.
    let targets: Vec<(LayerIndex, usize, usize)> = unet
        .registry()
        .layers()
        .iter()
        .enumerate()
        .filter(|(_, l)| l.name.contains(".attn2.") && [".to_q", ".to_k", ".to_v", ".to_out.0"].iter().any(|s| l.name.ends_with(s)))
        .map(|(i, l)| (i, l.in_features, l.out_features))
        .collect();
    let cross_attentions = unet.registry().layers().iter().filter(|l| l.name.ends_with(".attn2")).count();
    assert!(cross_attentions > 0);
    assert_eq!(targets.len(), 4 * cross_attentions);
    let d = Device::Cpu;
    let zero: HashMap<_, _> = targets
        .iter()
        .map(|&(i, fin, fout)| (i, (rng.randn((4, fin), &d).unwrap(), Tensor::zeros((fout, 4), DType::F32, &d).unwrap(), 2.0)))
        .collect();
    assert_eq!(max_diff(&run(&Lora { layers: zero }), &base), 0.0, "a zero-initialised LoRA must change nothing");

    let trained: HashMap<_, _> = targets
        .iter()
        .map(|&(i, fin, fout)| {
            let down = (rng.randn((4, fin), &d).unwrap() * 0.1).unwrap();
            let up = (rng.randn((fout, 4), &d).unwrap() * 0.1).unwrap();
            (i, (down, up, 2.0))
        })
        .collect();
    let lora = Lora { layers: trained };
    let with_lora = run(&lora);
    assert!(max_diff(&with_lora, &base) > 1e-3, "an attached LoRA must change the output");

    // Fuse: W + scale * up @ down pushed onto the registry's shared weights, then run unhooked.
    let holder = graft_sdxl::overrides::Holder::new("test fuse");
    let owner = holder.owner(None, graft_sdxl::overrides::OverrideKind::Fuse);
    for (&i, (down, up, scale)) in &lora.layers {
        let shared = unet.registry().linear_weights(i).unwrap();
        let mut w = shared.current();
        w.weight = w.plus(&(up.matmul(down).unwrap() * *scale).unwrap()).unwrap();
        shared.push(owner.clone(), w).unwrap();
    }
    let fused = run(&NoHooks);
    assert!(max_diff(&fused, &with_lora) < 1e-4, "fused {}", max_diff(&fused, &with_lora));

    // Unfuse by popping: exactly the base model again.
    for &i in lora.layers.keys() {
        unet.registry().linear_weights(i).unwrap().pop(&owner).unwrap();
    }
    assert_eq!(max_diff(&run(&NoHooks), &base), 0.0);
}
