//! The `attention-gate` strategy plugin, built with cargo and loaded by the host's plugin
//! manager: its plan on the tiny fixture model and on the full SDXL layer list, its forward
//! through the host ops against the same math in candle, and its learning rates and
//! per-parameter clipping as the host's AdamW applies them.

use crate::plugins_common as common;

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_diff, sdxl_layers, single_plugin_manager, tiny_layers};
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{CallContext, PluginManager, StrategyInstance};
use graft_sdxl::rng::GraftRng;
use graft_trainer::optim::{AdamW, Gradients, GroupConfig};

const ID: &str = "attention-gate";

fn gate_manager(test: &str) -> PluginManager {
    single_plugin_manager("attention-gate", test)
}

fn strategy(m: &PluginManager, config: &str) -> StrategyInstance {
    StrategyInstance::new(m.require(ID).expect("attention-gate plugin loaded"), None, config).expect("strategy")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn norm(t: &Tensor) -> f64 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

/// Checks a default plan against the layer list: every UNet cross-attention module patched with
/// A [8, dim] ~ N(0, 0.02), B [dim, 8] = 0, gate [1] = 1 in group `adapter` (5e-4, clip 0.1), and
/// exactly its four projections unfrozen at 1e-5. Returns the number of patched modules.
fn check_default_plan(plan: &graft_abi::Plan, layers: &[graft_abi::LayerInfo]) -> usize {
    let modules: Vec<&graft_abi::LayerInfo> = layers
        .iter()
        .filter(|l| l.is_attention() && l.name().starts_with("unet.") && l.attention == graft_abi::AttentionKind::CROSS_ATTENTION)
        .collect();
    let attached: Vec<&str> = plan.attachments.iter().map(|a| a.layer.as_str()).collect();
    assert_eq!(attached, modules.iter().map(|l| l.name()).collect::<Vec<_>>());
    for (a, l) in plan.attachments.iter().zip(&modules) {
        assert!(a.layer.ends_with(".attn2") && a.attached);
        let dim = l.in_features;
        let specs: Vec<(&str, &[u64], graft_abi::Init, &str, bool)> =
            a.params.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), s.init, s.group.as_str(), s.trainable)).collect();
        assert_eq!(
            specs,
            vec![
                ("A", &[8, dim][..], graft_abi::Init::normal(0.0, 0.02), "adapter", true),
                ("B", &[dim, 8][..], graft_abi::Init::zeros(), "adapter", true),
                ("gate", &[1][..], graft_abi::Init::constant(1.0), "adapter", true),
            ],
            "{}",
            a.layer
        );
    }

    let groups: Vec<(&str, f64, f64, Option<f64>)> =
        plan.groups.iter().map(|g| (g.name.as_str(), g.lr, g.weight_decay, g.clip_norm.into_option())).collect();
    assert_eq!(groups, vec![("adapter", 5e-4, 0.0, Some(0.1)), ("base", 1e-5, 0.0, None)]);

    let unfrozen: BTreeSet<String> = plan.unfreeze.iter().map(|u| u.layer.to_string()).collect();
    let want: BTreeSet<String> =
        modules.iter().flat_map(|m| ["to_q", "to_k", "to_v", "to_out.0"].map(|p| format!("{}.{p}", m.name()))).collect();
    assert_eq!(unfrozen, want);
    assert_eq!(plan.unfreeze.len(), 4 * modules.len(), "no projection listed twice");
    assert!(plan.unfreeze.iter().all(|u| u.lr == 1e-5 && u.weight_decay == 0.0 && u.bias));
    modules.len()
}

#[test]
fn plans_on_the_tiny_model_and_on_sdxl() {
    let m = gate_manager("plugin-gate-plans");

    // Tiny model: 17 transformer blocks, one cross-attention each.
    let tiny = tiny_layers();
    let plan = strategy(&m, "{}").plan(&tiny).expect("plan");
    assert_eq!(check_default_plan(&plan, &tiny), 17);

    // SDXL base: 70 transformer blocks -> 70 attn2 modules, 280 unfrozen projections.
    let sdxl = sdxl_layers();
    let plan = strategy(&m, "").plan(&sdxl).expect("plan");
    assert_eq!(check_default_plan(&plan, &sdxl), 70);
    assert_eq!(plan.unfreeze.len(), 280);
    let mid = plan.attachments.iter().find(|a| a.layer.as_str() == "unet.mid_block.attentions.0.transformer_blocks.0.attn2").unwrap();
    assert_eq!(mid.params[0].shape.as_slice(), &[8, 1280]);
    let first = plan.attachments.iter().find(|a| a.layer.as_str() == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2").unwrap();
    assert_eq!(first.params[1].shape.as_slice(), &[640, 8]);

    // Options: self- and cross-attention, another rank and gate, base kept frozen.
    let cfg = r#"{"targets": ["unet.up_blocks.*.attn?"], "rank": 4, "gate_init": 0.25, "unfreeze": [], "adapter_lr": 1e-3}"#;
    let plan = strategy(&m, cfg).plan(&sdxl).expect("plan");
    assert_eq!(plan.attachments.len(), 2 * (30 + 6));
    assert!(plan.unfreeze.is_empty());
    assert_eq!(plan.groups.len(), 1);
    assert_eq!((plan.groups[0].lr, plan.groups[0].clip_norm.into_option()), (1e-3, Some(0.1)));
    assert_eq!(plan.attachments[0].params[2].init, graft_abi::Init::constant(0.25));
}

#[test]
fn initial_values_follow_the_inits() -> graft_runtime::Result<()> {
    let m = gate_manager("plugin-gate-init");
    let layers = tiny_layers();
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&layers).expect("plan");
    let store = ParamStore::new(&Device::Cpu, DType::F32, 17);
    store.apply_plan(s.name(), &plan)?;
    let mut a_all = Vec::new();
    for a in plan.attachments.iter() {
        let get = |n: &str| values(store.get(&ParamKey::new(ID, &a.layer, n)).unwrap().var.as_tensor());
        a_all.extend(get("A"));
        assert!(get("B").iter().all(|&v| v == 0.0));
        assert_eq!(get("gate"), vec![1.0]);
    }
    let n = a_all.len() as f32;
    let mean = a_all.iter().sum::<f32>() / n;
    let std = (a_all.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt();
    assert!(mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3, "A: mean {mean}, std {std} over {n} values");
    Ok(())
}

/// A planned tiny-model cross-attention with its hidden states [2, 6, dim], context
/// [2, 4, ctx] and dimensions.
struct Case {
    store: ParamStore,
    layer: graft_abi::LayerInfo,
    dim: usize,
    ctx_dim: usize,
    h: Tensor,
    ctx: Tensor,
}

const MODULE: &str = "unet.up_blocks.0.attentions.2.transformer_blocks.1.attn2";

fn case(s: &mut StrategyInstance, seed: u64) -> Case {
    let layers = tiny_layers();
    let plan = s.plan(&layers).expect("plan");
    let store = ParamStore::new(&Device::Cpu, DType::F32, 3);
    store.apply_plan(s.name(), &plan).unwrap();
    let layer = layers.iter().find(|l| l.name() == MODULE).unwrap().clone();
    let to_k = layers.iter().find(|l| l.name() == format!("{MODULE}.to_k")).unwrap();
    let (dim, ctx_dim) = (layer.in_features as usize, to_k.in_features as usize);
    let mut rng = GraftRng::new(seed);
    let h = rng.randn((2, 6, dim), &Device::Cpu).unwrap();
    let ctx = rng.randn((2, 4, ctx_dim), &Device::Cpu).unwrap();
    Case { store, layer, dim, ctx_dim, h, ctx }
}

fn set(c: &Case, name: &str, value: &Tensor) {
    c.store.set(&ParamKey::new(ID, c.layer.name(), name), value).unwrap();
}

fn var(c: &Case, name: &str) -> Var {
    c.store.get(&ParamKey::new(ID, c.layer.name(), name)).unwrap().var
}

#[test]
fn forward_matches_candle_and_zero_b_is_the_identity() -> graft_runtime::Result<()> {
    let m = gate_manager("plugin-gate-forward");
    let mut s = strategy(&m, "{}");
    let c = case(&mut s, 5);
    let mut rng = GraftRng::new(7);
    let out = rng.randn((2, 6, c.dim), &Device::Cpu)?;

    // Fresh parameters: B = 0, so the output is exactly the attention's.
    for training in [false, true] {
        let mut cx = CallContext { store: &c.store, rng: &mut rng, training, step: 0 };
        let y = s.forward_attention(&mut cx, &c.layer, &c.h, Some(&c.ctx), &out).expect("forward");
        assert_eq!(values(&y), values(&out));
    }

    // Random A, B and gate: out + g * B(A h).
    let a = rng.randn((8, c.dim), &Device::Cpu)?;
    let b = rng.randn((c.dim, 8), &Device::Cpu)?;
    let g = Tensor::new(&[0.7f32], &Device::Cpu)?;
    set(&c, "A", &a);
    set(&c, "B", &b);
    set(&c, "gate", &g);
    let want = (&out + (c.h.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * 0.7)?)?;
    let mut cx = CallContext { store: &c.store, rng: &mut rng, training: true, step: 1 };
    let y = s.forward_attention(&mut cx, &c.layer, &c.h, Some(&c.ctx), &out).expect("forward");
    assert!(max_diff(&y, &want) < 1e-4, "{}", max_diff(&y, &want));

    // A, B and the gate all get a gradient.
    let grads = y.sqr()?.sum_all()?.backward()?;
    for p in ["A", "B", "gate"] {
        let gr = grads.get(var(&c, p).as_tensor()).unwrap_or_else(|| panic!("no gradient for {p}"));
        assert!(norm(gr) > 0.0, "{p}");
    }

    // Not linear in a layer's input: no delta weight. Exports A, B and the gate natively.
    assert!(s.delta_weight(&mut cx, &c.layer, None).expect("delta_weight").is_none());
    let ex = s.export(&mut cx, &c.layer, None).expect("export").expect("exported");
    assert_eq!(ex.family, "native");
    let names: Vec<&str> = ex.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["A", "B", "gate"]);
    assert_eq!(values(&ex.tensors[0].1), values(&a));
    assert_eq!(values(&ex.tensors[1].1), values(&b));
    assert_eq!(values(&ex.tensors[2].1), vec![0.7]);
    Ok(())
}

/// A differentiable softmax over the last dimension.
fn softmax(x: &Tensor) -> Tensor {
    let e = x.broadcast_sub(&x.max_keepdim(candle_core::D::Minus1).unwrap().detach()).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap()).unwrap()
}

#[test]
fn learning_rates_and_per_parameter_clipping_through_adamw() -> anyhow::Result<()> {
    let m = gate_manager("plugin-gate-adamw");
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&tiny_layers()).expect("plan");
    let c = case(&mut s, 9);
    let dev = Device::Cpu;
    let mut rng = GraftRng::new(12);
    // B non-zero so that A has a gradient too.
    set(&c, "B", &(rng.randn((c.dim, 8), &dev)? * 0.5)?);

    // The base projections as trainable Vars, the way the host unfreezes them.
    let mut base = Vec::new();
    for (p, shape) in [
        ("to_q", vec![c.dim, c.dim]),
        ("to_k", vec![c.dim, c.ctx_dim]),
        ("to_v", vec![c.dim, c.ctx_dim]),
        ("to_out.0", vec![c.dim, c.dim]),
        ("to_out.0.bias", vec![c.dim]),
    ] {
        base.push((format!("{MODULE}.{p}"), Var::from_tensor(&(rng.randn(shape, &dev)? * 0.2)?)?));
    }
    let w = |i: usize| base[i].1.as_tensor().clone();

    // One-head attention over the context, then the plugin's patch.
    let q = c.h.broadcast_matmul(&w(0).t()?)?;
    let k = c.ctx.broadcast_matmul(&w(1).t()?)?;
    let v = c.ctx.broadcast_matmul(&w(2).t()?)?;
    let att = softmax(&(q.matmul(&k.t()?)? / (c.dim as f64).sqrt())?);
    let out = att.matmul(&v)?.broadcast_matmul(&w(3).t()?)?.broadcast_add(&w(4))?;
    let mut cx = CallContext { store: &c.store, rng: &mut rng, training: true, step: 1 };
    let y = s.forward_attention(&mut cx, &c.layer, &c.h, Some(&c.ctx), &out).expect("forward");
    let store_grads = (y.sqr()?.sum_all()? * 10.0)?.backward()?;

    // The optimizer built from the plan: the adapter group, and the base group of the unfrozen
    // projections (their lr and weight decay come from the plan's BaseUnfreeze entries).
    let g = plan.groups.iter().find(|g| g.name.as_str() == "adapter").unwrap();
    let adapter = GroupConfig::new("adapter", g.lr).weight_decay(g.weight_decay).clip_norm(g.clip_norm.into_option());
    let u = plan.unfreeze.iter().find(|u| u.layer.as_str() == format!("{MODULE}.to_q")).unwrap();
    assert!(plan.unfreeze.iter().filter(|x| x.layer.starts_with(MODULE)).all(|x| x == u || (x.lr == u.lr && x.bias)));
    let base_group = GroupConfig::new("base", u.lr).weight_decay(u.weight_decay);
    let adapter_params: Vec<(String, Var)> = ["A", "B", "gate"].iter().map(|p| (p.to_string(), var(&c, p))).collect();
    let mut opt = AdamW::new(vec![(adapter, adapter_params.clone()), (base_group, base.clone())])?;

    let mut grads = Gradients::new();
    let mut want_sq = 0f64;
    let mut before = Vec::new();
    for (name, v) in adapter_params.iter().chain(base.iter()) {
        let gr = store_grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).clone();
        let n = norm(&gr).sqrt();
        let adapter = adapter_params.iter().any(|(a, _)| a == name);
        if adapter && name != "gate" {
            assert!(n > 0.1, "{name}'s gradient norm {n} is above the clip, so the test sees clipping");
        }
        // Per-parameter clipping: each adapter gradient on its own to norm 0.1.
        want_sq += if adapter { n.min(0.1).powi(2) } else { n * n };
        grads.insert(name.clone(), gr);
        before.push(v.as_tensor().copy()?);
    }
    let report = opt.step(&grads, 1.0)?;
    assert!(!report.skipped);
    assert!((report.clipped_norm - want_sq.sqrt()).abs() < 1e-4 * want_sq.sqrt(), "{} vs {}", report.clipped_norm, want_sq.sqrt());

    // Adam's first step moves each element by about lr: 5e-4 for the adapter, 1e-5 for the base.
    for ((name, v), old) in adapter_params.iter().chain(base.iter()).zip(&before) {
        let lr = if adapter_params.iter().any(|(a, _)| a == name) { 5e-4 } else { 1e-5 };
        let step = (v.as_tensor() - old)?.abs()?;
        let largest = step.max_all()?.to_scalar::<f32>()? as f64;
        // 1%: the f32 rounding of a value near 0.5 is about 3e-8, 0.3% of a 1e-5 step.
        assert!((largest - lr).abs() < 1e-2 * lr, "{name}: largest step {largest}, lr {lr}");
    }
    Ok(())
}

#[test]
fn manifest_and_config_errors() {
    let m = gate_manager("plugin-gate-config");
    let p = m.require(ID).unwrap();
    assert_eq!(p.manifest.id, ID);
    assert!(!p.manifest.capabilities.iter().any(|c| c == "delta_weight"));
    let layers = tiny_layers();
    let mut a = StrategyInstance::new(p, None, &p.manifest.config_example).expect("config example");
    assert_eq!(a.plan(&layers).unwrap(), strategy(&m, "{}").plan(&layers).unwrap(), "the example is the defaults");

    let e = StrategyInstance::new(p, None, r#"{"gate_int": 0.5}"#).unwrap_err();
    assert_eq!(e.kind, graft_abi::ErrorKind::CONFIG);
    let text = e.to_string();
    assert!(text.contains("strategy `attention-gate`") && text.contains("unknown field `gate_int`"), "{text}");
    let e = strategy(&m, r#"{"targets": ["unet.*.attn2.to_q"]}"#).plan(&layers).unwrap_err().to_string();
    assert!(e.contains("failed in plan") && e.contains("no attention hook point matches"), "{e}");
    let e = strategy(&m, r#"{"unfreeze": ["to_qq"]}"#).plan(&layers).unwrap_err().to_string();
    assert!(e.contains("attn2.to_qq` is not a linear hook point"), "{e}");
}
