//! The pure logic: layer selection, stage states and directives, state round trips, over a
//! hand-made list of hook points. The host-side tests (loading the built library, forward
//! through the host's ops) are in tests/e2e/plugin_progressive_fusion.rs.

use graft_sdk::{AttentionKind, BlockKind, BlockPosition, Component, LayerKind};

use super::*;

fn linear(name: &str, component: Component, block: BlockPosition, inf: u64, outf: u64) -> LayerInfo {
    LayerInfo {
        name: name.into(),
        kind: LayerKind::LINEAR,
        component,
        in_features: inf,
        out_features: outf,
        block,
        attention: AttentionKind::NONE,
        extra: "".into(),
    }
}

const MID_PROJ_OUT: &str = "unet.mid_block.attentions.0.proj_out";
const MID_TO_K: &str = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k";

/// A model with a mid block, one down attention and two 3-layer text encoders.
fn layers() -> Vec<LayerInfo> {
    let mid = BlockPosition { kind: BlockKind::MID, index: 0 };
    let down = BlockPosition { kind: BlockKind::DOWN, index: 1 };
    let mut v = vec![
        linear("unet.down_blocks.1.attentions.0.proj_out", Component::UNET, down, 8, 8),
        linear("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", Component::UNET, down, 8, 8),
        linear("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", Component::UNET, down, 8, 8),
        linear("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", Component::UNET, down, 6, 8),
        linear("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", Component::UNET, down, 6, 8),
        linear("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", Component::UNET, down, 8, 8),
        linear("unet.mid_block.attentions.0.proj_in", Component::UNET, mid, 12, 12),
        linear("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q", Component::UNET, mid, 12, 12),
        linear(MID_TO_K, Component::UNET, mid, 6, 12),
        linear(MID_PROJ_OUT, Component::UNET, mid, 12, 12),
    ];
    v.push(LayerInfo {
        name: "unet.mid_block.attentions.0.transformer_blocks.0.attn2".into(),
        kind: LayerKind::ATTENTION,
        component: Component::UNET,
        in_features: 12,
        out_features: 12,
        block: mid,
        attention: AttentionKind::CROSS_ATTENTION,
        extra: "".into(),
    });
    for (prefix, component, width) in [("text_encoder", Component::TEXT_ENCODER, 4), ("text_encoder_2", Component::TEXT_ENCODER_2, 5)] {
        for i in 0..3 {
            let block = BlockPosition { kind: BlockKind::TEXT_LAYER, index: i };
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"] {
                let name = format!("{prefix}.text_model.encoder.layers.{i}.{m}");
                v.push(linear(&name, component, block, width, width));
            }
        }
    }
    v
}

fn te(component: &str, layer: u32, m: &str) -> String {
    format!("{component}.text_model.encoder.layers.{layer}.self_attn.{m}")
}

fn names(modules: &[Module], stage: StageNo) -> Vec<String> {
    modules.iter().filter(|m| m.stage == stage).map(|m| m.layer.clone()).collect()
}

impl ProgressiveFusion {
    fn module_named(&self, layer: &str) -> &Module {
        &self.modules[self.by_layer[layer]]
    }
}

fn planned(config: &str) -> ProgressiveFusion {
    let mut s = ProgressiveFusion::new(config).unwrap();
    s.plan(&layers(), config).unwrap();
    s
}

#[test]
fn selects_the_three_stages_layers() {
    let c = Config::default();
    let m = stages::select(&c, &layers()).unwrap();
    assert_eq!(names(&m, 1), vec![MID_PROJ_OUT]);
    let qkvo = ["q_proj", "k_proj", "v_proj", "out_proj"];
    // CLIP-L: its final layer (2) is skipped, so layers 0 and 1; bigG: layers 1 and 2.
    let mut want2 = Vec::new();
    for (component, layers) in [("text_encoder", [0, 1]), ("text_encoder_2", [1, 2])] {
        for l in layers {
            want2.extend(qkvo.iter().map(|p| te(component, l, p)));
        }
    }
    assert_eq!(names(&m, 2), want2);
    let attn2 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2";
    assert_eq!(
        names(&m, 3),
        vec![
            format!("{attn2}.to_q"),
            format!("{attn2}.to_k"),
            format!("{attn2}.to_v"),
            format!("{attn2}.to_out.0"),
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q".to_string(),
            MID_TO_K.to_string(),
        ]
    );
    let k = m.iter().find(|m| m.layer == MID_TO_K).unwrap();
    assert_eq!((k.rank, k.alpha, k.in_features, k.out_features), (8, 16.0, 6, 12));

    // The literal last two layers when nothing is skipped.
    let c = Config { stage2_skip_final_layer_of: vec![], stage2_text_layers: 1, ..Config::default() };
    let m = stages::select(&c, &layers()).unwrap();
    let want: Vec<String> = ["text_encoder", "text_encoder_2"].iter().flat_map(|c| qkvo.iter().map(move |p| te(c, 2, p))).collect();
    assert_eq!(names(&m, 2), want);
}

#[test]
fn plan_declares_everything_with_stage_one_attached() {
    let mut s = ProgressiveFusion::new("{}").unwrap();
    let plan = s.plan(&layers(), "{}").unwrap();
    assert_eq!(plan.attachments.len(), 1 + 16 + 6);
    let groups: Vec<(&str, f64)> = plan.groups.iter().map(|g| (g.name.as_str(), g.lr)).collect();
    assert_eq!(groups, vec![("stage1", 1e-4), ("stage2", 5e-5), ("stage3", 1e-4)]);
    for a in &plan.attachments {
        let stage = s.module_named(&a.layer).stage;
        assert_eq!(a.attached, stage == 1, "{}", a.layer);
        for p in &a.params {
            assert_eq!(p.trainable, stage == 1, "{}", a.layer);
            assert_eq!(p.group, format!("stage{stage}"));
        }
        let rank = [4, 12, 8][stage - 1];
        assert_eq!(a.params[0].name, "down");
        assert_eq!(a.params[0].shape[0], rank);
        assert_eq!(a.params[0].init, Init::kaiming_uniform(5f64.sqrt()));
        assert_eq!(a.params[1].name, "up");
        assert_eq!(a.params[1].shape[1], rank);
        assert_eq!(a.params[1].init, Init::zeros());
    }
    let starts: Vec<(&str, u64)> = plan.stages.iter().map(|s| (s.name.as_str(), s.start_step)).collect();
    assert_eq!(starts, vec![("stage1", 0), ("stage2", 500), ("stage3", 1000)]);
}

fn layers_of(d: &[Directive], f: impl Fn(&Directive) -> Option<&String>) -> Vec<String> {
    d.iter().filter_map(f).cloned().collect()
}

#[test]
fn directives_at_each_boundary_exactly_once() {
    let mut s = planned(r#"{"stage1_steps": 4, "stage2_steps": 3}"#);
    let ordered = s.modules.clone();
    let stage_layers = |st: StageNo| names(&ordered, st);
    for step in 0..4 {
        assert!(s.on_step(step).unwrap().is_empty(), "step {step}");
    }
    let d = s.on_step(4).unwrap();
    let mut want: Vec<Directive> = stage_layers(2).into_iter().map(|layer| Directive::Attach { layer }).collect();
    want.extend(stage_layers(2).into_iter().map(|layer| Directive::Unfreeze { layer, param: None }));
    assert_eq!(d, want);
    assert!(s.on_step(5).unwrap().is_empty());
    assert!(s.on_step(6).unwrap().is_empty());
    let d = s.on_step(7).unwrap();
    let mut want: Vec<Directive> =
        [1, 2].iter().flat_map(|&st| stage_layers(st)).map(|layer| Directive::Freeze { layer, param: None }).collect();
    want.extend(stage_layers(3).into_iter().map(|layer| Directive::Attach { layer }));
    want.extend(stage_layers(3).into_iter().map(|layer| Directive::Unfreeze { layer, param: None }));
    want.push(Directive::LrScale { group: "stage3".into(), scale: 0.3 });
    assert_eq!(d, want);
    assert!(s.on_step(8).unwrap().is_empty());
    assert!(s.on_step(100).unwrap().is_empty());
}

#[test]
fn stage_one_frozen_in_stage_two_when_asked() {
    let mut s = planned(r#"{"stage1_steps": 2, "stage2_train_stage1": false}"#);
    let d = s.on_step(2).unwrap();
    assert!(d.contains(&Directive::Freeze { layer: MID_PROJ_OUT.into(), param: None }));
    // Already frozen: stage 3 does not freeze it again.
    let d = s.on_step(502).unwrap();
    assert!(!d.contains(&Directive::Freeze { layer: MID_PROJ_OUT.into(), param: None }));
}

#[test]
fn a_jump_goes_straight_to_the_target_state() {
    let mut s = planned("{}");
    let d = s.on_step(1200).unwrap();
    let ordered = s.modules.clone();
    // Stage 2's adapters are attached but stay frozen; no unfreeze-then-freeze.
    let attached = layers_of(&d, |d| match d {
        Directive::Attach { layer } => Some(layer),
        _ => None,
    });
    let mut want: Vec<String> = names(&ordered, 2);
    want.extend(names(&ordered, 3));
    assert_eq!(attached, want);
    let frozen = layers_of(&d, |d| match d {
        Directive::Freeze { layer, .. } => Some(layer),
        _ => None,
    });
    assert_eq!(frozen, names(&ordered, 1));
    let unfrozen = layers_of(&d, |d| match d {
        Directive::Unfreeze { layer, .. } => Some(layer),
        _ => None,
    });
    assert_eq!(unfrozen, names(&ordered, 3));
    assert_eq!(d.last(), Some(&Directive::LrScale { group: "stage3".into(), scale: 0.3 }));
}

#[test]
fn resume_resends_the_full_state_once() {
    let mut s = planned("{}");
    s.on_step(600).unwrap();
    let state = s.save_state().unwrap();
    assert_eq!(state, r#"{"stage": 2, "last_step": 600}"#);

    let mut r = ProgressiveFusion::new("{}").unwrap();
    r.load_state(&state).unwrap();
    // The re-plan describes stage 2.
    let plan = r.plan(&layers(), "{}").unwrap();
    for a in &plan.attachments {
        let stage = r.module_named(&a.layer).stage;
        assert_eq!(a.attached, stage <= 2, "{}", a.layer);
        assert!(a.params.iter().all(|p| p.trainable == (stage <= 2)), "{}", a.layer);
    }
    let d = r.on_step(700).unwrap();
    let ordered = r.modules.clone();
    let mut want: Vec<Directive> = Vec::new();
    for st in [1, 2, 3] {
        for layer in names(&ordered, st) {
            want.push(if st <= 2 { Directive::Attach { layer } } else { Directive::Detach { layer } });
        }
        for layer in names(&ordered, st) {
            want.push(if st <= 2 { Directive::Unfreeze { layer, param: None } } else { Directive::Freeze { layer, param: None } });
        }
    }
    for g in ["stage1", "stage2", "stage3"] {
        want.push(Directive::LrScale { group: g.into(), scale: 1.0 });
    }
    assert_eq!(d, want);
    assert!(r.on_step(701).unwrap().is_empty());
    assert_eq!(r.on_step(1000).unwrap().last(), Some(&Directive::LrScale { group: "stage3".into(), scale: 0.3 }));
}

#[test]
fn bad_configs_and_states_are_clear() {
    let e = ProgressiveFusion::new(r#"{"stage1_rnak": 4}"#).err().unwrap();
    assert!(e.message().contains("unknown field `stage1_rnak`"), "{e}");
    let e = ProgressiveFusion::new(r#"{"stage2_rank": 0}"#).err().unwrap();
    assert!(e.message().contains("`stage2_rank` must be at least 1"), "{e}");
    let e = ProgressiveFusion::new(r#"{"stage3_lr_scale": -1}"#).err().unwrap();
    assert!(e.message().contains("`stage3_lr_scale`"), "{e}");
    let e = ProgressiveFusion::new(r#"{"stage2_skip_final_layer_of": ["te1"]}"#).err().unwrap();
    assert!(e.message().contains("`te1`"), "{e}");

    // Overlapping stages name the layer.
    let mut s = ProgressiveFusion::new(r#"{"stage1_targets": ["unet.mid_block.*"]}"#).unwrap();
    let e = s.plan(&layers(), "").unwrap_err();
    assert!(e.message().contains("`unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q` is selected by stage 1 and stage 3"), "{e}");
    let mut s = ProgressiveFusion::new(r#"{"stage3_targets": ["vae.*"]}"#).unwrap();
    let e = s.plan(&layers(), "").unwrap_err();
    assert!(e.message().contains("stage 3: no linear layer matches"), "{e}");
    let unet_only: Vec<LayerInfo> = layers().into_iter().filter(|l| l.name().starts_with("unet")).collect();
    let e = s.plan(&unet_only, "").unwrap_err();
    assert!(e.message().contains("no text-encoder layers"), "{e}");
    let mut s = ProgressiveFusion::new(r#"{"stage2_text_layers": 0}"#).unwrap();
    let plan = s.plan(&unet_only, "").unwrap();
    assert_eq!(plan.attachments.len(), 1 + 6);

    let mut s = ProgressiveFusion::new("{}").unwrap();
    assert!(s.on_step(0).unwrap_err().message().contains("before plan"));
    assert!(s.load_state(r#"{"stage": 4}"#).unwrap_err().message().contains("stage 4"));
    assert!(s.load_state("not json").is_err());
}

#[test]
fn empty_stages_are_skipped() {
    // No stage 1: the first step already moves to stage 2.
    let mut s = planned(r#"{"stage1_steps": 0}"#);
    let d = s.on_step(0).unwrap();
    assert!(d.contains(&Directive::Attach { layer: te("text_encoder_2", 2, "q_proj") }));
    // No stage 2: stage 1 goes straight to stage 3 (stage 2's adapters attached, frozen).
    let mut s = planned(r#"{"stage1_steps": 3, "stage2_steps": 0}"#);
    assert!(s.on_step(2).unwrap().is_empty());
    let d = s.on_step(3).unwrap();
    assert!(d.contains(&Directive::Attach { layer: te("text_encoder", 0, "k_proj") }));
    assert!(!d.contains(&Directive::Unfreeze { layer: te("text_encoder", 0, "k_proj"), param: None }));
    assert!(d.contains(&Directive::Freeze { layer: MID_PROJ_OUT.into(), param: None }));
    assert_eq!(d.last(), Some(&Directive::LrScale { group: "stage3".into(), scale: 0.3 }));
}
