//! Hook points and requested weights of the real SDXL text encoders, built from the built-in
//! configs with shape-only weights (no memory).

use candle_core::Device;
use graft_sdxl::clip::{ClipConfig, ClipTextModel};
use graft_sdxl::hooks::{AttentionKind, BlockPosition, Component, LayerKind};
use graft_sdxl::varbuilder::shape_only;

#[test]
fn sdxl_text_encoders_have_264_linear_hook_points() {
    let dev = Device::Cpu;
    let (vb1, req1) = shape_only(&dev);
    let te1 = ClipTextModel::new(vb1, &ClipConfig::sdxl_text_encoder(), Component::TextEncoder, false).unwrap();
    let (vb2, req2) = shape_only(&dev);
    let te2 = ClipTextModel::new(vb2, &ClipConfig::sdxl_text_encoder_2(), Component::TextEncoder2, true).unwrap();

    let count = |m: &ClipTextModel, kind: LayerKind| m.registry().layers().iter().filter(|l| l.kind == kind).count();
    assert_eq!(count(&te1, LayerKind::Linear), 72);
    assert_eq!(count(&te2, LayerKind::Linear), 192);
    assert_eq!(count(&te1, LayerKind::Linear) + count(&te2, LayerKind::Linear), 264);
    assert_eq!(count(&te1, LayerKind::Attention), 12);
    assert_eq!(count(&te2, LayerKind::Attention), 32);

    let find = |m: &ClipTextModel, name: &str| {
        let i = m.registry().index_of(name).unwrap_or_else(|| panic!("no hook point {name}"));
        m.registry().layers()[i].clone()
    };
    let q = find(&te1, "text_encoder.text_model.encoder.layers.11.self_attn.q_proj");
    assert_eq!((q.in_features, q.out_features), (768, 768));
    assert_eq!((q.block, q.attention), (BlockPosition::TextLayer(11), Some(AttentionKind::SelfAttention)));
    let fc2 = find(&te2, "text_encoder_2.text_model.encoder.layers.31.mlp.fc2");
    assert_eq!((fc2.in_features, fc2.out_features, fc2.attention), (5120, 1280, None));
    let attn = find(&te2, "text_encoder_2.text_model.encoder.layers.0.self_attn");
    assert_eq!((attn.kind, attn.in_features, attn.out_features), (LayerKind::Attention, 1280, 1280));
    for m in [&te1, &te2] {
        assert!(m
            .registry()
            .layers()
            .iter()
            .enumerate()
            .all(|(i, l)| m.registry().linear_weights(i).is_some() == (l.kind == LayerKind::Linear)));
    }

    // Every weight the model asks for, with the SDXL diffusers names and shapes.
    let req1 = req1.lock().unwrap().clone();
    let req2 = req2.lock().unwrap().clone();
    assert_eq!(req1.len(), 2 + 12 * 16 + 2);
    assert_eq!(req2.len(), 2 + 32 * 16 + 2 + 1);
    let has = |r: &[(String, Vec<usize>)], name: &str, shape: &[usize]| {
        assert!(r.iter().any(|(n, s)| n == name && s == shape), "no request {name} {shape:?}")
    };
    has(&req1, "text_model.embeddings.token_embedding.weight", &[49408, 768]);
    has(&req1, "text_model.embeddings.position_embedding.weight", &[77, 768]);
    has(&req1, "text_model.encoder.layers.11.mlp.fc1.weight", &[3072, 768]);
    has(&req1, "text_model.final_layer_norm.weight", &[768]);
    has(&req2, "text_model.encoder.layers.31.self_attn.out_proj.bias", &[1280]);
    has(&req2, "text_projection.weight", &[1280, 1280]);
    assert!(!req1.iter().any(|(n, _)| n.starts_with("text_projection")));
}
