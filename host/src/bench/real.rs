//! Real-size SDXL pieces with random weights, batch 1.
//!
//! SDXL runs its 1280-channel blocks (the `down_blocks.2` / mid / `up_blocks.0` transformers, ten
//! transformer blocks each, and their resnets) at a quarter of the latent resolution: a 64x64
//! latent (512x512 image) gives 16x16 = 256 tokens, a 128x128 latent (1024x1024) gives 32x32 =
//! 1024 tokens. That is where these blocks are measured. Context: 77 tokens of 2048 features.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use graft_formats::{AdapterFile, AdapterFormat, LoadReport, ModuleWeights};
use graft_sdxl::hooks::{BlockPosition, HookRegistry, Hooks, LayerIndex, NoHooks};
use graft_sdxl::resnet::{ResnetBlock2D, ResnetConfig};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::unet::transformer::BasicTransformerBlock;

use graft_runtime::adapters::files::FileAdapters;
use graft_runtime::adapters::store::ParamStore;
use graft_runtime::plugins::{layers_to_abi, CallContext, StrategyInstance};
use graft_trainer::optim::{AdamW, GroupConfig};

use super::measure::{measure, measure_against, Measured};
use super::Ctx;

const DIM: usize = 1280;
const HEADS: usize = 20;
const CONTEXT_DIM: usize = 2048;
const RANK: usize = 8;
const ALPHA: f32 = 32.0;

/// Random N(0, 0.02) weights (norm weights 1): the content does not change the timing.
struct RandomWeights(Mutex<GraftRng>);

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if name.contains("norm") && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        (self.0.lock().expect("rng lock").randn(s, dev)? * 0.02)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn random_vb(seed: u64) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights(Mutex::new(GraftRng::new(seed))));
    VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
}

/// A 1280-wide transformer block; its hook points are `unet.block.attn1.to_q`, ...
fn block(seed: u64) -> anyhow::Result<(BasicTransformerBlock, HookRegistry)> {
    let mut registry = HookRegistry::new();
    let b = BasicTransformerBlock::new(random_vb(seed).pp("block"), DIM, CONTEXT_DIM, HEADS, &mut registry, BlockPosition::Mid)?;
    Ok((b, registry))
}

/// Hidden states [1, side*side, 1280] and context [1, 77, 2048].
fn block_inputs(side: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let mut rng = GraftRng::new(7);
    Ok((rng.randn((1, side * side, DIM), &Device::Cpu)?, rng.randn((1, 77, CONTEXT_DIM), &Device::Cpu)?))
}

fn block_forward(ctx: &Ctx, side: usize) -> anyhow::Result<Measured> {
    let (b, _) = block(1)?;
    let (x, c) = block_inputs(side)?;
    measure(2, ctx.runs(10), || {
        b.forward(&x, &c, &NoHooks)?;
        Ok(())
    })
}

pub fn block_16(ctx: &Ctx) -> anyhow::Result<Measured> {
    block_forward(ctx, 16)
}

pub fn block_32(ctx: &Ctx) -> anyhow::Result<Measured> {
    block_forward(ctx, 32)
}

/// The attention kernel alone: q, k, v [1, 1024, 1280] -> 20 heads, forward and backward.
pub fn attention_32(ctx: &Ctx) -> anyhow::Result<Measured> {
    let mut rng = GraftRng::new(10);
    let mut var = || -> anyhow::Result<candle_core::Var> { Ok(candle_core::Var::from_tensor(&rng.randn((1, 1024, DIM), &Device::Cpu)?)?) };
    let (q, k, v) = (var()?, var()?, var()?);
    measure(2, ctx.runs(10), || {
        graft_sdxl::nn::attention(&q, &k, &v, HEADS, false, DType::F32)?.sum_all()?.backward()?;
        Ok(())
    })
}

/// The 1024 px self-attention (4096 tokens of 640, 10 heads) with bf16 products, as in a bf16
/// model: forward and backward.
pub fn attention_64_bf16(ctx: &Ctx) -> anyhow::Result<Measured> {
    let mut rng = GraftRng::new(10);
    let mut var = || -> anyhow::Result<candle_core::Var> { Ok(candle_core::Var::from_tensor(&rng.randn((1, 4096, 640), &Device::Cpu)?)?) };
    let (q, k, v) = (var()?, var()?, var()?);
    let m = measure(2, ctx.runs(5), || {
        graft_sdxl::nn::attention(&q, &k, &v, 10, false, DType::BF16)?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(m.with("kernel", format!("{:?}", graft_sdxl::precision::bf16_kernel())))
}

fn resnet_forward(ctx: &Ctx, side: usize) -> anyhow::Result<Measured> {
    let cfg = ResnetConfig { in_channels: DIM, out_channels: DIM, temb_channels: Some(DIM), groups: 32, eps: 1e-5 };
    let r = ResnetBlock2D::new(random_vb(2), cfg)?;
    let mut rng = GraftRng::new(8);
    let x = rng.randn((1, DIM, side, side), &Device::Cpu)?;
    let temb = rng.randn((1, DIM), &Device::Cpu)?;
    measure(2, ctx.runs(10), || {
        r.forward(&x, Some(&temb))?;
        Ok(())
    })
}

pub fn resnet_16(ctx: &Ctx) -> anyhow::Result<Measured> {
    resnet_forward(ctx, 16)
}

pub fn resnet_32(ctx: &Ctx) -> anyhow::Result<Measured> {
    resnet_forward(ctx, 32)
}

/// The attention projections a LoRA targets (PEFT's and kohya's usual set).
pub fn is_lora_target(name: &str) -> bool {
    (name.contains(".attn1.") || name.contains(".attn2.")) && [".to_q", ".to_k", ".to_v", ".to_out.0"].iter().any(|s| name.ends_with(s))
}

/// A LoRA (rank 8, alpha 32, random factors) on every target linear of `registry`, as an
/// adapter file in memory.
pub fn lora_file(registry: &HookRegistry, seed: u64) -> anyhow::Result<AdapterFile> {
    let mut rng = GraftRng::new(seed);
    let mut modules = Vec::new();
    for l in registry.layers().iter().filter(|l| l.kind == graft_sdxl::LayerKind::Linear && is_lora_target(&l.name)) {
        let down = (rng.randn((RANK, l.in_features), &Device::Cpu)? * 0.01)?;
        let up = (rng.randn((l.out_features, RANK), &Device::Cpu)? * 0.01)?;
        modules.push(ModuleWeights::lora(l.name.clone(), down, up, Some(ALPHA)));
    }
    Ok(AdapterFile { format: AdapterFormat::Peft, metadata: BTreeMap::new(), modules })
}

pub fn empty_report(format: AdapterFormat) -> LoadReport {
    LoadReport { file: "bench".into(), format, attached: Vec::new(), unmatched_keys: Vec::new(), warnings: Vec::new(), native: None }
}

fn block_files(registry: &HookRegistry) -> anyhow::Result<FileAdapters> {
    let empty = HookRegistry::new();
    let mut files = FileAdapters::from_registries([registry, &empty, &empty], &SgmLayout::sdxl(), &Device::Cpu);
    files.add("bench", std::path::Path::new("bench"), lora_file(registry, 3)?, empty_report(AdapterFormat::Peft), 1.0, 1.0)?;
    Ok(files)
}

pub fn block_lora_unfused(ctx: &Ctx) -> anyhow::Result<Measured> {
    let (b, registry) = block(1)?;
    let files = block_files(&registry)?;
    let (x, c) = block_inputs(32)?;
    let hooks = files.hooks(graft_sdxl::PipelineHooks::none());
    let m = measure_against(
        2,
        ctx.runs(10),
        || {
            b.forward(&x, &c, &NoHooks)?;
            Ok(())
        },
        || {
            b.forward(&x, &c, &hooks.unet)?;
            Ok(())
        },
    )?;
    Ok(m.with("lora_layers", files.adapters()[0].file.modules.len()))
}

pub fn block_lora_fused(ctx: &Ctx) -> anyhow::Result<Measured> {
    let (base, _) = block(1)?;
    let (fused, registry) = block(1)?;
    let mut files = block_files(&registry)?;
    files.fuse()?;
    let (x, c) = block_inputs(32)?;
    let hooks = files.hooks(graft_sdxl::PipelineHooks::none());
    measure_against(
        2,
        ctx.runs(10),
        || {
            base.forward(&x, &c, &NoHooks)?;
            Ok(())
        },
        || {
            fused.forward(&x, &c, &hooks.unet)?;
            Ok(())
        },
    )
}

/// A strategy's `forward` at the hook points of one registry (what the adapter dispatcher does
/// for a whole model).
struct StrategyHooks<'a> {
    instance: &'a StrategyInstance,
    store: &'a ParamStore,
    registry: &'a HookRegistry,
    layers: Vec<graft_abi::LayerInfo>,
    attached: Vec<bool>,
    rng: Mutex<GraftRng>,
}

impl Hooks for StrategyHooks<'_> {
    fn attached(&self, layer: LayerIndex) -> bool {
        self.attached[layer]
    }
    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> candle_core::Result<Tensor> {
        let w = self.registry.linear_weights(layer).map(|w| w.read().expect("weights lock").clone());
        let mut rng = self.rng.lock().expect("rng lock");
        let mut cx = CallContext { store: self.store, rng: &mut rng, training: true, step: 0 };
        self.instance
            .forward_linear(&mut cx, &self.layers[layer], w.as_ref(), input, &base_out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
    fn attention(&self, _: LayerIndex, _: &Tensor, _: Option<&Tensor>, out: Tensor) -> candle_core::Result<Tensor> {
        Ok(out)
    }
}

/// Forward + backward + AdamW of the `lora` plugin (rank 8, alpha 32, q/k/v/out) on one
/// 1024-token transformer block, MSE against a random target.
pub fn block_train(ctx: &Ctx) -> anyhow::Result<Measured> {
    let (b, registry) = block(1)?;
    let manager = ctx.plugin_dirs.manager()?;
    let plugin = manager.require("lora")?;
    let mut instance = StrategyInstance::new(plugin, None, r#"{"rank": 8, "alpha": 32}"#)?;
    let layers = layers_to_abi(registry.layers());
    let plan = instance.plan(&layers)?;
    let store = ParamStore::new(&Device::Cpu, DType::F32, 1);
    store.apply_plan(instance.name(), &plan)?;
    let mut attached = vec![false; layers.len()];
    for a in plan.attachments.iter().filter(|a| a.attached) {
        if let Some(i) = registry.index_of(a.layer.as_str()) {
            attached[i] = true;
        }
    }
    let hooks = StrategyHooks { instance: &instance, store: &store, registry: &registry, layers, attached, rng: Mutex::new(GraftRng::new(2)) };
    let params: Vec<_> = store.params(None).into_iter().map(|(k, p)| (k.to_string(), p.var)).collect();
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(vec![(GroupConfig::new("unet", 1e-4).weight_decay(1e-2), params)])?;
    let (x, c) = block_inputs(32)?;
    let target = GraftRng::new(9).randn(x.shape(), &Device::Cpu)?;
    let m = measure(2, ctx.runs(6), || {
        let out = b.forward(&x, &c, &hooks)?;
        let loss = (out - &target)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let g = opt.gradients(&grads);
        opt.step(&g, 1.0)?;
        Ok(())
    })?;
    Ok(m.with("lora_parameters", n_params))
}
