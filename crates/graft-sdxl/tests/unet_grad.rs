//! Gradients reach every hook point of the tiny UNet: a LoRA on every linear hook point, a kernel
//! difference on every conv hook point and a gated additive term on every attention hook point
//! must all receive a non-zero gradient. This catches
//! a non-differentiable op (softmax, layer norm, resampling) anywhere downstream of a hook. A
//! finite-difference check then verifies the size of a gradient that flows back through the
//! odd-size resamplers.

use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use graft_sdxl::hooks::{Hooks, LayerIndex, LayerKind};
use graft_sdxl::nn::linear;
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
    /// out = conv(x, W + delta): base + conv(x, delta) with the layer's stride
    Conv { delta: Var, stride: usize },
}

impl Adapter {
    fn vars(&self) -> Vec<(&'static str, &Var)> {
        match self {
            Adapter::Lora { down, up } => vec![("lora_down", down), ("lora_up", up)],
            Adapter::Gate { gate } => vec![("gate", gate)],
            Adapter::Conv { delta, .. } => vec![("delta", delta)],
        }
    }
}

/// One adapter per hook point, all attached.
struct TestHooks {
    adapters: Vec<Adapter>,
}

impl TestHooks {
    fn new(unet: &UNet, dtype: DType, dev: &Device) -> Result<Self> {
        let mut rng = GraftRng::new(7);
        let rank = 2;
        let mut randn = |rows: usize, cols: usize| -> Result<Var> { Var::from_tensor(&(rng.randn((rows, cols), dev)? * 0.1)?.to_dtype(dtype)?) };
        let mut adapters = Vec::new();
        for layer in unet.registry().layers() {
            adapters.push(match layer.kind {
                LayerKind::Linear => Adapter::Lora {
                    down: randn(rank, layer.in_features)?,
                    // Non-zero (unlike a real LoRA's init) so that `down` gets a gradient too.
                    up: randn(layer.out_features, rank)?,
                },
                LayerKind::Attention => Adapter::Gate { gate: Var::from_tensor(&Tensor::new(0.1f32, dev)?.to_dtype(dtype)?)? },
                LayerKind::Conv => {
                    let g = layer.conv.expect("conv geometry");
                    let shape = (layer.out_features, layer.in_features, g.kernel.0, g.kernel.1);
                    let flat = randn(shape.0, shape.1 * shape.2 * shape.3)?;
                    let delta = Var::from_tensor(&(flat.as_tensor().reshape(shape)? * 0.1)?)?;
                    Adapter::Conv { delta, stride: g.stride }
                }
            });
        }
        Ok(Self { adapters })
    }
}

impl Hooks for TestHooks {
    fn attached(&self, _layer: LayerIndex) -> bool {
        true
    }

    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        let Adapter::Lora { down, up } = &self.adapters[layer] else { candle_core::bail!("layer {layer} is not a linear") };
        base_out + linear(&linear(input, down.as_tensor(), None)?, up.as_tensor(), None)?
    }

    fn conv(&self, layer: LayerIndex, input: &Tensor, padding: usize, base_out: Tensor) -> Result<Tensor> {
        let Adapter::Conv { delta, stride } = &self.adapters[layer] else { candle_core::bail!("layer {layer} is not a conv") };
        base_out + input.conv2d(delta.as_tensor(), padding, *stride, 1, 1)?
    }

    fn attention(&self, layer: LayerIndex, hidden: &Tensor, _context: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        let Adapter::Gate { gate } = &self.adapters[layer] else { candle_core::bail!("layer {layer} is not an attention") };
        out + hidden.broadcast_mul(gate.as_tensor())?
    }
}

fn tiny_unet(dtype: DType, dev: &Device) -> Result<UNet> {
    let dir = fixtures().join("tiny-sdxl/unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, dev) }?;
    UNet::new(vb, &config)
}

/// Mean squared distance to the reference outputs, summed over the fixture cases named by `prefixes`
/// ("" = [2,4,12,16] with exact x2 resampling, "odd." = [1,4,7,9] with sized upsampling).
fn loss(unet: &UNet, hooks: &dyn Hooks, prefixes: &[&str], dtype: DType, dev: &Device) -> Result<Tensor> {
    let reference = safetensors::load(fixtures().join("reference/unet.safetensors"), dev)?;
    let mut loss = Tensor::new(0f32, dev)?.to_dtype(dtype)?;
    for prefix in prefixes {
        let get = |k: &str| reference.get(&format!("{prefix}{k}")).unwrap_or_else(|| panic!("fixture has no {prefix}{k}")).to_dtype(dtype);
        let out =
            unet.forward(&get("sample")?, &get("timesteps")?, &get("encoder_hidden_states")?, &get("text_embeds")?, &get("time_ids")?, hooks)?;
        loss = (loss + (out - get("out")?)?.sqr()?.mean_all()?)?;
    }
    Ok(loss)
}

#[test]
fn every_hook_point_gets_a_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let unet = tiny_unet(DType::F32, &dev)?;
    let hooks = TestHooks::new(&unet, DType::F32, &dev)?;
    let grads = loss(&unet, &hooks, &["", "odd."], DType::F32, &dev)?.backward()?;

    let layers = unet.registry().layers();
    let mut missing = Vec::new();
    let mut count = 0;
    for (layer, adapter) in layers.iter().zip(&hooks.adapters) {
        for (what, var) in adapter.vars() {
            count += 1;
            let norm = match grads.get(var.as_tensor()) {
                Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()?,
                None => 0.0,
            };
            if norm == 0.0 || !norm.is_finite() {
                missing.push(format!("{} {what} ({norm})", layer.name));
            }
        }
    }
    println!("{count} vars over {} hook points", layers.len());
    assert!(missing.is_empty(), "no gradient for: {missing:#?}");
    Ok(())
}

/// The gate of the first attention of `down_blocks.1` influences the output through the mixed
/// parity downsampler (4x5 -> 2x3) and both sized upsamplers: its gradient must match a central
/// finite difference (in f64).
#[test]
fn gradient_matches_finite_difference() -> Result<()> {
    let dev = Device::Cpu;
    let dtype = DType::F64;
    let unet = tiny_unet(dtype, &dev)?;
    let hooks = TestHooks::new(&unet, dtype, &dev)?;
    let index = unet.registry().index_of("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1").expect("attention hook point");
    let Adapter::Gate { gate } = &hooks.adapters[index] else { panic!("not a gate") };

    let grads = loss(&unet, &hooks, &["odd."], dtype, &dev)?.backward()?;
    let analytic = grads.get(gate.as_tensor()).expect("gate gradient").to_scalar::<f64>()?;

    let g0 = gate.as_tensor().to_scalar::<f64>()?;
    let eps = 1e-4;
    let at = |g: f64| -> Result<f64> {
        gate.set(&Tensor::new(g, &dev)?)?;
        loss(&unet, &hooks, &["odd."], dtype, &dev)?.to_scalar::<f64>()
    };
    let numeric = (at(g0 + eps)? - at(g0 - eps)?) / (2.0 * eps);
    println!("gate gradient: analytic {analytic:e}, finite difference {numeric:e}");
    assert!((analytic - numeric).abs() <= 1e-5 * numeric.abs().max(1e-3), "analytic {analytic} vs finite difference {numeric}");
    Ok(())
}
