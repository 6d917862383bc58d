//! The `lora` strategy plugin, built with cargo and loaded by the host's plugin manager: its plan
//! on the tiny fixture model and on the full SDXL layer list, and its forward, delta weight,
//! export and dropouts through the host ops, checked against the same math written in candle.

use crate::plugins_common as common;

use candle_core::{DType, Device, Tensor};
use common::{max_diff, sdxl_layers, single_plugin_manager, tiny_layers};
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{CallContext, PluginManager, StrategyInstance};
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
    layers.iter().filter(|l| l.is_linear() && l.name().starts_with("unet.") && PROJECTIONS.iter().any(|p| l.name().ends_with(p))).collect()
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
fn initial_values_follow_the_inits() -> graft_runtime::Result<()> {
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
fn forward_delta_weight_and_export_match_candle() -> graft_runtime::Result<()> {
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
fn zero_initialised_up_leaves_the_output_unchanged() -> graft_runtime::Result<()> {
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
fn dropouts_follow_kohya_only_in_training_and_are_seeded() -> graft_runtime::Result<()> {
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

// ------------------------------------------------------------------------------------------------
// Conv adapters (LoCon, Tucker)

/// The conv hook points of a layer list.
fn convs(layers: &[graft_abi::LayerInfo]) -> Vec<&graft_abi::LayerInfo> {
    layers.iter().filter(|l| l.is_conv()).collect()
}

fn kernel(l: &graft_abi::LayerInfo) -> (usize, usize) {
    let g = l.conv().expect("conv geometry");
    (g.kernel[0] as usize, g.kernel[1] as usize)
}

/// `Σ_ab up[o, a] mid[a, b, h, w] down[b, i]` one kernel position at a time.
fn tucker_by_position(up: &Tensor, mid: &Tensor, down: &Tensor) -> Tensor {
    let (_, _, kh, kw) = mid.dims4().unwrap();
    let mut cols = Vec::new();
    for h in 0..kh {
        for w in 0..kw {
            let core = mid.narrow(2, h, 1).unwrap().narrow(3, w, 1).unwrap().squeeze(3).unwrap().squeeze(2).unwrap();
            cols.push(up.matmul(&core).unwrap().matmul(down).unwrap()); // [out, in]
        }
    }
    let (out, inp) = cols[0].dims2().unwrap();
    Tensor::stack(&cols, 2).unwrap().reshape((out, inp, kh, kw)).unwrap()
}

#[test]
fn conv_adapters_plan_delta_and_export() -> graft_runtime::Result<()> {
    let m = lora_manager("plugin-lora-conv");
    let tiny = tiny_layers();
    let conv_layers = convs(&tiny);
    // The tiny UNet: 3 down blocks x 2 resnets + 2 downsamplers, mid 2 resnets, 3 up blocks x 3
    // resnets + 2 upsamplers; conv1 and conv2 each, shortcuts where the widths change.
    assert_eq!(conv_layers.iter().filter(|l| l.name().ends_with(".conv1")).count(), 6 + 2 + 9);
    assert_eq!(conv_layers.iter().filter(|l| l.name().ends_with("samplers.0.conv")).count(), 4);
    assert!(conv_layers.iter().all(|l| l.name().starts_with("unet.")));

    // conv_rank 0 (the default): no conv adapter; conv_rank > 0: every conv hook point.
    assert!(strategy(&m, "{}").plan(&tiny).unwrap().attachments.iter().all(|a| !a.layer.contains("resnets")));
    let mut s = strategy(&m, r#"{"targets": [], "conv_rank": 4, "conv_alpha": 2, "multiplier": 0.5}"#);
    let plan = s.plan(&tiny).expect("plan");
    assert_eq!(plan.attachments.len(), conv_layers.len());
    for a in plan.attachments.iter() {
        let l = layers_find(&tiny, &a.layer);
        let (kh, kw) = kernel(l);
        assert_eq!(a.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["down", "up"]);
        assert_eq!(a.params[0].shape.as_slice(), &[4, l.in_features * (kh * kw) as u64], "{}", a.layer);
        assert_eq!(a.params[1].shape.as_slice(), &[l.out_features, 4]);
        assert_eq!(a.params[0].init, graft_abi::Init::kaiming_uniform(5f64.sqrt()));
        assert_eq!(a.params[1].init, graft_abi::Init::zeros());
    }
    // Tucker: a [r, r*kh*kw] core on the 3x3 convs only, beside the linear LoRA.
    let mut t = strategy(&m, r#"{"conv_rank": 2, "conv_alpha": 0, "use_tucker": true}"#);
    let tplan = t.plan(&tiny).expect("plan");
    assert_eq!(tplan.attachments.len(), 17 * 2 * 4 + conv_layers.len());
    let conv1 = tplan.attachments.iter().find(|a| a.layer.as_str() == "unet.down_blocks.1.resnets.0.conv1").unwrap();
    assert_eq!(
        conv1.params.iter().map(|p| (p.name.as_str(), p.shape.to_vec())).collect::<Vec<_>>(),
        [("down", vec![2, 32]), ("mid", vec![2, 18]), ("up", vec![48, 2])]
    );
    let sc = tplan.attachments.iter().find(|a| a.layer.as_str() == "unet.down_blocks.1.resnets.0.conv_shortcut").unwrap();
    assert_eq!(sc.params.len(), 2, "1x1: no Tucker core");

    // delta_weight and export on random parameters, against the math written here.
    let mut rng = GraftRng::new(4);
    let dev = Device::Cpu;
    for (s, plan, scale, alpha) in [(&s, &plan, 0.5 * 2.0 / 4.0, 2.0), (&t, &tplan, 1.0, 2.0)] {
        let store = ParamStore::new(&dev, DType::F32, 3);
        store.apply_plan(s.name(), plan)?;
        for (key, p) in store.params(Some(s.name())) {
            store.set(&key, &rng.randn(p.dims(), &dev)?)?;
        }
        for name in
            ["unet.down_blocks.1.resnets.0.conv1", "unet.down_blocks.1.resnets.0.conv_shortcut", "unet.down_blocks.0.downsamplers.0.conv"]
        {
            let l = layers_find(&tiny, name);
            let (kh, kw) = kernel(l);
            let (inf, outf) = (l.in_features as usize, l.out_features as usize);
            let get = |p: &str| store.get(&ParamKey::new(s.name(), name, p)).unwrap().var.as_tensor().clone();
            let (down, up) = (get("down"), get("up"));
            let r = up.dim(1)?;
            let tucker = store.get(&ParamKey::new(s.name(), name, "mid")).is_some();
            let want = if tucker {
                let mid = get("mid").reshape((r, r, kh, kw))?;
                (tucker_by_position(&up, &mid, &down) * scale)?
            } else {
                (up.matmul(&down)?.reshape((outf, inf, kh, kw))? * scale)?
            };
            let w = rng.randn((outf, inf, kh, kw), &dev)?;
            let mut rng2 = GraftRng::new(1);
            let mut cx = CallContext { store: &store, rng: &mut rng2, training: false, step: 0 };
            let dw = s.delta_weight(&mut cx, l, Some(&w.clone().into())).expect("delta_weight").expect("a conv delta");
            assert_eq!(dw.dims(), [outf, inf, kh, kw]);
            assert!(max_diff(&dw, &want) < 1e-5, "{name}: {}", max_diff(&dw, &want));

            // kohya / LyCORIS LoCon shapes, the multiplier in up, alpha = conv_alpha (0: r).
            let ex = s.export(&mut cx, l, Some(&w.into())).expect("export").expect("exported");
            assert_eq!((ex.family.as_str(), ex.alpha), ("lora", Some(alpha)));
            let shape = |n: &str| ex.tensors.iter().find(|(k, _)| k == n).map(|(_, t)| t.dims().to_vec());
            assert_eq!(shape("up"), Some(vec![outf, r, 1, 1]));
            if tucker {
                assert_eq!((shape("down"), shape("mid")), (Some(vec![r, inf, 1, 1]), Some(vec![r, r, kh, kw])));
            } else {
                assert_eq!((shape("down"), shape("mid")), (Some(vec![r, inf, kh, kw]), None));
            }
        }
    }

    // Config errors are named.
    let e = StrategyInstance::new(m.require("lora").unwrap(), None, r#"{"use_tucker": true}"#).err().unwrap().to_string();
    assert!(e.contains("`use_tucker`") && e.contains("conv_rank"), "{e}");
    let e = strategy(&m, r#"{"conv_rank": 2, "conv_targets": ["unet.*.convv"]}"#).plan(&tiny).unwrap_err().to_string();
    assert!(e.contains("`unet.*.convv` matches no conv hook point"), "{e}");
    Ok(())
}

fn layers_find<'a>(layers: &'a [graft_abi::LayerInfo], name: &str) -> &'a graft_abi::LayerInfo {
    layers.iter().find(|l| l.name() == name).unwrap_or_else(|| panic!("no layer {name}"))
}

/// A training config on the tiny model with the shapes dataset.
fn train_config(dir: &std::path::Path, steps: u64, strategy: &str) -> std::path::PathBuf {
    graft_tests::write_shapes_dataset(&dir.join("data"), 4, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"locon\"\nseed = 3\nsteps = {steps}\n\
         lr_schedule = \"constant\"\n\n[dataset]\ndir = \"data\"\nresolution = 64\n\n[strategy]\n{strategy}\n",
        graft_tests::tiny_model().to_str().unwrap()
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn locon_training_zero_init_eject_and_export() {
    use graft_trainer::config::TrainConfig;
    use graft_trainer::trainer::Trainer;
    let m = lora_manager("plugin-lora-locon-train");
    let dir = graft_tests::scratch("plugin_lora_locon_train");
    // Conv adapters only: what the loss does is theirs.
    let config = train_config(&dir, 20, "plugin = \"lora\"\nconfig = { targets = [], conv_rank = 4, conv_alpha = 4, unet_lr = 0.01 }");
    let mut t = Trainer::new(TrainConfig::from_file(&config).unwrap(), m, &Device::Cpu).unwrap();
    let s = t.strategy;
    let attached = t.set.strategies()[s].plan.attachments.len();
    assert_eq!(attached, convs(t.set.layers()).len());

    // Zero-initialised up: the adapted model is the base model.
    let with_adapter = t.eval_loss(9).unwrap();
    let base = {
        let mut empty = graft_runtime::adapters::dispatcher::AdapterSet::new(&t.model, 0);
        std::mem::swap(&mut t.set, &mut empty);
        let l = t.eval_loss(9).unwrap();
        std::mem::swap(&mut t.set, &mut empty);
        l
    };
    assert_eq!(with_adapter, base, "a zero-initialised conv adapter changes nothing");
    let mut losses = Vec::new();
    for _ in 0..20 {
        let r = t.train_step().unwrap();
        assert!(!r.skipped && r.loss.is_finite(), "{r:?}");
        losses.push(r.loss);
    }
    let after = t.eval_loss(9).unwrap();
    println!("LoCon eval loss: {base:.5} -> {after:.5}; step losses {losses:.4?}");
    assert!(after < base * 0.97, "eval loss {base} -> {after}");

    // The export: kohya LoCon keys only (no PEFT file), read back to the set's deltas.
    let files = graft_trainer::session::export_for(&t).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    let raw = graft_formats::read::read_file(&files[0]).unwrap();
    let conv1 = "lora_unet_input_blocks_1_0_in_layers_2";
    assert_eq!(raw.tensors[&format!("{conv1}.lora_down.weight")].dims(), [4, 32, 3, 3]);
    assert_eq!(raw.tensors[&format!("{conv1}.lora_up.weight")].dims(), [32, 4, 1, 1]);
    assert_eq!(raw.tensors[&format!("{conv1}.alpha")].dims(), [0usize; 0]);
    assert_eq!(raw.tensors["lora_unet_input_blocks_4_0_skip_connection.lora_down.weight"].dims(), [4, 32, 1, 1]);
    assert_eq!(raw.tensors["lora_unet_input_blocks_3_0_op.lora_down.weight"].dims(), [4, 32, 3, 3]);
    assert_eq!(raw.tensors.len(), attached * 3);
    let args: serde_json::Value = serde_json::from_str(&raw.metadata["ss_network_args"]).unwrap();
    assert_eq!((args["conv_dim"].as_str(), args["conv_alpha"].as_str()), (Some("4"), Some("4.0")));
    let layout = graft_sdxl::sgm::SgmLayout::from_configs(&t.model.config.unet, &t.model.config.vae, &t.model.config.text_encoder_2).unwrap();
    let host_layers: Vec<graft_sdxl::LayerInfo> = t.model.layers().into_iter().cloned().collect();
    let keys = graft_formats::KeyMap::from_layers(&host_layers, &layout);
    let (file, report) = graft_formats::read_adapter(&files[0], &keys).unwrap();
    assert_eq!(file.format, graft_formats::AdapterFormat::Kohya);
    assert!(report.unmatched_keys.is_empty() && report.warnings.is_empty(), "{}", report.summary());
    assert_eq!(file.modules.len(), attached);
    record_for_check("graft_locon", &files[0], &file, &t.set, s, &layout);

    // Eject: the base model again, exactly.
    t.set.eject(s).unwrap();
    assert_eq!(t.eval_loss(9).unwrap(), base, "eject restores the base model");
}

/// Checks that every module of `file` gives the set's delta at its layer, and puts the file and
/// those deltas into target/locon-export-check/ for tools/reference/check_lora_files.py
/// --check-locon (diffusers and the LyCORIS library load it there): `<stem>.safetensors`,
/// `<stem>.expected.safetensors` (graft layer -> delta) and `<stem>.names.json` (kohya module
/// name -> graft layer).
fn record_for_check(
    stem: &str,
    path: &std::path::Path,
    file: &graft_formats::AdapterFile,
    set: &graft_runtime::adapters::dispatcher::AdapterSet,
    s: graft_runtime::adapters::dispatcher::StrategyId,
    layout: &graft_sdxl::sgm::SgmLayout,
) {
    let check = common::workspace().join("target/locon-export-check");
    std::fs::create_dir_all(&check).unwrap();
    let mut expected = std::collections::HashMap::new();
    let mut names = serde_json::Map::new();
    for module in &file.modules {
        let g = set.layer_id(&module.layer).unwrap();
        let want = set.delta(s, g).unwrap().unwrap();
        let got = module.delta_weight(1.0).unwrap().reshape(want.shape()).unwrap();
        let d = max_diff(&got, &want);
        assert!(d <= 1e-5 * (1.0 + want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()), "{}: {d}", module.layer);
        expected.insert(module.layer.clone(), want);
        names.insert(graft_formats::to_kohya(&module.layer, layout).unwrap(), module.layer.clone().into());
    }
    std::fs::copy(path, check.join(format!("{stem}.safetensors"))).unwrap();
    candle_core::safetensors::save(&expected, check.join(format!("{stem}.expected.safetensors"))).unwrap();
    std::fs::write(check.join(format!("{stem}.names.json")), serde_json::Value::Object(names).to_string()).unwrap();
}

#[test]
fn tucker_export_is_a_lycoris_file_with_the_same_deltas() {
    use graft_runtime::adapters::dispatcher::AdapterSet;
    let m = lora_manager("plugin-lora-tucker-export");
    let model = graft_sdxl::SdxlModel::load(&graft_tests::tiny_model(), None, &Device::Cpu).unwrap();
    let mut set = AdapterSet::new(&model, 0);
    let instance = strategy(&m, r#"{"rank": 2, "alpha": 1, "conv_rank": 3, "conv_alpha": 1.5, "use_tucker": true}"#);
    let (s, _) = set.add(instance, 1.0, 1.0).unwrap();
    // As if trained.
    let mut rng = GraftRng::new(6);
    for (key, p) in set.store().params(Some("lora")) {
        set.store().set(&key, &(rng.randn(p.dims(), &Device::Cpu).unwrap() * 0.3).unwrap()).unwrap();
    }
    let layout = graft_sdxl::sgm::SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2).unwrap();
    let meta = graft_trainer::export::ExportMeta {
        steps: 1,
        unet_lr: Some(1e-4),
        text_encoder_lr: None,
        base_model: "tiny".into(),
        sgm_layout: layout.clone(),
    };
    let out = graft_tests::scratch("plugin_lora_tucker_export");
    let files = graft_trainer::export::export_strategy(&set, s, &out, "tucker", &meta).unwrap();
    assert_eq!(files, vec![out.join("tucker.safetensors")], "a LyCORIS file, no PEFT file");
    let raw = graft_formats::read::read_file(&files[0]).unwrap();
    let mid = "lora_unet_middle_block_0_in_layers_2";
    assert_eq!(raw.tensors[&format!("{mid}.lora_mid.weight")].dims(), [3, 3, 3, 3]);
    assert_eq!(raw.tensors[&format!("{mid}.lora_down.weight")].dims(), [3, 56, 1, 1]);
    assert_eq!(raw.tensors[&format!("{mid}.lora_up.weight")].dims(), [56, 3, 1, 1]);
    let args: serde_json::Value = serde_json::from_str(&raw.metadata["ss_network_args"]).unwrap();
    assert_eq!((args["algo"].as_str(), args["use_tucker"].as_str(), args["conv_dim"].as_str()), (Some("locon"), Some("True"), Some("3")));
    assert_eq!(raw.metadata["ss_network_dim"], "2", "ss_network_dim is the linear rank");
    let host_layers: Vec<graft_sdxl::LayerInfo> = model.layers().into_iter().cloned().collect();
    let keys = graft_formats::KeyMap::from_layers(&host_layers, &layout);
    let (file, report) = graft_formats::read_adapter(&files[0], &keys).unwrap();
    assert_eq!(file.format, graft_formats::AdapterFormat::Lycoris);
    assert!(report.unmatched_keys.is_empty(), "{}", report.summary());
    assert_eq!(file.modules.len(), set.strategies()[s].plan.attachments.len());
    record_for_check("graft_tucker", &files[0], &file, &set, s, &layout);
}
