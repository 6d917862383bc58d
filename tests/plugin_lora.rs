//! The `lora` strategy plugin, built with cargo and loaded by the host's plugin manager: its plan
//! on the tiny fixture model and on the full SDXL layer list, and its forward, delta weight,
//! export and dropouts through the host ops, checked against the same math written in candle.

#[path = "plugins_common.rs"]
mod common;


use candle_core::{DType, Device, Tensor};
use common::{max_diff, sdxl_layers, single_plugin_manager, tiny_layers};
use graft_host::adapters::store::{ParamKey, ParamStore};
use graft_host::plugins::{CallContext, PluginManager, StrategyInstance};
use graft_sdxl::rng::GraftRng;

fn lora_manager(test: &str) -> PluginManager {
    single_plugin_manager("lora", test)
}

fn strategy(m: &PluginManager, config: &str) -> StrategyInstance {
    StrategyInstance::new(m.require("lora").expect("lora plugin loaded"), None, config).expect("strategy")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

const PROJECTIONS: [&str; 4] = [".to_q", ".to_k", ".to_v", ".to_out.0"];

/// The UNet attention projections of a layer list, counted independently of the plugin.
fn unet_projections(layers: &[graft_abi::LayerInfo]) -> Vec<&graft_abi::LayerInfo> {
    layers
        .iter()
        .filter(|l| l.is_linear() && l.name().starts_with("unet.") && PROJECTIONS.iter().any(|p| l.name().ends_with(p)))
        .collect()
}

/// Checks every attachment: down [r, in] kaiming-uniform(sqrt 5), up [out, r] zeros, in `group`.
fn check_attachments(plan: &graft_abi::Plan, layers: &[graft_abi::LayerInfo], rank: u64) {
    for a in plan.attachments.iter() {
        let l = layers.iter().find(|l| l.name() == a.layer.as_str()).unwrap();
        let group = if l.name().starts_with("unet.") { "unet" } else { "text_encoder" };
        assert_eq!(a.params.len(), 2, "{}", a.layer);
        let (down, up) = (&a.params[0], &a.params[1]);
        assert_eq!((down.name.as_str(), up.name.as_str()), ("down", "up"));
        assert_eq!(down.shape.as_slice(), &[rank, l.in_features], "{}", a.layer);
        assert_eq!(up.shape.as_slice(), &[l.out_features, rank], "{}", a.layer);
        assert_eq!(down.init, graft_abi::Init::kaiming_uniform(5f64.sqrt()));
        assert_eq!(up.init, graft_abi::Init::zeros());
        assert!(down.trainable && up.trainable && a.attached);
        assert_eq!((down.group.as_str(), up.group.as_str()), (group, group));
    }
}

fn group(plan: &graft_abi::Plan, name: &str) -> (f64, f64, Option<f64>) {
    let g = plan.groups.iter().find(|g| g.name.as_str() == name).unwrap_or_else(|| panic!("no group {name}"));
    (g.lr, g.weight_decay, g.clip_norm.into_option())
}

#[test]
fn plans_on_the_tiny_model_and_on_sdxl() {
    let m = lora_manager("plugin-lora-plans");

    // Tiny model: 17 transformer blocks (down 1 + 2 x 2, mid 2, up 6 + 3) x 2 attentions x 4.
    let tiny = tiny_layers();
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&tiny).expect("plan");
    let want: Vec<&str> = unet_projections(&tiny).iter().map(|l| l.name()).collect();
    let got: Vec<&str> = plan.attachments.iter().map(|a| a.layer.as_str()).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 17 * 2 * 4);
    assert!(got.iter().any(|n| n.ends_with("attn1.to_q")) && got.iter().any(|n| n.ends_with("attn2.to_out.0")));
    check_attachments(&plan, &tiny, 8);
    assert_eq!(plan.groups.len(), 1);
    assert_eq!(group(&plan, "unet"), (1e-4, 0.01, None));
    assert!(plan.unfreeze.is_empty() && plan.stages.is_empty());

    // SDXL base: 70 transformer blocks (down 2x2 + 2x10, mid 10, up 3x10 + 3x2) x 2 x 4 = 560.
    let sdxl = sdxl_layers();
    let plan = strategy(&m, "{}").plan(&sdxl).expect("plan");
    assert_eq!(plan.attachments.len(), 560);
    assert_eq!(unet_projections(&sdxl).len(), 560);
    check_attachments(&plan, &sdxl, 8);
    // A cross-attention to_k reads the 2048-wide text embeddings; the deepest blocks are 1280 wide.
    let k = plan.attachments.iter().find(|a| a.layer.as_str() == "unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_k").unwrap();
    assert_eq!(k.params[0].shape.as_slice(), &[8, 2048]);
    assert_eq!(k.params[1].shape.as_slice(), &[1280, 8]);

    // With the text encoders: + 12 (CLIP-L) and 32 (bigG) layers x 4 self-attention projections.
    let cfg = r#"{"train_text_encoder": true, "rank": 4, "alpha": 2, "unet_lr": 2e-4, "weight_decay": 0, "clip_norm": 1.0}"#;
    let plan = strategy(&m, cfg).plan(&sdxl).expect("plan");
    assert_eq!(plan.attachments.len(), 560 + 12 * 4 + 32 * 4);
    check_attachments(&plan, &sdxl, 4);
    let te1 = plan.attachments.iter().filter(|a| a.layer.starts_with("text_encoder.")).count();
    let te2 = plan.attachments.iter().filter(|a| a.layer.starts_with("text_encoder_2.")).count();
    assert_eq!((te1, te2), (48, 128));
    assert!(plan.attachments.iter().any(|a| a.layer.as_str() == "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"));
    assert!(!plan.attachments.iter().any(|a| a.layer.contains("mlp")));
    assert_eq!(group(&plan, "unet"), (2e-4, 0.0, Some(1.0)));
    assert_eq!(group(&plan, "text_encoder"), (5e-5, 0.0, Some(1.0)));

    // Explicit patterns: attn2 key/value only, mid block excluded.
    let plan = strategy(&m, r#"{"targets": ["unet.*.attn2.to_[kv]", "!unet.mid_block.*"]}"#).plan(&sdxl).expect("plan");
    assert_eq!(plan.attachments.len(), 60 * 2);
}

#[test]
fn initial_values_follow_the_inits() -> candle_core::Result<()> {
    let m = lora_manager("plugin-lora-init");
    let layers = tiny_layers();
    for (config, gaussian) in [("{}", false), (r#"{"rank": 4, "init": "gaussian"}"#, true)] {
        let mut s = strategy(&m, config);
        let plan = s.plan(&layers).expect("plan");
        let store = ParamStore::new(&Device::Cpu, DType::F32, 21);
        store.apply_plan(s.name(), &plan)?;
        let (mut all, mut bound_max) = (Vec::new(), 0f32);
        for a in plan.attachments.iter() {
            let down = store.get(&ParamKey::new("lora", &a.layer, "down")).unwrap().var.as_tensor().clone();
            let up = store.get(&ParamKey::new("lora", &a.layer, "up")).unwrap().var.as_tensor().clone();
            assert!(values(&up).iter().all(|&v| v == 0.0), "up of {} starts at zero", a.layer);
            let d = values(&down);
            if !gaussian {
                // kaiming-uniform(a = sqrt 5): U(±1/sqrt(in)).
                let bound = 1.0 / (down.dim(1)? as f32).sqrt();
                assert!(d.iter().all(|v| v.abs() <= bound), "{}", a.layer);
                bound_max = bound_max.max(d.iter().fold(0f32, |m, v| m.max(v.abs() / bound)));
            }
            all.extend(d);
        }
        let n = all.len() as f32;
        let std = (all.iter().map(|v| v * v).sum::<f32>() / n).sqrt();
        if gaussian {
            assert!((std - 0.25).abs() < 0.01, "gaussian down std {std}, want 1/r = 0.25");
        } else {
            assert!(bound_max > 0.99, "uniform samples reach the bound");
        }
    }
    Ok(())
}

struct Case {
    store: ParamStore,
    layer: graft_abi::LayerInfo,
    x: Tensor,
    w: Tensor,
    base_out: Tensor,
    down: Tensor,
    up: Tensor,
}

/// A planned tiny-model cross-attention `to_k` with random non-zero `down` and `up` set through
/// the store, a random input [2, 5, in] and base weight and bias.
fn case(s: &mut StrategyInstance, seed: u64) -> Case {
    let layers = tiny_layers();
    let plan = s.plan(&layers).expect("plan");
    let store = ParamStore::new(&Device::Cpu, DType::F32, 3);
    store.apply_plan(s.name(), &plan).unwrap();
    let name = "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k";
    let layer = layers.iter().find(|l| l.name() == name).unwrap().clone();
    let (inf, outf) = (layer.in_features as usize, layer.out_features as usize);
    let r = plan.attachments.iter().find(|a| a.layer.as_str() == name).unwrap().params[0].shape[0] as usize;
    let mut rng = GraftRng::new(seed);
    let dev = Device::Cpu;
    let down = rng.randn((r, inf), &dev).unwrap();
    let up = rng.randn((outf, r), &dev).unwrap();
    store.set(&ParamKey::new(s.name(), name, "down"), &down).unwrap();
    store.set(&ParamKey::new(s.name(), name, "up"), &up).unwrap();
    let x = rng.randn((2, 5, inf), &dev).unwrap();
    let w = rng.randn((outf, inf), &dev).unwrap();
    let b = rng.randn(outf, &dev).unwrap();
    let base_out = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    Case { store, layer, x, w, base_out, down, up }
}

fn forward(s: &StrategyInstance, c: &Case, rng: &mut GraftRng, training: bool) -> Tensor {
    let mut cx = CallContext { store: &c.store, rng, training, step: 1 };
    s.forward_linear(&mut cx, &c.layer, Some(&c.w.clone().into()), &c.x, &c.base_out).expect("forward")
}

/// `m * scale * up(down(x))` in candle.
fn lora_term(c: &Case, lx_mask: Option<&Tensor>, m_scale: f64) -> Tensor {
    let mut lx = c.x.broadcast_matmul(&c.down.t().unwrap()).unwrap();
    if let Some(mask) = lx_mask {
        lx = lx.broadcast_mul(mask).unwrap();
    }
    (lx.broadcast_matmul(&c.up.t().unwrap()).unwrap() * m_scale).unwrap()
}

#[test]
fn forward_delta_weight_and_export_match_candle() -> candle_core::Result<()> {
    let m = lora_manager("plugin-lora-forward");
    for (config, m_scale, alpha_out, up_scale) in [
        (r#"{"rank": 4, "alpha": 6, "multiplier": 0.7}"#, 0.7 * 6.0 / 4.0, 6.0, 0.7),
        (r#"{"rank": 4, "alpha": 6, "use_rslora": true}"#, 6.0 / 2.0, 12.0, 1.0),
        (r#"{"rank": 8, "alpha": 0}"#, 1.0, 8.0, 1.0),
    ] {
        let mut s = strategy(&m, config);
        let c = case(&mut s, 5);
        let mut rng = GraftRng::new(1);

        // Forward = base_out + m * scale * up(down(x)), in training (no dropout configured) and not.
        let want = (&c.base_out + lora_term(&c, None, m_scale))?;
        for training in [false, true] {
            let y = forward(&s, &c, &mut rng, training);
            assert!(max_diff(&y, &want) < 1e-4, "{config}: {}", max_diff(&y, &want));
        }

        // Every parameter gets a gradient.
        let y = forward(&s, &c, &mut rng, true);
        let grads = y.sqr()?.sum_all()?.backward()?;
        for p in ["down", "up"] {
            let v = c.store.get(&ParamKey::new("lora", c.layer.name(), p)).unwrap().var;
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {p}"));
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{p}");
        }

        // delta_weight @ x = forward - base_out, and it is m * scale * up @ down.
        let mut cx = CallContext { store: &c.store, rng: &mut rng, training: false, step: 0 };
        let dw = s.delta_weight(&mut cx, &c.layer, Some(&c.w.clone().into())).expect("delta_weight").expect("lora is linear");
        assert!(max_diff(&dw, &(c.up.matmul(&c.down)? * m_scale)?) < 1e-5);
        let via_dw = c.x.broadcast_matmul(&dw.t()?)?;
        assert!(max_diff(&via_dw, &(&want - &c.base_out)?) < 1e-4);

        // Export: down as is, the multiplier folded into up, alpha such that alpha / r = scale.
        let ex = s.export(&mut cx, &c.layer, Some(&c.w.clone().into())).expect("export").expect("exported");
        assert_eq!(ex.family, "lora");
        assert_eq!(ex.alpha, Some(alpha_out));
        let t = |n: &str| ex.tensors.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert!(max_diff(&t("down"), &c.down) == 0.0);
        assert!(max_diff(&t("up"), &(&c.up * up_scale)?) < 1e-6);
        let r = c.down.dim(0)? as f64;
        let from_file = (t("up").matmul(&t("down"))? * (alpha_out / r))?;
        assert!(max_diff(&from_file, &dw) < 1e-5, "an exported file reproduces the delta weight");
    }
    Ok(())
}

#[test]
fn zero_initialised_up_leaves_the_output_unchanged() -> candle_core::Result<()> {
    let m = lora_manager("plugin-lora-zero");
    let layers = tiny_layers();
    let mut s = strategy(&m, r#"{"dropout": 0.3, "rank_dropout": 0.2}"#);
    let plan = s.plan(&layers).expect("plan");
    let store = ParamStore::new(&Device::Cpu, DType::F32, 3);
    store.apply_plan(s.name(), &plan)?;
    let mut rng = GraftRng::new(2);
    for a in plan.attachments.iter().step_by(7) {
        let l = layers.iter().find(|l| l.name() == a.layer.as_str()).unwrap();
        let (inf, outf) = (l.in_features as usize, l.out_features as usize);
        let x = rng.randn((2, 3, inf), &Device::Cpu)?;
        let w = rng.randn((outf, inf), &Device::Cpu)?;
        let base_out = x.broadcast_matmul(&w.t()?)?;
        for training in [false, true] {
            let mut rng2 = GraftRng::new(8);
            let mut cx = CallContext { store: &store, rng: &mut rng2, training, step: 0 };
            let y = s.forward_linear(&mut cx, l, Some(&w.clone().into()), &x, &base_out).expect("forward");
            assert_eq!(values(&y), values(&base_out), "{} (training {training})", a.layer);
        }
    }
    Ok(())
}

/// The host's dropout, drawn the same way: keep where u >= p, scaled by 1 / (1 - p).
fn keep_mask(rng: &mut GraftRng, shape: &[usize], p: f64) -> Tensor {
    let u = rng.rand(shape, &Device::Cpu).unwrap();
    u.ge(p).unwrap().to_dtype(DType::F32).unwrap().affine(1.0 / (1.0 - p), 0.0).unwrap()
}

#[test]
fn dropouts_follow_kohya_only_in_training_and_are_seeded() -> candle_core::Result<()> {
    let m = lora_manager("plugin-lora-dropout");
    let (md, nd, rd) = (0.3, 0.2, 0.4);
    let config = format!(r#"{{"rank": 4, "alpha": 8, "module_dropout": {md}, "dropout": {nd}, "rank_dropout": {rd}}}"#);
    let mut s = strategy(&m, &config);
    let c = case(&mut s, 6);
    let plain = (&c.base_out + lora_term(&c, None, 2.0))?;

    // Inference: no dropout of any kind, and the RNG is not touched.
    let mut rng = GraftRng::new(4);
    let before = rng.state();
    for _ in 0..5 {
        assert!(max_diff(&forward(&s, &c, &mut rng, false), &plain) < 1e-4);
    }
    assert_eq!(rng.state(), before, "inference draws nothing");

    // Training, replayed with the same seed: per call, one module draw; if kept, a neuron mask
    // over down(x) [2, 5, r] and a rank mask [2, 1, r] shared over the sequence.
    let mut host = GraftRng::new(11);
    let mut replay = GraftRng::new(11);
    let (mut skipped, mut kept) = (0, 0);
    for call in 0..40 {
        let y = forward(&s, &c, &mut host, true);
        let u = replay.rand(1, &Device::Cpu)?.to_vec1::<f32>()?[0] as f64;
        let want = if u < md {
            skipped += 1;
            c.base_out.clone()
        } else {
            kept += 1;
            let neuron = keep_mask(&mut replay, &[2, 5, 4], nd);
            let rank = keep_mask(&mut replay, &[2, 1, 4], rd);
            (&c.base_out + lora_term(&c, Some(&neuron.broadcast_mul(&rank)?), 2.0))?
        };
        assert!(max_diff(&y, &want) < 1e-4, "call {call}: {}", max_diff(&y, &want));
    }
    assert!(skipped > 3 && kept > 15, "module dropout skips some calls: {skipped} skipped, {kept} kept");
    assert_eq!(host.state(), replay.state(), "the plugin drew exactly what kohya's forward draws");

    // The same seed gives the same outputs; another seed other ones.
    let run = |seed: u64| -> Vec<Vec<f32>> {
        let mut rng = GraftRng::new(seed);
        (0..6).map(|_| values(&forward(&s, &c, &mut rng, true))).collect()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    Ok(())
}

#[test]
fn manifest_and_config_errors() {
    let m = lora_manager("plugin-lora-config");
    let p = m.require("lora").unwrap();
    assert_eq!(p.manifest.id, "lora");
    assert!(p.manifest.capabilities.iter().any(|c| c == "delta_weight"));
    assert!(p.manifest.capabilities.iter().any(|c| c == "export:lora"));
    // The config example is the defaults written out, and a strategy accepts it.
    let mut a = StrategyInstance::new(p, None, &p.manifest.config_example).expect("config example");
    let mut b = strategy(&m, "");
    let layers = tiny_layers();
    assert_eq!(a.plan(&layers).unwrap(), b.plan(&layers).unwrap());

    let e = StrategyInstance::new(p, None, r#"{"rank": 8, "alpah": 16}"#).unwrap_err();
    assert_eq!(e.kind, graft_abi::ErrorKind::CONFIG);
    let text = e.to_string();
    assert!(text.contains("strategy `lora`") && text.contains("unknown field `alpah`"), "{text}");
    let e = StrategyInstance::new(p, None, r#"{"rank_dropout": 1.5}"#).unwrap_err().to_string();
    // The host checks the config against the plugin's schema first, naming the key.
    assert!(e.contains("key `rank_dropout`: 1.5 is out of range (must be < 1)"), "{e}");
    let e = strategy(&m, r#"{"targets": ["unet.*.to_kk"]}"#).plan(&layers).unwrap_err().to_string();
    assert!(e.contains("failed in plan") && e.contains("`unet.*.to_kk` matches no linear hook point"), "{e}");
}
