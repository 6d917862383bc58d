//! Files written by diffusers and in kohya's layout (tests/fixtures/lora, made by
//! tools/reference/check_lora_files.py) read to the deltas diffusers merges.

mod common;

use common::*;
use graft_formats::metadata::{addnet_hash, kohya_hashes};
use graft_formats::read::read_file;
use graft_formats::write::{encode_body, StoreDtype};
use graft_formats::{read_adapter, AdapterFormat, ModuleKind};

/// Checks the selected layers' deltas against diffusers' fused weights.
fn check_deltas(file: &str, expected_stem: &str) -> graft_formats::AdapterFile {
    let keys = tiny_keys();
    let (adapter, report) = read_adapter(&lora_fixture(file), &keys).unwrap();
    let n = report.unmatched_keys.len();
    assert!(n == 0, "{file}: {n} unmatched keys, e.g. {:?}", report.unmatched_keys.first());
    assert_eq!(report.attached.len(), 228, "{file}");
    let expected = expected();
    for layer in selected() {
        let want = &expected[&format!("{expected_stem}/{layer}")];
        let got = adapter.module(&layer).unwrap_or_else(|| panic!("{file}: no {layer}")).delta_weight(1.0).unwrap();
        let err = max_abs_diff(&got, want);
        assert!(err <= 1e-5 * max_abs(want).max(1.0), "{file}: {layer}: max error {err}");
        let half = adapter.module(&layer).unwrap().delta_weight(0.5).unwrap();
        assert!(max_abs_diff(&(half * 2.0).unwrap(), want) <= 1e-5 * max_abs(want).max(1.0));
    }
    adapter
}

#[test]
fn peft_file_from_diffusers() {
    let a = check_deltas("peft_diffusers.safetensors", "peft_diffusers");
    assert_eq!(a.format, AdapterFormat::Peft);
    // alpha from lora_adapter_metadata: 8 in general, alpha_pattern 3 on one proj_in, rank_pattern 2.
    let m = a.module("unet.down_blocks.1.attentions.1.proj_in").unwrap();
    assert_eq!((m.rank(), m.alpha()), (Some(4), Some(3.0)));
    let m = a.module("unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_k").unwrap();
    assert_eq!((m.rank(), m.alpha()), (Some(2), Some(8.0)));
    // transformers 5 keys for text encoder 1 (`text_encoder.encoder.layers...`) land on graft's names.
    assert!(a.module("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").is_some());
}

#[test]
fn kohya_file_with_sgm_names() {
    let a = check_deltas("kohya_sgm.safetensors", "peft_diffusers");
    assert_eq!(a.format, AdapterFormat::Kohya);
    assert_eq!(a.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert!(a.modules.iter().all(|m| m.kind() == ModuleKind::Lora));
}

#[test]
fn kohya_file_with_diffusers_names_bf16_without_te_alpha() {
    let a = check_deltas("kohya_diffusers_bf16.safetensors", "kohya_diffusers_bf16");
    let te = a.module("text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj").unwrap();
    assert_eq!(te.alpha(), None);
    assert_eq!(te.scale(), 1.0);
}

#[test]
fn kohya_and_peft_files_hold_the_same_adapter() {
    let keys = tiny_keys();
    let (k, _) = read_adapter(&lora_fixture("kohya_sgm.safetensors"), &keys).unwrap();
    let (p, _) = read_adapter(&lora_fixture("peft_diffusers.safetensors"), &keys).unwrap();
    let names = |a: &graft_formats::AdapterFile| a.modules.iter().map(|m| m.layer.clone()).collect::<Vec<_>>();
    assert!(names(&k) == names(&p), "the files attach to different layers");
    for (a, b) in k.modules.iter().zip(&p.modules) {
        let err = max_abs_diff(&a.delta_weight(1.0).unwrap(), &b.delta_weight(1.0).unwrap());
        assert!(err < 1e-6, "{}: {err}", a.layer);
    }
}

/// sd-scripts' hashes over the same tensors: graft's encoder lays out the same bytes.
#[test]
fn kohya_hashes_match_sd_scripts() {
    let path = lora_fixture("kohya_sgm.safetensors");
    let raw = read_file(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(addnet_hash(&bytes).unwrap(), raw.metadata["sshs_model_hash"]);
    let body = encode_body(&raw.tensors, StoreDtype::F16).unwrap();
    let (model, legacy) = kohya_hashes(&body, &raw.metadata);
    assert_eq!(model, raw.metadata["sshs_model_hash"]);
    assert_eq!(legacy, raw.metadata["sshs_legacy_hash"]);
}

/// The base weight of a layer of the tiny model (float16 in the folder).
fn base_weight(layer: &str) -> candle_core::Tensor {
    let (file, key) = if let Some(p) = layer.strip_prefix("unet.") {
        ("unet/diffusion_pytorch_model.safetensors", p)
    } else if let Some(p) = layer.strip_prefix("text_encoder_2.") {
        ("text_encoder_2/model.safetensors", p)
    } else {
        ("text_encoder/model.safetensors", layer.strip_prefix("text_encoder.").unwrap())
    };
    let raw = read_file(&fixtures().join("tiny-sdxl").join(file)).unwrap();
    raw.tensors[&format!("{key}.weight")].clone()
}

/// Files made by the LyCORIS library: LoHa, LoKr (split, full-matrix, both split), DoRA on rows and
/// on columns, LoHa + DoRA, full diff; merged weights equal LyCORIS' own.
#[test]
fn lycoris_file_from_lycoris() {
    let keys = tiny_keys();
    let (adapter, report) = read_adapter(&lora_fixture("lycoris_mixed.safetensors"), &keys).unwrap();
    assert_eq!(adapter.format, AdapterFormat::Lycoris);
    assert!(report.unmatched_keys.is_empty(), "{:?}", report.unmatched_keys);
    let expected = read_file(&lora_fixture("lycoris_expected.safetensors")).unwrap().tensors;
    assert_eq!(adapter.modules.len(), expected.len());
    for (layer, want) in &expected {
        let m = adapter.module(layer).unwrap_or_else(|| panic!("no {layer}"));
        let got = m.delta_for_base(&base_weight(layer), 1.0).unwrap();
        let err = max_abs_diff(&got, want);
        assert!(err <= 1e-5 * max_abs(want).max(1.0), "{layer} ({}): max error {err}", m.kind());
    }
    let kinds: Vec<(ModuleKind, bool)> = report.attached.iter().map(|a| (a.kind, a.dora)).collect();
    for k in
        [(ModuleKind::LoHa, false), (ModuleKind::LoKr, false), (ModuleKind::Lora, true), (ModuleKind::LoHa, true), (ModuleKind::Full, false)]
    {
        assert!(kinds.contains(&k), "{k:?}");
    }
}
