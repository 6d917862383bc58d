//! The two tiny SDXL text encoders against transformers' output
//! (tests/fixtures/reference/te.safetensors, written by tools/reference/make_fixtures.py): every
//! hidden state, the final-LN state, the pooled state and bigG's text embeds, for three prompts
//! (one of them empty), plus SDXL's prompt embeds (the two penultimate states concatenated).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_sdxl::clip::{ClipConfig, ClipOutput, ClipTextModel};
use graft_sdxl::hooks::{Component, NoHooks};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny(sub: &str, component: Component, with_projection: bool, dev: &Device) -> ClipTextModel {
    let dir = fixtures().join("tiny-sdxl").join(sub);
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = ClipConfig::from_json_str(&json, sub).unwrap();
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, dev) }.unwrap();
    ClipTextModel::new(vb, &config, component, with_projection).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn compare(what: &str, ours: &Tensor, theirs: &Tensor) {
    let diff = max_abs_diff(ours, theirs);
    println!("{what} {:?}: max abs diff {diff:e}", ours.dims());
    assert!(diff < 1e-4, "{what}: max abs diff {diff} against transformers");
}

fn run(tag: &str, model: &ClipTextModel, reference: &HashMap<String, Tensor>) -> ClipOutput {
    let get = |k: &str| reference.get(&format!("{tag}.{k}")).unwrap_or_else(|| panic!("fixture has no {tag}.{k}"));
    let out = model.forward(get("input_ids"), &NoHooks).unwrap();
    assert_eq!(out.hidden_states.len(), model.config().num_hidden_layers + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        compare(&format!("{tag}.hidden_states.{i}"), h, get(&format!("hidden_states.{i}")));
    }
    compare(&format!("{tag}.last_hidden_state"), &out.last_hidden_state, get("last_hidden_state"));
    compare(&format!("{tag}.pooled"), &out.pooled, get("pooled"));
    out
}

#[test]
fn tiny_text_encoders_match_transformers() {
    let dev = Device::Cpu;
    let reference = safetensors::load(fixtures().join("reference/te.safetensors"), &dev).unwrap();

    let te1 = tiny("text_encoder", Component::TextEncoder, false, &dev);
    let out1 = run("te1", &te1, &reference);
    assert!(out1.text_embeds.is_none());

    let te2 = tiny("text_encoder_2", Component::TextEncoder2, true, &dev);
    let out2 = run("te2", &te2, &reference);
    let text_embeds = out2.text_embeds.as_ref().expect("text_encoder_2 has a projection");
    compare("te2.text_embeds", text_embeds, &reference["te2.text_embeds"]);

    // What SDXL conditions on: both penultimate states side by side, and bigG's text embeds.
    let prompt_embeds = Tensor::cat(&[out1.penultimate(), out2.penultimate()], 2).unwrap();
    compare("prompt_embeds", &prompt_embeds, &reference["prompt_embeds"]);
    compare("pooled_prompt_embeds", text_embeds, &reference["pooled_prompt_embeds"]);
}

#[test]
fn u32_ids_give_the_same_output() {
    let dev = Device::Cpu;
    let reference = safetensors::load(fixtures().join("reference/te.safetensors"), &dev).unwrap();
    let te2 = tiny("text_encoder_2", Component::TextEncoder2, true, &dev);
    let ids = &reference["te2.input_ids"];
    let a = te2.forward(ids, &NoHooks).unwrap();
    let b = te2.forward(&ids.to_dtype(DType::U32).unwrap(), &NoHooks).unwrap();
    assert_eq!(max_abs_diff(&a.pooled, &b.pooled), 0.0);
}

#[test]
fn bad_ids_are_refused_with_a_message() {
    let dev = Device::Cpu;
    let te1 = tiny("text_encoder", Component::TextEncoder, false, &dev);
    let out_of_vocab = Tensor::new(&[[0u32, 5000, 2]], &dev).unwrap();
    let err = te1.forward(&out_of_vocab, &NoHooks).unwrap_err().to_string();
    assert!(err.contains("5000") && err.contains("vocabulary"), "{err}");
    let too_long = Tensor::zeros((1, 78), DType::U32, &dev).unwrap();
    let err = te1.forward(&too_long, &NoHooks).unwrap_err().to_string();
    assert!(err.contains("77"), "{err}");
    let float = Tensor::zeros((1, 5), DType::F32, &dev).unwrap();
    assert!(te1.forward(&float, &NoHooks).is_err());
}

/// The models ask for exactly the tensors the files hold, with their shapes.
#[test]
fn requests_are_exactly_the_file_keys() {
    let dev = Device::Cpu;
    for (sub, component, with_projection) in [("text_encoder", Component::TextEncoder, false), ("text_encoder_2", Component::TextEncoder2, true)]
    {
        let dir = fixtures().join("tiny-sdxl").join(sub);
        let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config = ClipConfig::from_json_str(&json, sub).unwrap();
        let (vb, requests) = graft_sdxl::varbuilder::shape_only(&dev);
        ClipTextModel::new(vb, &config, component, with_projection).unwrap();
        let mut asked: Vec<(String, Vec<usize>)> = requests.lock().unwrap().clone();
        asked.sort();
        let stored = safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
        let mut stored: Vec<(String, Vec<usize>)> = stored.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        stored.sort();
        assert_eq!(asked, stored, "{sub}");
    }
}
