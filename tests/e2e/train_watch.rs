//! Hot swap while training (`graft train --watch`): a strategy plugin rebuilt from changed source
//! is taken up at the next step with its trained parameters and optimizer moments kept; a broken
//! build in its place is reported while the last good one keeps training.
//!
//! A strategy that fails in watch mode pauses the run (no step used, no bad step counted) until
//! a rebuild is taken up, and the run then goes on as if the failure had not happened. Outside
//! watch mode, a run stopped by too many bad steps keeps its last good checkpoint and adapter.

use crate::plugins_common as common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use graft_host::plugins::PluginDirArgs;
use graft_host::train::{train, TrainArgs};
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;
use graft_trainer::{checkpoint, losslog};

const ID: &str = "lora-probe";

/// A gain that panics in the probe's forward from step 2 on (and is 1.0 before).
const PANICS_FROM_STEP_2: &str = r#"(if ops.step() >= 2 { panic!("deliberate panic in the probe's forward") } else { 1.0 })"#;

/// The LoRA plugin's source as a crate of its own, with another id, a version and a gain on its
/// output.
fn write_probe(dir: &Path, version: &str, gain: &str) {
    write_probe_as(dir, ID, version, gain);
}

/// As [`write_probe`] with crate name and plugin id `id` (each test its own, so that tests
/// running at once do not rebuild each other's library).
fn write_probe_as(dir: &Path, id: &str, version: &str, gain: &str) {
    let src = graft_tests::lora_plugin_source();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "the lora plugin no longer contains {from:?}; update this test");
        text.replace(from, to)
    };
    let src = replace(src, r#"Manifest::new("lora", env!("CARGO_PKG_VERSION"))"#, &format!(r#"Manifest::new("{id}", "{version}")"#));
    let src =
        replace(src, "Ok(base_out + ly * (c.multiplier * c.scale()))", &format!("Ok(base_out + ly * ({gain} * c.multiplier * c.scale()))"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), src).unwrap();
    let manifest = format!(
        "[package]\nname = \"{id}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
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

/// Builds the probe `id` from `dir` and puts the library into `lib_dir` the way cargo does (a new
/// file renamed into place, so the watcher never reads half a file).
fn build_into(dir: &Path, id: &str, what: &str, lib_dir: &Path) -> PathBuf {
    build_standalone(dir, what);
    let lib = lib_dir.join(lib_file(id));
    let tmp = lib_dir.join(".incoming.tmp");
    std::fs::copy(plugin_out().join(lib_file(id)), &tmp).unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    lib
}

/// A dataset and a config training the probe `id` in `dir`; `extra` goes to the top level.
fn probe_config(dir: &Path, id: &str, steps: u64, extra: &str) -> PathBuf {
    graft_tests::write_shapes_dataset(&dir.join("data"), 2, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"probe\"\nseed = 3\nsteps = {steps}\nsave_every = 0\n{extra}\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\
         [strategy]\nplugin = \"{id}\"\nconfig = {{ rank = 4, alpha = 4, unet_lr = 0.01 }}\n",
        workspace().join("tests/fixtures/tiny-sdxl").to_str().unwrap()
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn train_args(config: &Path, lib_dir: &Path, output_dir: Option<PathBuf>, watch: bool) -> TrainArgs {
    TrainArgs {
        config: Some(config.to_path_buf()),
        kohya_config: None,
        print: false,
        ignore_unsupported: false,
        steps: None,
        output_dir,
        seed: None,
        resume: false,
        watch,
        plugins: PluginDirArgs { plugins: vec![lib_dir.to_path_buf()], plugin_config: None, no_default_plugins: true },
        cpu: true,
    }
}

fn logged(out: &Path) -> Vec<losslog::LossEntry> {
    losslog::read(&out.join("loss.jsonl")).unwrap_or_default()
}

#[test]
fn a_failing_strategy_pauses_a_watch_run_until_it_is_rebuilt() {
    const PAUSE_ID: &str = "lora-probe-pause";
    let src = tempfile::tempdir().unwrap();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib_dir = lib_dir.path().canonicalize().unwrap();
    write_probe_as(src.path(), PAUSE_ID, "1.0.0", PANICS_FROM_STEP_2);
    build_into(src.path(), PAUSE_ID, "the probe that panics", &lib_dir);

    // One bad step would end the run: pausing must count none.
    let data = tempfile::tempdir().unwrap();
    let config = probe_config(data.path(), PAUSE_ID, 5, "max_bad_steps = 1");
    let out = data.path().join("out");
    let args = train_args(&config, &lib_dir, None, true);
    let run = std::thread::spawn(move || train(args));

    // Steps 0 and 1 train; step 2 panics in forward and the run pauses there.
    let deadline = Instant::now() + Duration::from_secs(300);
    while logged(&out).len() < 2 {
        assert!(!run.is_finished(), "the run ended before step 2");
        assert!(Instant::now() < deadline, "steps 0 and 1 were not trained");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(!run.is_finished(), "the run did not wait for a rebuild");
    let log = logged(&out);
    assert_eq!(log.iter().map(|e| (e.step, e.skipped)).collect::<Vec<_>>(), [(0, false), (1, false)], "a step was used while paused");

    // The fix is built and copied over the watched file: the run goes on at step 2 and ends.
    write_probe_as(src.path(), PAUSE_ID, "2.0.0", "1.0");
    build_into(src.path(), PAUSE_ID, "the fixed probe", &lib_dir);
    let outcome = run.join().unwrap().expect("the resumed run ends well");
    assert_eq!((outcome.steps, outcome.skipped), (5, 0));
    let steps: Vec<(u64, bool)> = outcome.records.iter().map(|r| (r.step, r.skipped)).collect();
    assert_eq!(steps, [(0, false), (1, false), (2, false), (3, false), (4, false)]);
    assert_eq!(logged(&out).len(), 5);

    // As if the failed attempt had not happened: the fixed build from the start, without
    // watching, trains the same losses (same batches, noise and timesteps at every step).
    let ref_dir = tempfile::tempdir().unwrap();
    std::fs::copy(lib_dir.join(lib_file(PAUSE_ID)), ref_dir.path().join(lib_file(PAUSE_ID))).unwrap();
    let reference = train(train_args(&config, ref_dir.path(), Some(data.path().join("out-ref")), false)).unwrap();
    let losses = |o: &graft_host::train::TrainOutcome| o.records.iter().map(|r| r.loss).collect::<Vec<f64>>();
    assert_eq!(losses(&outcome), losses(&reference));
}

#[test]
fn too_many_bad_steps_stop_with_the_last_good_checkpoint_and_adapter() {
    const STOP_ID: &str = "lora-probe-stop";
    let src = tempfile::tempdir().unwrap();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib_dir = lib_dir.path().canonicalize().unwrap();
    write_probe_as(src.path(), STOP_ID, "1.0.0", PANICS_FROM_STEP_2);
    build_into(src.path(), STOP_ID, "the probe that panics", &lib_dir);

    // Not watching, nothing saved on the way (save_every = 0): steps 2 and 3 are skipped, then
    // the run stops.
    let data = tempfile::tempdir().unwrap();
    let config = probe_config(data.path(), STOP_ID, 20, "max_bad_steps = 2");
    let out = data.path().join("out");
    let e = format!("{:#}", train(train_args(&config, &lib_dir, None, false)).expect_err("the run stops"));
    let last_good = out.join("checkpoints/step-000002");
    assert!(e.contains("stopped at step 4: 2 steps in a row were skipped"), "{e}");
    assert!(e.contains(&format!("the last good checkpoint is {}", last_good.display())), "{e}");

    // The checkpoint is the state right after step 1 (the last good step): it resumes there.
    assert_eq!(checkpoint::latest(&out).unwrap(), Some(last_good.clone()));
    let mut t = Trainer::new(TrainConfig::from_file(&config).unwrap(), manager(&lib_dir), &Device::Cpu).unwrap();
    checkpoint::load(&mut t, &last_good).unwrap();
    assert_eq!((t.step, t.bad_in_row, t.skipped_total), (2, 0, 0));

    // The adapter of those parameters was exported and loads, trained (LoRA up starts at zero).
    let adapter = out.join("probe.safetensors");
    assert!(e.contains(&adapter.display().to_string()), "{e}");
    let model = graft_sdxl::SdxlModel::load(&workspace().join("tests/fixtures/tiny-sdxl"), None, &Device::Cpu).unwrap();
    let layers: Vec<graft_sdxl::LayerInfo> = model.layers().into_iter().cloned().collect();
    let layout = graft_sdxl::sgm::SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2).unwrap();
    let (file, _) = graft_formats::read_adapter(&adapter, &graft_formats::KeyMap::from_layers(&layers, &layout)).unwrap();
    assert!(!file.modules.is_empty());
    let checkpoint_params = candle_core::safetensors::load(last_good.join("params.safetensors"), &Device::Cpu).unwrap();
    let up: Vec<f32> = checkpoint_params
        .iter()
        .find(|(k, _)| k.ends_with("up"))
        .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
        .expect("a LoRA up parameter in the checkpoint");
    assert!(up.iter().all(|x| x.is_finite()) && up.iter().any(|x| *x != 0.0), "the checkpoint holds no trained parameters");
}

/// The probe `id` built twice: version 1 (gain 1) and version 2 (a NaN gain from the first step,
/// so every step of it is a bad step). Returns the two libraries, kept apart from any watched
/// folder, so that a test can swap version 2 in at once.
fn probe_v1_v2(id: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let src = tempfile::tempdir().unwrap();
    let keep = tempfile::tempdir().unwrap();
    let mut libs = Vec::new();
    for (version, gain) in [("2.0.0", "(0.0 / 0.0)"), ("1.0.0", "1.0")] {
        write_probe_as(src.path(), id, version, gain);
        build_standalone(src.path(), &format!("the probe {version}"));
        let lib = keep.path().join(format!("{version}-{}", lib_file(id)));
        std::fs::copy(plugin_out().join(lib_file(id)), &lib).unwrap();
        libs.push(lib);
    }
    let v1 = libs.pop().unwrap();
    let v2 = libs.pop().unwrap();
    (keep, v1, v2)
}

/// Puts `lib` in place as `lib_dir`'s library of `id`, the way cargo does (a renamed new file).
fn swap_in(lib: &Path, lib_dir: &Path, id: &str) {
    let tmp = lib_dir.join(".incoming.tmp");
    std::fs::copy(lib, &tmp).unwrap();
    std::fs::rename(&tmp, lib_dir.join(lib_file(id))).unwrap();
}

/// `graft serve` runs training through the same session as `graft train`: `save_every` writes
/// checkpoints on the way, a rebuilt strategy plugin is taken up by the running job, and
/// `max_bad_steps` from the request stops it (version 2's every step is bad).
#[test]
fn serve_honours_save_every_max_bad_steps_and_hot_reload() {
    const SERVE_ID: &str = "lora-probe-serve";
    let (_keep, v1, v2) = probe_v1_v2(SERVE_ID);
    let lib_dir = tempfile::tempdir().unwrap();
    let lib_dir = lib_dir.path().canonicalize().unwrap();
    swap_in(&v1, &lib_dir, SERVE_ID);
    let dir = graft_tests::scratch("serve_session");
    let server = graft_host::serve::start(&graft_tests::serve_args(&dir, lib_dir.clone())).expect("server starts");
    let data = dir.join("data");
    graft_tests::write_shapes_dataset(&data, 2, 64);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let body = serde_json::json!({
        "name": "probe", "plugin": SERVE_ID, "strategy_config": {"rank": 4, "alpha": 4, "unet_lr": 0.01},
        "dataset_dir": data, "resolution": 64, "steps": 3000, "seed": 1, "save_every": 1, "max_bad_steps": 2,
    });
    let mut resp = agent.post(format!("{}/api/train", server.url())).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    let job: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let get = |agent: &ureq::Agent| -> serde_json::Value {
        let text = agent.get(format!("{}/api/jobs/{id}", server.url())).call().unwrap().body_mut().read_to_string().unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    // Step 4 is reported once the checkpoint of step 3 is written.
    while get(&agent)["step"].as_u64().unwrap_or(0) < 4 {
        assert!(Instant::now() < deadline, "the job did not train: {}", get(&agent));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = PathBuf::from(get(&agent)["output_dir"].as_str().unwrap());
    for step in 1..=3 {
        assert!(out.join(format!("checkpoints/step-{step:06}")).is_dir(), "save_every = 1: no checkpoint of step {step}");
    }

    swap_in(&v2, &lib_dir, SERVE_ID);
    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let job = get(&agent);
        if job["status"] == "failed" {
            break job;
        }
        assert!(Instant::now() < deadline, "the rebuilt plugin was not taken up (or max_bad_steps not honoured): {job}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("2 steps in a row were skipped"), "{error}");
    // The last good step's checkpoint is kept, and the adapter of it.
    let step = job["step"].as_u64().unwrap();
    assert!(out.join(format!("checkpoints/step-{:06}", step - 2)).is_dir(), "{job}");
    assert!(out.join("probe.safetensors").is_file());
}

/// `graft compare` takes up a rebuilt strategy plugin while a strategy trains (version 2's NaN
/// gain makes its steps bad, and `max_bad_steps` then stops that strategy).
#[test]
fn compare_takes_up_a_rebuilt_strategy() {
    const COMPARE_ID: &str = "lora-probe-compare";
    let (_keep, v1, v2) = probe_v1_v2(COMPARE_ID);
    let lib_dir = tempfile::tempdir().unwrap();
    let lib_dir = lib_dir.path().canonicalize().unwrap();
    swap_in(&v1, &lib_dir, COMPARE_ID);
    let dir = tempfile::tempdir().unwrap();
    graft_tests::write_shapes_dataset(&dir.path().join("data"), 2, 64);
    let text = format!(
        "model = {:?}\noutput_dir = \"report\"\nseed = 7\nsteps = 3000\nmax_bad_steps = 2\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\n\
         [[strategies]]\nname = \"probe\"\nplugin = \"{COMPARE_ID}\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n",
        workspace().join("tests/fixtures/tiny-sdxl").to_str().unwrap()
    );
    let config = graft_host::compare::config::CompareConfig::parse_str(&text, "compare.toml", dir.path()).unwrap();
    let log = dir.path().join("report/strategies/probe/loss.jsonl");
    let swapper = std::thread::spawn({
        let (log, lib_dir) = (log.clone(), lib_dir.clone());
        move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while losslog::read(&log).map(|l| l.len()).unwrap_or(0) < 3 {
                assert!(Instant::now() < deadline, "the strategy did not train");
                std::thread::sleep(Duration::from_millis(100));
            }
            swap_in(&v2, &lib_dir, COMPARE_ID);
        }
    });
    let options = graft_host::compare::run::RunOptions {
        plugins: PluginDirArgs { plugins: vec![lib_dir.clone()], plugin_config: None, no_default_plugins: true },
        device: Device::Cpu,
    };
    let outcome = graft_host::compare::run::run(&config, &options).unwrap();
    swapper.join().unwrap();
    let probe = &outcome.strategies[0];
    let error = probe.error.as_deref().expect("the strategy stops on version 2's bad steps");
    assert!(error.contains("2 steps in a row were skipped"), "{error}");
    assert!(probe.steps_done >= 5, "{probe:?}");
    assert!(probe.losses[..3].iter().all(|l| !l.skipped), "version 1 trained");
}
