//! Writes graft's kohya, PEFT and LyCORIS `diff` exports of the fixture adapter to
//! target/lora-export-check/, with the deltas graft says they hold (`expected.safetensors`), and
//! reads them back. `tools/reference/check_lora_files.py --check-exports target/lora-export-check`
//! then loads them with diffusers and compares the merged weights (run it after this test).

mod common;

use std::collections::BTreeMap;

use common::*;
use graft_formats::write::write_safetensors;
use graft_formats::{read_adapter, write_diff, write_kohya, write_peft, AdapterWeights, KohyaMetadata, ModuleWeights, StoreDtype};

fn set_alpha(m: &mut ModuleWeights, a: Option<f32>) {
    if let AdapterWeights::Lora { alpha, .. } = &mut m.weights {
        *alpha = a;
    }
}

#[test]
fn write_exports_for_the_diffusers_check() {
    let keys = tiny_keys();
    let layout = tiny_layout();
    let (fixture, _) = read_adapter(&lora_fixture("peft_diffusers.safetensors"), &keys).unwrap();
    let dir = root().join("target/lora-export-check");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut expected = BTreeMap::new();

    // kohya: per-module alphas where diffusers honours them (not on attention projections, see
    // tests/fixtures/lora/README.md), a missing alpha (written as alpha = rank), rank 2 on one layer.
    let mut kohya = fixture.modules.clone();
    for m in kohya.iter_mut() {
        if m.layer.ends_with("ff.net.2") {
            set_alpha(m, Some(2.0));
        } else if m.layer.starts_with("unet.up_blocks.1") && m.layer.ends_with("proj_out") {
            set_alpha(m, None);
        } else if m.layer.starts_with("text_encoder_2.") && m.layer.ends_with("mlp.fc1") {
            set_alpha(m, Some(16.0));
        }
    }
    let mut meta = KohyaMetadata::new("graft_kohya");
    meta.steps = Some(500);
    meta.unet_lr = Some(1e-4);
    meta.text_encoder_lr = Some(5e-5);
    let kohya_path = dir.join("graft_kohya.safetensors");
    let written = write_kohya(&kohya_path, &kohya, &layout, &meta, StoreDtype::F16).unwrap();
    assert_eq!(written.metadata["ss_network_dim"], "Dynamic");
    assert_eq!(written.metadata["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
    for m in &kohya {
        expected.insert(format!("graft_kohya/{}", m.layer), m.delta_weight(1.0).unwrap());
    }

    // PEFT: alphas on attention projections too (the adapter metadata carries them), float32.
    let mut peft = fixture.modules.clone();
    for m in peft.iter_mut() {
        if m.layer.ends_with("attn1.to_q") && m.layer.contains("down_blocks.2") {
            set_alpha(m, Some(5.0));
        } else if m.layer == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" {
            set_alpha(m, Some(16.0));
        } else if m.layer.starts_with("text_encoder_2.") && m.layer.ends_with("self_attn.v_proj") {
            set_alpha(m, None);
        }
    }
    write_peft(&dir.join("graft_peft.safetensors"), &peft, StoreDtype::F32).unwrap();
    for m in &peft {
        expected.insert(format!("graft_peft/{}", m.layer), m.delta_weight(1.0).unwrap());
    }

    // LyCORIS full diffs of a few layers, UNet and both text encoders.
    let diffs: Vec<ModuleWeights> = fixture
        .modules
        .iter()
        .filter(|m| m.layer.contains("layers.1.") || m.layer.contains("mid_block") || m.layer.contains("up_blocks.0.attentions.2"))
        .map(|m| ModuleWeights::full(m.layer.clone(), m.delta_weight(1.0).unwrap(), None))
        .collect();
    write_diff(&dir.join("graft_diff.safetensors"), &diffs, &layout, &KohyaMetadata::new("graft_diff"), StoreDtype::F32).unwrap();
    for m in &diffs {
        expected.insert(format!("graft_diff/{}", m.layer), m.delta_weight(1.0).unwrap());
    }
    write_safetensors(&dir.join("expected.safetensors"), &expected, &BTreeMap::new(), StoreDtype::F32).unwrap();

    // Each file reads back to the deltas it was written from (f16 rounding for the kohya file).
    for (file, stem) in
        [("graft_kohya.safetensors", "graft_kohya"), ("graft_peft.safetensors", "graft_peft"), ("graft_diff.safetensors", "graft_diff")]
    {
        let (back, report) = read_adapter(&dir.join(file), &keys).unwrap();
        assert!(report.unmatched_keys.is_empty(), "{file}: {:?}", report.unmatched_keys.first());
        let want: Vec<_> = expected.iter().filter(|(k, _)| k.starts_with(&format!("{stem}/"))).collect();
        assert_eq!(back.modules.len(), want.len(), "{file}");
        for (k, d) in want {
            let layer = &k[stem.len() + 1..];
            let got = back.module(layer).unwrap().delta_weight(1.0).unwrap();
            let err = max_abs_diff(&got, d);
            assert!(err <= 2e-3 * max_abs(d).max(1e-3), "{file}: {layer}: {err}");
        }
    }
}
