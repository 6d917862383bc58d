//! The `progressive-fusion` strategy plugin, built with cargo and loaded by the host's plugin
//! manager: its plan on the tiny fixture model and on the full SDXL layer list, its stage
//! directives at each boundary, after a jump and after a resume or hot reload (applied to the
//! host's parameter store to check the trainable set, the attached set and the learning-rate
//! scales of each stage), and its forward, delta weight and export through the host ops,
//! checked against LoRA math written in candle.

use crate::plugins_common as common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device};
use common::{max_diff, sdxl_layers, single_plugin_manager, tiny_layers};
use graft_abi::{BlockKind, DirectiveKind, StageDirective};
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{CallContext, PluginManager, StrategyInstance};
use graft_sdxl::rng::GraftRng;

const ID: &str = "progressive-fusion";

fn fusion_manager(test: &str) -> PluginManager {
    single_plugin_manager("progressive-fusion", test)
}

fn strategy(m: &PluginManager, config: &str) -> StrategyInstance {
    StrategyInstance::new(m.require(ID).expect("progressive-fusion plugin loaded"), None, config).expect("strategy")
}

fn layer<'a>(layers: &'a [graft_abi::LayerInfo], name: &str) -> &'a graft_abi::LayerInfo {
    layers.iter().find(|l| l.name() == name).unwrap_or_else(|| panic!("no layer {name}"))
}

/// The expected layers of each stage, worked out from the layer list independently of the
/// plugin: (stage-1, stage-2, stage-3) names, each in layer-list order.
fn expected_stages(layers: &[graft_abi::LayerInfo], te1_last: u32, te2_last: u32) -> [Vec<String>; 3] {
    let lin = |l: &&graft_abi::LayerInfo| l.is_linear();
    let s1 = layers
        .iter()
        .filter(lin)
        .filter(|l| l.name().starts_with("unet.mid_block.") && l.name().ends_with("proj_out"))
        .map(|l| l.name().to_string())
        .collect();
    let s2 = layers
        .iter()
        .filter(lin)
        .filter(|l| {
            let window = |last: u32| l.block.kind == BlockKind::TEXT_LAYER && (last - 1..=last).contains(&l.block.index);
            let te1 = l.name().starts_with("text_encoder.") && window(te1_last);
            let te2 = l.name().starts_with("text_encoder_2.") && window(te2_last);
            (te1 || te2) && ["q_proj", "k_proj", "v_proj", "out_proj"].iter().any(|p| l.name().ends_with(&format!(".self_attn.{p}")))
        })
        .map(|l| l.name().to_string())
        .collect();
    let s3 = layers
        .iter()
        .filter(lin)
        .filter(|l| {
            l.name().starts_with("unet.")
                && [".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0"].iter().any(|p| l.name().ends_with(p))
        })
        .map(|l| l.name().to_string())
        .collect();
    [s1, s2, s3]
}

const RANKS: [u64; 3] = [4, 12, 8];
const ALPHAS: [f64; 3] = [16.0, 24.0, 16.0];

/// Checks the plan: every module declared, ranks and shapes, groups, attached and trainable
/// flags of a fresh run (stage 1 only).
fn check_plan(plan: &graft_abi::Plan, layers: &[graft_abi::LayerInfo], stages: &[Vec<String>; 3]) {
    let declared: Vec<&str> = plan.attachments.iter().map(|a| a.layer.as_str()).collect();
    let want: Vec<&str> = stages.iter().flatten().map(String::as_str).collect();
    assert_eq!(declared, want);
    for a in plan.attachments.iter() {
        let stage = stages.iter().position(|s| s.iter().any(|n| n == a.layer.as_str())).unwrap();
        let l = layer(layers, &a.layer);
        let r = RANKS[stage];
        assert_eq!(a.attached, stage == 0, "{}", a.layer);
        assert_eq!(a.params.len(), 2);
        let (down, up) = (&a.params[0], &a.params[1]);
        assert_eq!((down.name.as_str(), up.name.as_str()), ("down", "up"));
        assert_eq!(down.shape.as_slice(), &[r, l.in_features], "{}", a.layer);
        assert_eq!(up.shape.as_slice(), &[l.out_features, r], "{}", a.layer);
        assert_eq!(down.init, graft_abi::Init::kaiming_uniform(5f64.sqrt()));
        assert_eq!(up.init, graft_abi::Init::zeros());
        for p in [down, up] {
            assert_eq!(p.group.as_str(), format!("stage{}", stage + 1));
            assert_eq!(p.trainable, stage == 0, "{}", a.layer);
        }
    }
    let groups: Vec<(&str, f64)> = plan.groups.iter().map(|g| (g.name.as_str(), g.lr)).collect();
    assert_eq!(groups, vec![("stage1", 1e-4), ("stage2", 5e-5), ("stage3", 1e-4)]);
    let starts: Vec<(&str, u64)> = plan.stages.iter().map(|s| (s.name.as_str(), s.start_step)).collect();
    assert_eq!(starts, vec![("stage1", 0), ("stage2", 500), ("stage3", 1000)]);
    assert!(plan.stages.iter().all(|s| !s.description.is_empty()));
    assert!(plan.unfreeze.is_empty());
}

#[test]
fn plan_on_the_tiny_model_and_on_sdxl() -> graft_runtime::Result<()> {
    let m = fusion_manager("fusion-plan");
    let p = m.require(ID).unwrap();
    for cap in ["delta_weight", "stages", "export:lora"] {
        assert!(p.manifest.capabilities.contains(&cap.to_string()), "{cap}");
    }
    // The manifest's example is a valid config.
    strategy(&m, &p.manifest.config_example);

    // Tiny: 3 layers per text encoder; CLIP-L's final layer (2) is skipped: layers 0, 1; bigG: 1, 2.
    let tiny = tiny_layers();
    let stages = expected_stages(&tiny, 1, 2);
    assert_eq!(stages[0], vec!["unet.mid_block.attentions.0.proj_out"]);
    assert_eq!(stages[1].len(), 16);
    assert!(stages[1].contains(&"text_encoder.text_model.encoder.layers.0.self_attn.q_proj".to_string()));
    assert!(stages[1].contains(&"text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj".to_string()));
    assert!(!stages[2].is_empty());
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&tiny).expect("plan");
    check_plan(&plan, &tiny, &stages);

    // Alphas come back in the export, with the scale forward uses.
    let store = ParamStore::new(&Device::Cpu, DType::F32, 3);
    store.apply_plan(s.name(), &plan)?;
    let mut rng = GraftRng::new(1);
    let mut cx = CallContext { store: &store, rng: &mut rng, training: false, step: 0 };
    for (i, names) in stages.iter().enumerate() {
        for name in names {
            let ex = s.export(&mut cx, layer(&tiny, name), None).expect("export").expect("exported");
            assert_eq!((ex.family.as_str(), ex.alpha), ("lora", Some(ALPHAS[i])), "{name}");
        }
    }

    // The literal last two layers with `stage2_skip_final_layer_of: []`.
    let mut s = strategy(&m, r#"{"stage2_skip_final_layer_of": []}"#);
    let plan = s.plan(&tiny).expect("plan");
    check_plan(&plan, &tiny, &expected_stages(&tiny, 2, 2));

    // SDXL: CLIP-L 12 layers (9, 10), bigG 32 layers (30, 31); 70 transformer blocks.
    let sdxl = sdxl_layers();
    let stages = expected_stages(&sdxl, 10, 31);
    assert_eq!(stages[0], vec!["unet.mid_block.attentions.0.proj_out"]);
    assert_eq!(stages[1].len(), 16);
    assert!(stages[1].contains(&"text_encoder.text_model.encoder.layers.9.self_attn.q_proj".to_string()));
    assert!(stages[1].contains(&"text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj".to_string()));
    assert_eq!(stages[2].len(), 280);
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&sdxl).expect("plan");
    check_plan(&plan, &sdxl, &stages);
    let mid = &plan.attachments[0];
    assert_eq!(mid.params[0].shape.as_slice(), &[4, 1280]);
    let te2 = plan.attachments.iter().find(|a| a.layer.as_str() == "text_encoder_2.text_model.encoder.layers.30.self_attn.k_proj").unwrap();
    assert_eq!(te2.params[1].shape.as_slice(), &[1280, 12]);
    let k = plan.attachments.iter().find(|a| a.layer.as_str() == "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k").unwrap();
    assert_eq!(k.params[0].shape.as_slice(), &[8, 2048]);
    Ok(())
}

/// What a host does with the directives: the store's trainable flags, the attached layers and
/// the groups' learning-rate scales.
struct Host {
    store: ParamStore,
    attached: BTreeSet<String>,
    lr_scale: BTreeMap<String, f64>,
}

impl Host {
    fn new(s: &StrategyInstance, plan: &graft_abi::Plan) -> Self {
        let store = ParamStore::new(&Device::Cpu, DType::F32, 5);
        store.apply_plan(s.name(), plan).unwrap();
        let mut host = Host { store, attached: BTreeSet::new(), lr_scale: BTreeMap::new() };
        host.replan(plan);
        host
    }

    /// What a host does on a re-plan: the plan's attached flags and lr scales 1.
    fn replan(&mut self, plan: &graft_abi::Plan) {
        self.attached = plan.attachments.iter().filter(|a| a.attached).map(|a| a.layer.to_string()).collect();
        self.lr_scale = plan.groups.iter().map(|g| (g.name.to_string(), 1.0)).collect();
    }

    fn apply(&mut self, ds: &[StageDirective]) {
        for d in ds {
            let param = (!d.param.is_empty()).then_some(d.param.as_str());
            match d.kind {
                DirectiveKind::ATTACH => {
                    self.attached.insert(d.layer.to_string());
                }
                DirectiveKind::DETACH => {
                    self.attached.remove(d.layer.as_str());
                }
                DirectiveKind::FREEZE => {
                    self.store.set_trainable(ID, &d.layer, param, false);
                }
                DirectiveKind::UNFREEZE => {
                    self.store.set_trainable(ID, &d.layer, param, true);
                }
                DirectiveKind::LR_SCALE => {
                    assert!(self.lr_scale.contains_key(d.group.as_str()), "unknown group {}", d.group);
                    self.lr_scale.insert(d.group.to_string(), d.value);
                }
                k => panic!("unexpected directive {k}"),
            }
        }
    }

    /// The layers whose `down` and `up` are both trainable (never one without the other).
    fn trainable(&self) -> BTreeSet<String> {
        let t: Vec<ParamKey> = self.store.trainable(Some(ID)).into_iter().map(|(k, _)| k).collect();
        let layers: BTreeSet<String> = t.iter().map(|k| k.layer.clone()).collect();
        assert_eq!(t.len(), 2 * layers.len(), "down and up trainable together");
        layers
    }

    /// Asserts the state of stage `n` (1-based): attached, trainable, lr scales.
    fn assert_stage(&self, n: usize, stages: &[Vec<String>; 3], when: &str) {
        let set = |ix: &[usize]| -> BTreeSet<String> { ix.iter().flat_map(|&i| stages[i].iter().cloned()).collect() };
        let (attached, trainable, scale3) = match n {
            1 => (set(&[0]), set(&[0]), 1.0),
            2 => (set(&[0, 1]), set(&[0, 1]), 1.0),
            _ => (set(&[0, 1, 2]), set(&[2]), 0.3),
        };
        assert_eq!(self.attached, attached, "attached set in stage {n} ({when})");
        assert_eq!(self.trainable(), trainable, "trainable set in stage {n} ({when})");
        let scales: Vec<f64> = ["stage1", "stage2", "stage3"].iter().map(|g| self.lr_scale[*g]).collect();
        assert_eq!(scales, vec![1.0, 1.0, scale3], "lr scales in stage {n} ({when})");
    }
}

fn kinds_layers(ds: &[StageDirective], kind: DirectiveKind) -> Vec<String> {
    ds.iter().filter(|d| d.kind == kind).map(|d| d.layer.to_string()).collect()
}

#[test]
fn stage_directives_at_each_boundary_after_a_jump_and_a_resume() {
    let m = fusion_manager("fusion-steps");
    let tiny = tiny_layers();
    let stages = expected_stages(&tiny, 1, 2);
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&tiny).expect("plan");
    let mut host = Host::new(&s, &plan);
    host.assert_stage(1, &stages, "plan");

    for step in [0, 1, 499] {
        assert!(s.on_step(step).unwrap().is_empty(), "step {step}");
    }
    host.assert_stage(1, &stages, "step 499");

    // Step 500: attach and unfreeze the text-encoder layers, nothing else.
    let d = s.on_step(500).unwrap();
    assert_eq!(d.len(), 2 * stages[1].len());
    assert_eq!(kinds_layers(&d, DirectiveKind::ATTACH), stages[1]);
    assert_eq!(kinds_layers(&d, DirectiveKind::UNFREEZE), stages[1]);
    assert!(d.iter().all(|d| d.param.is_empty()));
    host.apply(&d);
    host.assert_stage(2, &stages, "step 500");
    for step in [501, 999] {
        assert!(s.on_step(step).unwrap().is_empty(), "step {step}");
    }

    // Step 1000: freeze the stage 1+2 composite, attach and unfreeze attn2, lr scale 0.3.
    let d = s.on_step(1000).unwrap();
    let composite: Vec<String> = stages[0].iter().chain(&stages[1]).cloned().collect();
    assert_eq!(kinds_layers(&d, DirectiveKind::FREEZE), composite);
    assert_eq!(kinds_layers(&d, DirectiveKind::ATTACH), stages[2]);
    assert_eq!(kinds_layers(&d, DirectiveKind::UNFREEZE), stages[2]);
    let lr: Vec<(String, f64)> = d.iter().filter(|d| d.kind == DirectiveKind::LR_SCALE).map(|d| (d.group.to_string(), d.value)).collect();
    assert_eq!(lr, vec![("stage3".to_string(), 0.3)]);
    assert_eq!(d.len(), composite.len() + 2 * stages[2].len() + 1);
    assert!(!d.iter().any(|d| d.kind == DirectiveKind::FOLD_INTO_BASE || d.kind == DirectiveKind::DETACH));
    host.apply(&d);
    host.assert_stage(3, &stages, "step 1000");
    assert!(s.on_step(1001).unwrap().is_empty());
    assert!(s.on_step(100_000).unwrap().is_empty());

    // A jump (a fresh run whose first step is 1200) goes straight to stage 3.
    let mut j = strategy(&m, "{}");
    let plan = j.plan(&tiny).unwrap();
    let mut jhost = Host::new(&j, &plan);
    let jd = j.on_step(1200).unwrap();
    assert!(kinds_layers(&jd, DirectiveKind::UNFREEZE) == stages[2], "no unfreeze of stage 2 on the way");
    jhost.apply(&jd);
    jhost.assert_stage(3, &stages, "jump to 1200");

    // Resume at 700 from a state saved at 600: the plan describes stage 2, and the first
    // on_step sends the full stage-2 state once, whatever state the host restored.
    let mut a = strategy(&m, "{}");
    let plan_a = a.plan(&tiny).unwrap();
    let mut ahost = Host::new(&a, &plan_a);
    ahost.apply(&a.on_step(600).unwrap());
    let state = a.save_state().unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).expect("state is JSON");
    assert_eq!(v["stage"], 2);

    let mut r = strategy(&m, "{}");
    r.load_state(&state).expect("load_state");
    let plan_r = r.plan(&tiny).unwrap();
    let mut rhost = Host::new(&r, &plan_r);
    rhost.assert_stage(2, &stages, "plan after load_state");
    let d = r.on_step(700).unwrap();
    let all: Vec<String> = stages.iter().flatten().cloned().collect();
    let mut touched = kinds_layers(&d, DirectiveKind::ATTACH);
    touched.extend(kinds_layers(&d, DirectiveKind::DETACH));
    touched.sort();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(touched, sorted, "every layer attached or detached");
    assert_eq!(kinds_layers(&d, DirectiveKind::DETACH), stages[2]);
    assert_eq!(kinds_layers(&d, DirectiveKind::FREEZE), stages[2]);
    assert_eq!(d.iter().filter(|d| d.kind == DirectiveKind::LR_SCALE).count(), 3);
    rhost.apply(&d);
    rhost.assert_stage(2, &stages, "resume at 700");
    // The same directives bring a host that restored nothing (the fresh plan) into stage 2.
    let mut fresh = Host::new(&a, &plan_a);
    fresh.apply(&d);
    fresh.assert_stage(2, &stages, "resume at 700 onto a fresh plan");
    // And a host still in stage 3 state (going back) too.
    let mut back = Host::new(&a, &plan_a);
    back.apply(&jd);
    back.assert_stage(3, &stages, "before going back");
    back.apply(&d);
    back.assert_stage(2, &stages, "resume at 700 from a stage-3 host");
    assert!(r.on_step(701).unwrap().is_empty());
    let d = r.on_step(1000).unwrap();
    rhost.apply(&d);
    rhost.assert_stage(3, &stages, "step 1000 after resume");
}

#[test]
fn short_stages_and_hot_reload_keep_the_stage() -> graft_runtime::Result<()> {
    let m = fusion_manager("fusion-short");
    let plugin = m.require(ID).unwrap();
    let tiny = tiny_layers();
    let stages = expected_stages(&tiny, 1, 2);
    let config = r#"{"stage1_steps": 4, "stage2_steps": 4}"#;
    let mut s = strategy(&m, config);
    let plan = s.plan(&tiny).unwrap();
    let starts: Vec<u64> = plan.stages.iter().map(|s| s.start_step).collect();
    assert_eq!(starts, vec![0, 4, 8]);
    let mut host = Host::new(&s, &plan);
    let mut changes = Vec::new();
    for step in 0..12 {
        let d = s.on_step(step).unwrap();
        if !d.is_empty() {
            changes.push(step);
        }
        host.apply(&d);
        host.assert_stage(1 + (step >= 4) as usize + (step >= 8) as usize, &stages, &format!("step {step}"));
    }
    assert_eq!(changes, vec![4, 8]);

    // A hot reload in stage 3: the new build gets the state, re-plans (the store's trainable
    // flags follow the plan, which describes stage 3), and its first on_step resends stage 3.
    let (plan, diff) = s.reload(plugin, &tiny, &host.store).expect("reload");
    assert!(diff.created.is_empty(), "{diff}");
    host.replan(&plan);
    host.lr_scale.insert("stage3".into(), 1.0); // a host that reset the scales
    assert_eq!(host.trainable(), stages[2].iter().cloned().collect());
    let d = s.on_step(12).unwrap();
    assert!(!d.is_empty());
    host.apply(&d);
    host.assert_stage(3, &stages, "after hot reload");
    assert!(s.on_step(13).unwrap().is_empty());
    Ok(())
}

#[test]
fn forward_delta_weight_and_export_match_lora_math() -> graft_runtime::Result<()> {
    let m = fusion_manager("fusion-forward");
    let tiny = tiny_layers();
    let stages = expected_stages(&tiny, 1, 2);
    let mut s = strategy(&m, "{}");
    let plan = s.plan(&tiny).expect("plan");
    let store = ParamStore::new(&Device::Cpu, DType::F32, 9);
    store.apply_plan(s.name(), &plan)?;
    let mut rng = GraftRng::new(21);
    let dev = Device::Cpu;

    // One module of each stage: mid proj_out, a text-encoder v_proj, a cross-attention to_k.
    let picks = [stages[0][0].clone(), stages[1][2].clone(), stages[2].iter().find(|n| n.ends_with("attn2.to_k")).unwrap().clone()];
    for (i, name) in picks.iter().enumerate() {
        let l = layer(&tiny, name);
        let (inf, outf, r) = (l.in_features as usize, l.out_features as usize, RANKS[i] as usize);
        let scale = ALPHAS[i] / r as f64;
        // `up` starts at zero: give both factors values so the adapter does something.
        let down = rng.randn(&[r, inf], &dev)?;
        let up = rng.randn(&[outf, r], &dev)?;
        store.set(&ParamKey::new(ID, name, "down"), &down)?;
        store.set(&ParamKey::new(ID, name, "up"), &up)?;
        // Later stages' modules start frozen: unfreeze as their stage's directive does.
        store.set_trainable(ID, name, None, true);

        let x = rng.randn(&[2, 3, inf], &dev)?;
        let w = rng.randn(&[outf, inf], &dev)?;
        let b = rng.randn(&[outf], &dev)?;
        let base_out = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let mut cx = CallContext { store: &store, rng: &mut rng, training: true, step: 3 };
        let y = s.forward_linear(&mut cx, l, Some(&w.clone().into()), &x, &base_out).expect("forward");
        let lora = x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?;
        let want = (&base_out + (lora * scale)?)?;
        assert!(max_diff(&y, &want) < 1e-5, "{name}: forward differs by {}", max_diff(&y, &want));

        // Both factors receive a gradient.
        let grads = y.sqr()?.sum_all()?.backward()?;
        for p in ["down", "up"] {
            let var = store.get(&ParamKey::new(ID, name, p)).unwrap().var;
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}.{p}: no gradient"));
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}.{p}: zero gradient");
        }

        // delta_weight = (alpha / r) up @ down, and fusing it gives the forward's output.
        let dw = s.delta_weight(&mut cx, l, Some(&w.clone().into())).expect("delta_weight").expect("linear adapter");
        assert!(max_diff(&dw, &(up.matmul(&down)? * scale)?) < 1e-5, "{name}: delta_weight");
        let fused = x.broadcast_matmul(&(&w + &dw)?.t()?)?.broadcast_add(&b)?;
        assert!(max_diff(&fused, &y) < 1e-4, "{name}: fused differs by {}", max_diff(&fused, &y));

        // Export: the lora family with this module's own rank and alpha.
        let ex = s.export(&mut cx, l, Some(&w.clone().into())).expect("export").expect("exported");
        assert_eq!((ex.family.as_str(), ex.alpha), ("lora", Some(ALPHAS[i])));
        let get = |k: &str| ex.tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()).unwrap();
        assert_eq!(max_diff(&get("down"), &down), 0.0);
        assert_eq!(max_diff(&get("up"), &up), 0.0);
    }

    // A frozen module (the stage 1+2 composite in stage 3) still adds its output, with no gradient.
    let name = &picks[0];
    store.set_trainable(ID, name, None, false);
    let l = layer(&tiny, name);
    let x = rng.randn(&[2, l.in_features as usize], &dev)?;
    let base_out = rng.randn(&[2, l.out_features as usize], &dev)?;
    let mut cx = CallContext { store: &store, rng: &mut rng, training: true, step: 1000 };
    let y = s.forward_linear(&mut cx, l, None, &x, &base_out).expect("forward");
    assert!(max_diff(&y, &base_out) > 1e-3, "the frozen composite still acts");
    let grads = y.sqr()?.sum_all()?.backward()?;
    for p in ["down", "up"] {
        let var = store.get(&ParamKey::new(ID, name, p)).unwrap().var;
        assert!(grads.get(var.as_tensor()).is_none(), "{name}.{p}: frozen but has a gradient");
    }

    // A zero `up` (the init) leaves the output unchanged.
    let name = stages[2].iter().find(|n| n.ends_with("attn2.to_out.0")).unwrap();
    let l = layer(&tiny, name);
    let x = rng.randn(&[1, 4, l.in_features as usize], &dev)?;
    let base_out = rng.randn(&[1, 4, l.out_features as usize], &dev)?;
    let mut cx = CallContext { store: &store, rng: &mut rng, training: false, step: 0 };
    let y = s.forward_linear(&mut cx, l, None, &x, &base_out).expect("forward");
    assert_eq!(max_diff(&y, &base_out), 0.0);
    Ok(())
}
