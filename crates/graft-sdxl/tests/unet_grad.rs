//! Gradients reach every hook point of the tiny UNet: a LoRA on every linear hook point and a gated
//! additive term on every attention hook point must all receive a non-zero gradient. This catches
//! a non-differentiable op (softmax, layer norm, resampling) anywhere downstream of a hook.

use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use graft_sdxl::hooks::{Hooks, LayerIndex, LayerKind};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::unet::{UNet, UNetConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

enum Adapter {
    /// y = base + up(down(x))
    Lora { down: Var, up: Var },
    /// out = out + gate * hidden
    Gate { gate: Var },
}

struct TestHooks {
    adapters: Vec<Adapter>,
}

impl TestHooks {
    fn new(unet: &UNet, dev: &Device) -> Result<Self> {
        let mut rng = GraftRng::new(7);
        let rank = 2;
        let mut adapters = Vec::new();
        for layer in unet.registry().layers() {
            adapters.push(match layer.kind {
                LayerKind::Linear => Adapter::Lora {
                    down: Var::from_tensor(&(rng.randn((rank, layer.in_features), dev)? * 0.1)?)?,
                    // Non-zero (unlike a real LoRA's init) so that `down` gets a gradient too.
                    up: Var::from_tensor(&(rng.randn((layer.out_features, rank), dev)? * 0.1)?)?,
                },
                LayerKind::Attention => Adapter::Gate { gate: Var::new(0.1f32, dev)? },
            });
        }
        Ok(Self { adapters })
    }

    fn vars(&self) -> Vec<(&str, &Var)> {
        self.adapters
            .iter()
            .flat_map(|a| match a {
                Adapter::Lora { down, up } => vec![("down", down), ("up", up)],
                Adapter::Gate { gate } => vec![("gate", gate)],
            })
            .collect()
    }
}

impl Hooks for TestHooks {
    fn attached(&self, _layer: LayerIndex) -> bool {
        true
    }

    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        let Adapter::Lora { down, up } = &self.adapters[layer] else {
            candle_core::bail!("layer {layer} is not a linear")
        };
        let delta = graft_sdxl::nn::linear(&graft_sdxl::nn::linear(input, down.as_tensor(), None)?, up.as_tensor(), None)?;
        base_out + delta
    }

    fn attention(&self, layer: LayerIndex, hidden: &Tensor, _context: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        let Adapter::Gate { gate } = &self.adapters[layer] else {
            candle_core::bail!("layer {layer} is not an attention")
        };
        out + hidden.broadcast_mul(gate.as_tensor())?
    }
}

#[test]
fn every_hook_point_gets_a_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-sdxl/unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev) }?;
    let unet = UNet::new(vb, &config)?;
    let hooks = TestHooks::new(&unet, &dev)?;

    let reference = safetensors::load(fixtures().join("reference/unet.safetensors"), &dev)?;
    let mut loss = Tensor::new(0f32, &dev)?;
    // Both the exact x2 upsampling and the odd-size one (gathered rows and columns).
    for prefix in ["", "odd."] {
        let get = |k: &str| reference.get(&format!("{prefix}{k}")).expect("fixture tensor");
        let out = unet.forward(
            get("sample"),
            get("timesteps"),
            get("encoder_hidden_states"),
            get("text_embeds"),
            get("time_ids"),
            &hooks,
        )?;
        loss = (loss + (out - get("out"))?.sqr()?.mean_all()?)?;
    }
    let grads = loss.backward()?;

    let names = unet.registry().layers();
    let mut missing = Vec::new();
    let mut layer = 0;
    for adapter in &hooks.adapters {
        let vars: Vec<(&str, &Var)> = match adapter {
            Adapter::Lora { down, up } => vec![("down", down), ("up", up)],
            Adapter::Gate { gate } => vec![("gate", gate)],
        };
        for (what, var) in vars {
            let norm = match grads.get(var.as_tensor()) {
                Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()?,
                None => 0.0,
            };
            if norm == 0.0 || !norm.is_finite() {
                missing.push(format!("{} {what} ({norm})", names[layer].name));
            }
        }
        layer += 1;
    }
    println!("{} vars over {} hook points", hooks.vars().len(), names.len());
    assert!(missing.is_empty(), "no gradient for: {missing:#?}");
    Ok(())
}
