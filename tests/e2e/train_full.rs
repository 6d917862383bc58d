//! Full fine-tuning and VAE training, for real on the tiny model: the `full` plugin built with
//! cargo trains every linear and conv weight of the UNet, its diff file and the merged
//! checkpoint hold exactly the trained weights; `graft train-vae` lowers the reconstruction
//! error, moves every VAE weight and writes a VAE a model loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use graft_formats::adapter::AdapterWeights;
use graft_formats::{read_adapter, KeyMap};
use graft_host::train_vae::TrainVaeArgs;
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::SdxlModel;

use crate::plugins_common::plugin_dir;
use graft_tests::{graft, graft_err, scratch, tiny_model};

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_iter().collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn train_config(root: &Path, plugin: &str, plugin_config: &str) -> PathBuf {
    let data = root.join("data");
    graft_tests::write_shapes_dataset(&data, 4, 64);
    let text = format!(
        "model = {model:?}\noutput_dir = {out:?}\noutput_name = \"ft\"\nexport_checkpoint = true\nseed = 5\nsteps = 2\n\
         batch_size = 2\nlr_schedule = \"constant\"\nmax_grad_norm = 0.0\ncache_latents = \"none\"\n\
         [dataset]\ndir = {data:?}\nresolution = 64\n[strategy]\nplugin = \"{plugin}\"\nconfig = {plugin_config}\n",
        model = tiny_model().display().to_string(),
        out = root.join("out").display().to_string(),
        data = data.display().to_string(),
    );
    let path = root.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every linear and conv hook point of the UNet is trained (its diff is not zero), the diff file
/// names each of them once, and the merged checkpoint is the base plus the diff where trained
/// and the base byte for byte elsewhere (norms, embeddings, conv_in / conv_out, text encoders).
#[test]
fn full_fine_tuning_trains_every_unet_weight_and_exports_a_checkpoint() {
    let root = scratch("train-full");
    let plugins = plugin_dir("train-full-plugins", &["full"]);
    let config = train_config(&root, "full", "{ lr = 1e-3 }");
    graft(&["train", "--config", config.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"]).unwrap();

    let model = SdxlModel::load(&tiny_model(), None, &Device::Cpu).unwrap();
    let unet_weights: Vec<String> = model
        .layers()
        .into_iter()
        .filter(|l| l.name.starts_with("unet.") && matches!(l.kind, graft_sdxl::LayerKind::Linear | graft_sdxl::LayerKind::Conv))
        .map(|l| l.name.clone())
        .collect();
    assert!(unet_weights.len() > 200, "{} unet weights", unet_weights.len());
    let layout = SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2).unwrap();
    let layers: Vec<graft_sdxl::LayerInfo> = model.layers().into_iter().cloned().collect();
    let (file, report) = read_adapter(&root.join("out/ft.diff.safetensors"), &KeyMap::from_layers(&layers, &layout)).unwrap();
    assert!(report.unmatched_keys.is_empty() && report.warnings.is_empty(), "{report:?}");
    let base = tensors(&tiny_model().join("unet/diffusion_pytorch_model.safetensors"));
    let mut diffs = BTreeMap::new();
    for m in &file.modules {
        let AdapterWeights::Full { diff, diff_b } = &m.weights else { panic!("{}: not a full diff", m.layer) };
        assert!(max_abs(diff) > 0.0, "{}: the weight did not move", m.layer);
        let has_bias = base.contains_key(&format!("{}.bias", m.layer.trim_start_matches("unet.")));
        assert_eq!(diff_b.is_some(), has_bias, "{}: a bias difference where the layer has a bias", m.layer);
        assert!(diff_b.as_ref().is_none_or(|b| max_abs(b) > 0.0), "{}: the bias did not move", m.layer);
        diffs.insert(m.layer.clone(), diff.clone());
    }
    let want: std::collections::BTreeSet<String> = unet_weights.into_iter().collect();
    assert_eq!(diffs.keys().cloned().collect::<std::collections::BTreeSet<_>>(), want, "the trained layers");

    let merged = tensors(&root.join("out/ft-checkpoint/unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(base.keys().collect::<Vec<_>>(), merged.keys().collect::<Vec<_>>());
    for (key, b) in &base {
        let m = &merged[key];
        assert_eq!(m.dtype(), b.dtype(), "{key}: the checkpoint keeps the file's dtype");
        let layer = key.strip_suffix(".weight").map(|l| format!("unet.{l}"));
        match layer.as_ref().and_then(|l| diffs.get(l)) {
            Some(d) => {
                let want = (b.to_dtype(DType::F32).unwrap() + d.reshape(b.shape()).unwrap()).unwrap();
                let err = max_abs(&(m.to_dtype(DType::F32).unwrap() - &want).unwrap());
                assert!(err <= 1e-3 * max_abs(&want).max(1.0), "{key}: merged weight off by {err}");
            }
            None if key.ends_with(".bias") && diffs.contains_key(&format!("unet.{}", key.trim_end_matches(".bias"))) => {}
            None => assert_eq!(max_abs(&(m.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap()), 0.0, "{key} changed"),
        }
    }
    // The checkpoint is a complete model that draws, and not the base model's picture.
    for (name, m) in [("base", tiny_model()), ("tuned", root.join("out/ft-checkpoint"))] {
        let out = root.join(format!("{name}.png"));
        let (m, out) = (m.display().to_string(), out.display().to_string());
        graft(&["generate", "--model", &m, "--prompt", "a red circle", "--steps", "3", "--seed", "1", "--cpu", "--out", &out]).unwrap();
    }
    let (b, t) = (image::open(root.join("base.png")).unwrap().to_rgb8(), image::open(root.join("tuned.png")).unwrap().to_rgb8());
    assert_ne!(b.as_raw(), t.as_raw(), "the checkpoint draws the base model's picture");
}

/// A strategy that trains no base weight has no checkpoint to export: refused before training.
#[test]
fn export_checkpoint_needs_a_strategy_that_trains_base_weights() {
    let root = scratch("train-full-refused");
    let plugins = plugin_dir("train-full-refused-plugins", &["lora"]);
    let config = train_config(&root, "lora", "{ rank = 2 }");
    let err = graft_err(&["train", "--config", config.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"]);
    assert!(err.contains("export_checkpoint") && err.contains("`full`"), "{err}");
    assert!(!root.join("out/ft.safetensors").exists(), "trained anyway");
}

/// VAE training: the reconstruction error falls, every weight moves (the gradient reaches the
/// whole encoder and decoder), scaling_factor is measured and written, and the VAE loads in a
/// model that generates with it; a config alone starts from random weights.
#[test]
fn train_vae_lowers_the_reconstruction_error_and_writes_a_vae_that_loads() {
    let root = scratch("train-vae");
    let data = root.join("data");
    graft_host::demo::dataset::write_looks(&data, 8, 32, graft_host::demo::dataset::Look::Plain).unwrap();
    let args = TrainVaeArgs {
        vae: tiny_model(),
        data: data.clone(),
        out: root.join("vae"),
        resolution: 32,
        steps: 12,
        batch_size: 4,
        lr: 2e-3,
        cosine: false,
        kl_weight: 1e-6,
        check: vec![data.clone()],
        seed: 0,
        f16: false,
    };
    let o = graft_host::train_vae::train(&args).unwrap();
    assert!(o.reconstruction_after < 0.5 * o.reconstruction_before, "{} -> {}", o.reconstruction_before, o.reconstruction_after);
    let before = tensors(&tiny_model().join("vae/diffusion_pytorch_model.safetensors"));
    let after = tensors(&root.join("vae/diffusion_pytorch_model.safetensors"));
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (k, b) in &before {
        let d = max_abs(&(after[k].to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap());
        assert!(d > 0.0, "{k} did not move");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("vae/config.json")).unwrap()).unwrap();
    assert!((config["scaling_factor"].as_f64().unwrap() - o.scaling_factor).abs() < 1e-9);
    assert!(o.scaling_factor.is_finite() && o.scaling_factor > 0.0);
    // The preview: the 8 images over their reconstructions.
    let preview = image::open(root.join("vae").join(graft_trainer::vae_train::PREVIEW_FILE)).unwrap();
    assert_eq!((preview.width(), preview.height()), (8 * 32, 2 * 32));
    // A check on the training images themselves measures what reconstruction_after did.
    assert_eq!(o.checks.len(), 1);
    assert_eq!(o.checks[0].reconstruction, o.reconstruction_after);
    assert_eq!(image::open(&o.checks[0].preview).unwrap().width(), 8 * 32);
    assert_eq!(o.checks[0].preview, root.join("vae/reconstruction-data.png"));

    // A folder with only a config starts from random weights, and trains as well.
    let fresh = root.join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::copy(tiny_model().join("vae/config.json"), fresh.join("config.json")).unwrap();
    let f = graft_host::train_vae::train(&TrainVaeArgs { vae: fresh, out: root.join("vae-fresh"), cosine: true, ..args.clone() }).unwrap();
    assert!(f.reconstruction_after < 0.5 * f.reconstruction_before, "from random: {} -> {}", f.reconstruction_before, f.reconstruction_after);
    // Its learning rate followed the cosine from lr towards zero; the first run's stayed constant.
    let lrs: Vec<f64> = f.steps.iter().map(|s| s.lr).collect();
    assert_eq!(lrs[0], args.lr);
    assert!(lrs.windows(2).all(|w| w[1] < w[0]) && lrs[11] < 0.02 * args.lr, "{lrs:?}");
    assert!(o.steps.iter().all(|s| s.lr == args.lr));
    assert_eq!(tensors(&root.join("vae-fresh/diffusion_pytorch_model.safetensors")).len(), before.len());
    // Weights under another name are refused by name, not replaced by random ones.
    let misnamed = root.join("misnamed");
    std::fs::create_dir_all(&misnamed).unwrap();
    std::fs::copy(tiny_model().join("vae/config.json"), misnamed.join("config.json")).unwrap();
    std::fs::copy(tiny_model().join("vae/diffusion_pytorch_model.safetensors"), misnamed.join("vae.safetensors")).unwrap();
    let err = format!("{:#}", graft_host::train_vae::train(&TrainVaeArgs { vae: misnamed, ..args.clone() }).unwrap_err());
    assert!(err.contains("vae.safetensors") && err.contains("rename"), "{err}");

    let model_dir = root.join("model");
    graft_tests::copy_dir(&tiny_model(), &model_dir);
    std::fs::remove_dir_all(model_dir.join("vae")).unwrap();
    graft_tests::copy_dir(&root.join("vae"), &model_dir.join("vae"));
    let model = SdxlModel::load(&model_dir, None, &Device::Cpu).unwrap();
    assert!(
        (model.config.vae.scaling_factor - o.scaling_factor).abs() < 1e-12,
        "{} against {}",
        model.config.vae.scaling_factor,
        o.scaling_factor
    );

    // A folder without a VAE config is named in the error.
    let mut bad = args.clone();
    bad.vae = root.join("nothing-here");
    std::fs::create_dir_all(&bad.vae).unwrap();
    let err = format!("{:#}", graft_host::train_vae::train(&bad).unwrap_err());
    assert!(err.contains("nothing-here"), "{err}");
}
