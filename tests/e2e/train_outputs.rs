//! What a training run writes besides checkpoints, with the real plugins on the tiny model:
//! exported adapter files (kohya + PEFT from `lora`, a LyCORIS diff from `example-scale`,
//! graft-native + base-weight diff from `attention-gate`) read back with graft-formats and
//! compared with the set's own delta weights; sample images from a kohya prompt file; a grid; the
//! loss log and its plots.

use crate::plugins_common as common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{lib_file, manager};
use graft_formats::adapter::AdapterWeights;
use graft_formats::{read_adapter, AdapterFormat, KeyMap};
use graft_runtime::adapters::dispatcher::{AdapterSet, StrategyId};
use graft_runtime::adapters::store::ParamKey;
use graft_runtime::plugins::{PluginManager, StrategyInstance};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::SdxlModel;
use graft_trainer::export::{export_strategy, ExportMeta};
use graft_trainer::losslog::{self, LossEntry, LossLog};
use graft_trainer::samples::{self, SampleDefaults};

const PLUGINS: [&str; 3] = ["lora", "example-scale", "attention-gate"];

/// Builds the three plugins (once per test process: `graft_tests::build_plugins`) and returns a
/// manager over a scratch folder holding copies of them.
fn plugins(test: &str) -> PluginManager {
    let built = graft_tests::build_plugins(&PLUGINS);
    let dir: PathBuf = graft_tests::scratch(&format!("{test}-plugins"));
    for p in PLUGINS {
        let f = lib_file(p);
        std::fs::copy(built.join(&f), dir.join(&f)).unwrap();
    }
    manager(&dir)
}

fn model() -> SdxlModel {
    SdxlModel::load(&graft_tests::tiny_model(), None, &Device::Cpu).unwrap()
}

fn meta(model: &SdxlModel) -> ExportMeta {
    ExportMeta {
        steps: 42,
        unet_lr: Some(1e-4),
        text_encoder_lr: Some(5e-5),
        base_model: model.source.display().to_string(),
        sgm_layout: SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2).unwrap(),
    }
}

fn keys(model: &SdxlModel, meta: &ExportMeta) -> KeyMap {
    let layers: Vec<graft_sdxl::LayerInfo> = model.layers().into_iter().cloned().collect();
    KeyMap::from_layers(&layers, &meta.sgm_layout)
}

/// Sets every parameter of `strategy` to scaled noise, as if trained.
fn randomize(set: &AdapterSet, strategy: &str, scale: f64, seed: u64) {
    let mut rng = GraftRng::new(seed);
    for (key, p) in set.store().params(Some(strategy)) {
        set.store().set(&key, &(rng.randn(p.dims(), &Device::Cpu).unwrap() * scale).unwrap()).unwrap();
    }
}

fn add(set: &mut AdapterSet, m: &PluginManager, id: &str, config: &str) -> StrategyId {
    let instance = StrategyInstance::new(m.require(id).unwrap(), None, config).unwrap();
    set.add(instance, 1.0, 1.0).unwrap().0
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Every module of the file gives the set's delta weight at its layer.
fn check_deltas(set: &AdapterSet, s: StrategyId, file: &graft_formats::AdapterFile, what: &str) {
    for m in &file.modules {
        let want = set.delta(s, set.layer_id(&m.layer).unwrap()).unwrap().unwrap();
        let got = m.delta_weight(1.0).unwrap();
        let d = max_diff(&got, &want);
        assert!(d <= 1e-5 * (1.0 + max_abs(&want)), "{what} {}: {d}", m.layer);
        assert!(max_abs(&want) > 0.0, "{what} {}: a trained (non-zero) delta", m.layer);
    }
}

#[test]
fn lora_exports_kohya_and_peft_files_that_read_back_to_the_same_deltas() {
    let m = plugins("outputs-lora");
    let model = model();
    let mut set = AdapterSet::new(&model, 0);
    let s = add(&mut set, &m, "lora", r#"{"rank": 4, "alpha": 8, "train_text_encoder": true}"#);
    randomize(&set, "lora", 0.3, 1);
    let meta = meta(&model);
    let out = graft_tests::scratch("outputs-lora");
    let files = export_strategy(&set, s, &out, "tiny_style", &meta).unwrap();
    assert_eq!(files, vec![out.join("tiny_style.safetensors"), out.join("tiny_style.peft.safetensors")]);

    let attached = set.strategies()[s].plan.attachments.len();
    let keys = keys(&model, &meta);
    for (path, format) in [(&files[0], AdapterFormat::Kohya), (&files[1], AdapterFormat::Peft)] {
        let (file, report) = read_adapter(path, &keys).unwrap();
        assert_eq!(file.format, format);
        assert!(report.unmatched_keys.is_empty() && report.warnings.is_empty(), "{}", report.summary());
        assert_eq!(file.modules.len(), attached);
        assert!(file.modules.iter().any(|m| m.layer.starts_with("text_encoder_2.")));
        check_deltas(&set, s, &file, format.name());
    }
    let md = graft_formats::read::read_file(&files[0]).unwrap().metadata;
    assert_eq!(md["ss_output_name"], "tiny_style");
    assert_eq!((md["ss_network_dim"].as_str(), md["ss_network_alpha"].as_str()), ("4", "8.0"));
    assert_eq!(md["ss_steps"], "42");
    assert!(md["ss_training_comment"].contains("strategy lora"));
}

#[test]
fn example_scale_exports_a_lycoris_diff_file() {
    let m = plugins("outputs-scale");
    let model = model();
    let mut set = AdapterSet::new(&model, 0);
    let s = add(&mut set, &m, "example-scale", "{}");
    randomize(&set, "example-scale", 0.5, 2);
    let meta = meta(&model);
    let out = graft_tests::scratch("outputs-scale");
    let files = export_strategy(&set, s, &out, "scale", &meta).unwrap();
    assert_eq!(files, vec![out.join("scale.safetensors")]);
    let (file, report) = read_adapter(&files[0], &keys(&model, &meta)).unwrap();
    assert_eq!(file.format, AdapterFormat::Lycoris);
    assert!(report.unmatched_keys.is_empty());
    assert_eq!(file.modules.len(), set.strategies()[s].plan.attachments.len());
    assert!(file.modules.iter().all(|m| matches!(m.weights, AdapterWeights::Full { .. })));
    check_deltas(&set, s, &file, "diff");
}

#[test]
fn attention_gate_exports_native_tensors_and_its_trained_base_weights() {
    let m = plugins("outputs-gate");
    let model = model();
    let mut set = AdapterSet::new(&model, 0);
    let s = add(&mut set, &m, "attention-gate", r#"{"rank": 2}"#);
    randomize(&set, "attention-gate", 0.1, 3);
    // "Train" the unfrozen base weights.
    let mut rng = GraftRng::new(4);
    let mut moved = Vec::new();
    for b in set.unfrozen() {
        let d = (rng.randn(b.weight.as_tensor().dims(), &Device::Cpu).unwrap() * 0.01).unwrap();
        b.weight.set(&(b.weight.as_tensor() + &d).unwrap()).unwrap();
        let db = b.bias.as_ref().map(|v| {
            let db = (rng.randn(v.as_tensor().dims(), &Device::Cpu).unwrap() * 0.01).unwrap();
            v.set(&(v.as_tensor() + &db).unwrap()).unwrap();
            db
        });
        moved.push((b.layer.clone(), d, db));
    }
    assert!(!moved.is_empty() && moved.iter().any(|m| m.2.is_some()));

    let meta = meta(&model);
    let out = graft_tests::scratch("outputs-gate");
    let files = export_strategy(&set, s, &out, "gate", &meta).unwrap();
    assert_eq!(files, vec![out.join("gate.graft.safetensors"), out.join("gate.diff.safetensors")]);
    let keys = keys(&model, &meta);

    let (file, report) = read_adapter(&files[0], &keys).unwrap();
    assert_eq!(file.format, AdapterFormat::Native);
    let info = report.native.unwrap();
    assert_eq!(info.strategy, "attention-gate");
    assert_eq!(info.version, set.strategies()[s].instance.manifest().version);
    assert_eq!(info.config, serde_json::json!({"rank": 2}));
    assert_eq!(file.modules.len(), set.strategies()[s].plan.attachments.len());
    for module in &file.modules {
        let AdapterWeights::Native { tensors } = &module.weights else { panic!("{}: native", module.layer) };
        for (name, t) in tensors {
            let p = set.store().get(&ParamKey::new("attention-gate", &module.layer, name));
            let p = p.unwrap_or_else(|| panic!("{}.{name} is a parameter", module.layer));
            assert_eq!(max_diff(t, p.var.as_tensor()), 0.0, "{}.{name}", module.layer);
        }
    }

    let (file, report) = read_adapter(&files[1], &keys).unwrap();
    assert_eq!(file.format, AdapterFormat::Lycoris);
    assert!(report.unmatched_keys.is_empty());
    assert_eq!(file.modules.len(), moved.len());
    for (layer, d, db) in &moved {
        let module = file.module(layer).unwrap();
        assert!(max_diff(&module.delta_weight(1.0).unwrap(), d) < 1e-6, "{layer}");
        match (module.delta_bias(1.0).unwrap(), db) {
            (Some(got), Some(want)) => assert!(max_diff(&got, want) < 1e-6, "{layer} bias"),
            (None, None) => {}
            (got, want) => panic!("{layer}: bias diff {got:?} vs {want:?}"),
        }
    }
}

#[test]
fn samples_from_a_prompt_file_with_the_adapters_and_a_grid() {
    let m = plugins("outputs-samples");
    let model = model();
    let mut set = AdapterSet::new(&model, 0);
    add(&mut set, &m, "example-scale", "{}");
    randomize(&set, "example-scale", 0.5, 5);
    let out = graft_tests::scratch("outputs-samples");
    let prompts_file = out.join("prompts.txt");
    std::fs::write(&prompts_file, "# two samples\na red fox --n blurry --d 7 --ss k_euler_a\n\na blue bird --w 48 --h 64 --l 1\n").unwrap();
    let defaults = SampleDefaults { width: 64, height: 48, steps: 2, guidance: 5.0, seed: 100, ..Default::default() };
    let prompts = samples::parse_prompt_file(&prompts_file, &defaults).unwrap();
    assert_eq!(prompts.len(), 2);

    set.set_training(true);
    let e = samples::render_samples(&model, &set, &prompts, &out, "step000010").unwrap_err().to_string();
    assert!(e.contains("set_training(false)"), "{e}");
    set.set_training(false);
    let files = samples::render_samples(&model, &set, &prompts, &out.join("samples"), "step000010").unwrap();
    assert_eq!(files, vec![out.join("samples/step000010_00_7.png"), out.join("samples/step000010_01_101.png")]);

    // The same pixels as a direct generation with the adapters, and A1111 parameters.
    let hooks = set.hooks();
    for (p, f) in prompts.iter().zip(&files) {
        let img = model.generate(&p.params(), hooks.pipeline(), &mut |_, _| {}).unwrap().image;
        let (w, h, rgb) = graft_sdxl::pipeline::to_rgb8(&img.get(0).unwrap()).unwrap();
        let png = image::open(f).unwrap().to_rgb8();
        assert_eq!((png.width() as usize, png.height() as usize), (w, h));
        assert_eq!(png.as_raw(), &rgb);
    }
    let text = graft_trainer::png_out::read_parameters(&files[0]).unwrap().unwrap();
    assert!(text.starts_with("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 64x48"), "{text}");
    let text = graft_trainer::png_out::read_parameters(&files[1]).unwrap().unwrap();
    assert!(text.contains("Sampler: Euler, CFG scale: 1, Seed: 101, Size: 48x64"), "{text}");
    // The adapter is in the images: without it the first one differs.
    let base = AdapterSet::new(&model, 0);
    let plain = samples::render_samples(&model, &base, &prompts[..1], &out.join("base"), "base").unwrap();
    assert_ne!(image::open(&plain[0]).unwrap().to_rgb8().as_raw(), image::open(&files[0]).unwrap().to_rgb8().as_raw());

    let grid = out.join("grid.png");
    samples::grid_files(&files, 2, &grid).unwrap();
    let g = image::open(&grid).unwrap().to_rgb8();
    assert_eq!((g.width(), g.height()), (2 * (64 + 4) + 4, 64 + 8));
    assert!(graft_trainer::png_out::read_parameters(&grid).unwrap().unwrap().starts_with("a red fox"));
}

#[test]
fn loss_log_resume_and_plots() {
    let out = graft_tests::scratch("outputs-loss");
    let path = out.join("loss.jsonl");
    let entry = |step: u64| {
        let noise = ((step * 7919) % 13) as f64 / 13.0 - 0.5;
        LossEntry {
            step,
            loss: 0.2 / (1.0 + step as f64 / 40.0) + 0.03 * noise,
            lr: 1e-4,
            grad_norm: 0.3,
            skipped: step == 77,
            time: 0.1,
            ..Default::default()
        }
    };
    let mut log = LossLog::open(&path, 0).unwrap();
    for step in 0..150 {
        log.append(&entry(step)).unwrap();
    }
    drop(log);
    let mut log = LossLog::open(&path, 100).unwrap();
    for step in 100..300 {
        log.append(&entry(step)).unwrap();
    }
    let entries = losslog::read(&path).unwrap();
    assert_eq!(entries.len(), 300);
    assert!(entries.iter().enumerate().all(|(i, e)| e.step == i as u64));
    losslog::plot_loss_png(&entries, &out.join("loss.png")).unwrap();
    let other: Vec<LossEntry> = entries.iter().map(|e| LossEntry { loss: e.loss * 1.3, ..e.clone() }).collect();
    losslog::plot_many(&[("lora", losslog::PALETTE[0], &entries), ("attention-gate", losslog::PALETTE[1], &other)], &out.join("compare.png"))
        .unwrap();
    for f in ["loss.png", "compare.png"] {
        let img = image::open(out.join(f)).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (800, 480));
    }
}
