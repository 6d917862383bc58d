//! Hot swap while training (`graft train --watch`): a strategy plugin rebuilt from changed source
//! is taken up at the next step with its trained parameters and optimizer moments kept; a broken
//! build in its place is reported while the last good one keeps training.

#[path = "plugins_common.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use graft_host::train::config::TrainConfig;
use graft_host::train::trainer::Trainer;

const ID: &str = "lora-probe";

/// The LoRA plugin's source as a crate of its own, with another id, a version and a gain on its
/// output.
fn write_probe(dir: &Path, version: &str, gain: &str) {
    let src = std::fs::read_to_string(workspace().join("plugins/lora/src/lib.rs")).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "the lora plugin no longer contains {from:?}; update this test");
        text.replace(from, to)
    };
    let src = replace(src, r#"Manifest::new("lora", env!("CARGO_PKG_VERSION"))"#, &format!(r#"Manifest::new("{ID}", "{version}")"#));
    let src = replace(src, "Ok(base_out + ly * (c.multiplier * c.scale()))", &format!("Ok(base_out + ly * ({gain} * c.multiplier * c.scale()))"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), src).unwrap();
    let manifest = format!(
        "[package]\nname = \"{ID}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\ngraft-sdk = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n{}",
        workspace().join("crates/graft-sdk").to_str().unwrap(),
        standalone_tail()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
}

fn version(t: &Trainer) -> String {
    t.set.strategies()[t.strategy].instance.manifest().version.clone()
}

#[test]
fn a_rebuilt_strategy_is_taken_up_at_the_next_step_with_its_training() {
    let src = tempfile::tempdir().unwrap();
    let lib_dir = tempfile::tempdir().unwrap();
    write_probe(src.path(), "1.0.0", "1.0");
    build_standalone(src.path(), "the probe v1");
    let built = plugin_out().join(lib_file(ID));
    let lib = lib_dir.path().join(lib_file(ID));
    std::fs::copy(&built, &lib).unwrap();

    let data = tempfile::tempdir().unwrap();
    graft_tests::write_shapes_dataset(&data.path().join("data"), 2, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\nseed = 1\nsteps = 100\n[dataset]\ndir = \"data\"\nresolution = 64\n\
         [strategy]\nplugin = \"{ID}\"\nconfig = {{ rank = 4, alpha = 4, unet_lr = 0.01 }}\n",
        workspace().join("tests/fixtures/tiny-sdxl").to_str().unwrap()
    );
    std::fs::write(data.path().join("train.toml"), config).unwrap();
    let config = TrainConfig::from_file(&data.path().join("train.toml")).unwrap();
    let mut t = Trainer::new(config, manager(lib_dir.path()), &Device::Cpu).unwrap();
    t.plugins.watch().unwrap();
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let trained: Vec<(String, Vec<f32>)> =
        t.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
    let loss_v1 = t.eval_loss(4).unwrap();

    // Version 2 (the adapter's output doubled) is built and copied over the watched library.
    write_probe(src.path(), "2.0.0", "2.0");
    build_standalone(src.path(), "the probe v2");
    std::fs::copy(&built, &lib).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while version(&t) != "2.0.0" {
        assert!(Instant::now() < deadline, "the rebuilt plugin was not taken up");
        std::thread::sleep(Duration::from_millis(200));
        t.poll_reloads().unwrap();
    }
    let kept: Vec<(String, Vec<f32>)> =
        t.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
    assert_eq!(kept, trained, "parameters are kept across the reload");
    assert!(t.optimizer.step_count(&trained[0].0) == 3, "optimizer moments are kept");
    let loss_v2 = t.eval_loss(4).unwrap();
    assert_ne!(loss_v1, loss_v2, "the new build's forward is in use");
    t.train_step().unwrap();

    // A broken library in its place: reported, version 2 keeps training.
    std::fs::write(&lib, b"not a library").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    t.poll_reloads().unwrap();
    assert_eq!(version(&t), "2.0.0");
    let r = t.train_step().unwrap();
    assert!(r.loss.is_finite() && !r.skipped);
    assert_eq!(t.step, 5);
}
