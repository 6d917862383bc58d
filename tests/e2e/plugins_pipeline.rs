//! Real plugins through the SDXL pipeline on the tiny model: the dispatcher calls them at their
//! hook points, a zero-initialised adapter changes nothing, fusing gives the same image and
//! unfusing restores the base weights exactly, and a faulting plugin is detached while the
//! generation goes on with every parameter kept.

use crate::plugins_common as common;

use candle_core::{Device, Tensor};
use common::*;
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::store::ParamKey;
use graft_runtime::plugins::StrategyInstance;
use graft_sdxl::{GenerateParams, SdxlModel};

fn model() -> SdxlModel {
    SdxlModel::load(&workspace().join("tests/fixtures/tiny-sdxl"), None, &Device::Cpu).unwrap()
}

fn params() -> GenerateParams {
    GenerateParams { prompt: "a red fox".into(), width: 64, height: 48, steps: 2, seed: 11, ..Default::default() }
}

fn latents(model: &SdxlModel, set: &AdapterSet) -> Tensor {
    let hooks = set.hooks();
    model.generate(&params(), hooks.pipeline(), &mut |_, _| {}).unwrap().latents
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn example_plugin_through_the_pipeline_zero_init_fuse_unfuse() {
    let dir = plugin_dir("pipeline_example", &["example-scale"]);
    let m = manager(&dir);
    let model = model();
    let base = latents(&model, &AdapterSet::new(&model, 0));

    let mut set = AdapterSet::new(&model, 0);
    let config = r#"{"targets": ["unet.*.attn2.to_k", "text_encoder*.self_attn.v_proj"]}"#;
    let instance = StrategyInstance::new(m.require("example-scale").unwrap(), None, config).unwrap();
    let (s, diff) = set.add(instance, 1.0, 1.0).unwrap();
    assert!(!diff.created.is_empty());
    assert_eq!(max_diff(&latents(&model, &set), &base), 0.0, "scale 0 must be the identity");

    // "Trained" scales: the image changes.
    let mut rng = graft_sdxl::rng::GraftRng::new(3);
    for (key, p) in set.store().params(Some("example-scale")) {
        set.store().set(&key, &(rng.randn(p.dims(), &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
    }
    let adapted = latents(&model, &set);
    assert!(max_diff(&adapted, &base) > 1e-3);

    // Fused into the base weights: the same result without the plugin in the loop.
    let fused = set.fuse().unwrap();
    assert_eq!(fused, diff.created.len());
    let with_fused = latents(&model, &set);
    assert!(max_diff(&with_fused, &adapted) < 1e-3 * (1.0 + adapted.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()));
    set.unfuse();
    assert_eq!(max_diff(&latents(&model, &set), &adapted), 0.0, "unfuse restores the base weights exactly");

    // Re-planning the same build (what a hot reload does) keeps every trained value.
    let before: Vec<(ParamKey, Vec<f32>)> = set
        .store()
        .params(Some("example-scale"))
        .into_iter()
        .map(|(k, p)| (k, p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let diff = set.reload(s, m.require("example-scale").unwrap()).unwrap();
    assert!(diff.is_same(), "{diff}");
    for (k, v) in before {
        assert_eq!(set.store().get(&k).unwrap().var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
    }
    assert_eq!(max_diff(&latents(&model, &set), &adapted), 0.0);
}

#[test]
fn a_faulting_plugin_is_detached_and_generation_goes_on() {
    let dir = plugin_dir("pipeline_faults", &["fault-plugin", "example-scale"]);
    let m = manager(&dir);
    let model = model();
    let base = latents(&model, &AdapterSet::new(&model, 0));
    for fault in ["panic", "error", "shape", "handle"] {
        let mut set = AdapterSet::new(&model, 0);
        let config = format!(r#"{{"fault": "{fault}", "entry": "forward"}}"#);
        let instance = StrategyInstance::new(m.require("fault-plugin").unwrap(), None, &config).unwrap();
        set.add(instance, 1.0, 1.0).unwrap();
        let ok = StrategyInstance::new(m.require("example-scale").unwrap(), None, "{}").unwrap();
        set.add(ok, 1.0, 1.0).unwrap();
        let n_params = set.store().len();
        let out = latents(&model, &set);
        assert_eq!(max_diff(&out, &base), 0.0, "{fault}: the healthy zero-init strategy and the detached one leave the base output");
        let failures = set.take_failures();
        assert_eq!(failures.len(), 1, "{fault}: {failures:?}");
        let text = failures[0].to_string();
        assert!(text.contains("fault-plugin") && text.contains("forward"), "{fault}: {text}");
        assert_eq!(set.store().len(), n_params, "{fault}: parameters are kept");
        assert_eq!(set.failed_strategies(), vec!["fault-plugin".to_string()], "it stays detached");
        assert_eq!(max_diff(&latents(&model, &set), &base), 0.0);
        assert!(set.take_failures().is_empty(), "{fault}: reported once");
    }
}
