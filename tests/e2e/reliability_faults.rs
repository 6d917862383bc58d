//! Numerical faults and failing strategies during training, and the plugin trust model.
//!
//! - NaN / inf in a batch (a damaged latent cache) and in an adapter's output (the fault plugin's
//!   `nan` / `inf` faults from a given step): the step is detected, skipped (no parameter or
//!   optimizer moment changes), reported in its record and the loss log, and training goes on.
//! - Faults that persist: `graft train` stops after `max_bad_steps` skipped steps in a row,
//!   writes the last good checkpoint and its adapter, and names them in its error; the checkpoint
//!   loads and holds finite parameters; a strategy that starts panicking mid-run the same.
//! - Trust: a plugin folder (or library) writable by everyone is refused unless overridden; the
//!   SHA-256 graft reports is the library's.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use graft_runtime::plugins::{DirOrigin, FileStatus, LoadError, PluginManager, SearchDir};
use graft_tests::{build_plugins, graft, graft_err, scratch, tiny_model, write_shapes_dataset};
use graft_trainer::checkpoint;
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

fn plugins() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_plugins(&["lora", "fault-plugin"])).clone()
}

fn manager() -> PluginManager {
    let mut m = PluginManager::new(vec![SearchDir { path: plugins(), origin: DirOrigin::Flag }]);
    m.scan();
    m
}

/// A dataset and a training config in `dir`; `extra` goes to the top level, `strategy` is the
/// `[strategy]` body.
fn setup(dir: &Path, steps: u64, extra: &str, strategy: &str) -> PathBuf {
    write_shapes_dataset(&dir.join("data"), 4, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"faults\"\nseed = 5\nsteps = {steps}\n\
         lr_schedule = \"constant\"\n{extra}\n[dataset]\ndir = \"data\"\nresolution = 64\n\n[strategy]\n{strategy}\n",
        tiny_model().to_str().unwrap()
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn trainer(config: &Path) -> Trainer {
    Trainer::new(TrainConfig::from_file(config).unwrap(), manager(), &Device::Cpu).unwrap()
}

fn params(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

fn run_args<'a>(config: &'a Path, plugins: &'a Path) -> Vec<&'a str> {
    vec!["train", "--config", config.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"]
}

/// Every `.safetensors` file under `dir` (temporary names excluded: `.name.tmp...`, `.partial`
/// folders) parses completely.
fn assert_no_partial_files(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            n += assert_no_partial_files(&p);
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{} is not whole: {e}", p.display()));
            n += 1;
        }
    }
    n
}

/// Overwrites every entry of an on-disk latent cache with `value` (keeping its key), returning
/// the original files.
fn poison_cache(cache: &Path, value: f32) -> Vec<(PathBuf, Vec<u8>)> {
    let mut originals = Vec::new();
    for entry in std::fs::read_dir(cache).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
        let data: Vec<Vec<u8>> =
            shapes.iter().map(|(_, s)| std::iter::repeat_n(value.to_le_bytes(), s.iter().product()).flatten().collect()).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = shapes
            .iter()
            .zip(&data)
            .map(|((k, s), d)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
            .collect();
        let poisoned = safetensors::serialize(views, meta.metadata().clone()).unwrap();
        std::fs::write(&p, poisoned).unwrap();
        originals.push((p, bytes));
    }
    assert!(!originals.is_empty(), "no latent cache files in {}", cache.display());
    originals
}

#[test]
fn a_nan_or_inf_batch_is_skipped_and_training_goes_on() {
    let dir = scratch("rel_nan_batch");
    let config = setup(&dir, 20, "cache_latents = \"disk\"", "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }");
    let mut t = trainer(&config);
    for _ in 0..2 {
        assert!(!t.train_step().unwrap().skipped);
    }
    let cache = t.config.output_dir.join("cache");
    for value in [f32::NAN, f32::INFINITY] {
        let before = params(&t);
        let moments = t.optimizer.state_tensors().unwrap().len();
        let originals = poison_cache(&cache, value);
        let r = t.train_step().unwrap();
        assert!(r.skipped && !r.loss.is_finite(), "{value}: {r:?}");
        assert_eq!(params(&t), before, "{value}: a skipped step changed parameters");
        assert_eq!(t.optimizer.state_tensors().unwrap().len(), moments);
        for (p, bytes) in originals {
            std::fs::write(p, bytes).unwrap();
        }
        let r = t.train_step().unwrap();
        assert!(!r.skipped && r.loss.is_finite(), "{value}: {r:?}");
        assert_eq!(t.bad_in_row, 0);
    }
    assert_eq!(t.skipped_total, 2);
}

#[test]
fn a_nan_adapter_output_is_skipped_and_training_goes_on() {
    let dir = scratch("rel_nan_adapter");
    let config = setup(&dir, 20, "", "plugin = \"fault-plugin\"\nconfig = { fault = \"nan\", after = 2, until = 4, lr = 0.01 }");
    let mut t = trainer(&config);
    let mut records = Vec::new();
    let mut snapshots = Vec::new();
    for _ in 0..6 {
        records.push(t.train_step().unwrap());
        snapshots.push(params(&t));
    }
    let skipped: Vec<bool> = records.iter().map(|r| r.skipped).collect();
    assert_eq!(skipped, [false, false, true, true, false, false], "{records:?}");
    assert!(records[2].loss.is_nan() && records[3].loss.is_nan());
    assert_eq!(snapshots[1], snapshots[3], "the skipped steps changed nothing");
    assert_ne!(snapshots[3], snapshots[4], "training went on");
    assert!(snapshots[5].iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert_eq!((t.bad_in_row, t.skipped_total), (0, 2));
}

#[test]
fn an_inf_adapter_output_is_skipped_in_a_command_run_that_completes() {
    let dir = scratch("rel_inf_cli");
    let config = setup(&dir, 6, "save_every = 2", "plugin = \"fault-plugin\"\nconfig = { fault = \"inf\", after = 2, until = 4, lr = 0.01 }");
    let plugins = plugins();
    let outcome = graft_host::train::train(train_args(&run_args(&config, &plugins))).unwrap();
    assert_eq!((outcome.steps, outcome.skipped), (6, 2));
    let out = dir.join("out");
    // Reported: the loss log marks the two steps skipped, with no loss.
    let log = graft_trainer::losslog::read(&out.join("loss.jsonl")).unwrap();
    let marks: Vec<(u64, bool)> = log.iter().map(|e| (e.step, e.skipped)).collect();
    assert_eq!(marks, [(0, false), (1, false), (2, true), (3, true), (4, false), (5, false)]);
    assert!(log[2].loss.is_nan() && log[4].loss.is_finite());
    // No checkpoint right after a skipped step; the exported adapter is finite.
    assert!(out.join("checkpoints/step-000002").is_dir() && !out.join("checkpoints/step-000004").exists());
    assert!(out.join("checkpoints/step-000006").is_dir());
    let native = out.join("faults.graft.safetensors");
    for (k, v) in candle_core::safetensors::load(&native, &Device::Cpu).unwrap() {
        let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{k} is not finite");
    }
    assert!(assert_no_partial_files(&out) >= 4);
}

/// `graft train ARGS` parsed, to call the library entry point and see its outcome.
fn train_args(args: &[&str]) -> graft_host::train::TrainArgs {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: graft_host::train::TrainArgs,
    }
    <Wrap as clap::Parser>::try_parse_from(std::iter::once("graft").chain(args[1..].iter().copied())).unwrap().args
}

/// The last good checkpoint named in a stop message: it is `latest`, loads, and is finite.
fn check_last_good(dir: &Path, config: &Path, error: &str, step: u64) {
    let out = dir.join("out");
    let want = out.join(format!("checkpoints/step-{step:06}"));
    assert!(error.contains(&format!("the last good checkpoint is {}", want.display())), "{error}");
    assert_eq!(checkpoint::latest(&out).unwrap(), Some(want.clone()));
    let mut t = trainer(config);
    checkpoint::load(&mut t, &want).unwrap();
    assert_eq!((t.step, t.bad_in_row), (step, 0));
    for (k, v) in params(&t) {
        assert!(v.iter().all(|x| x.is_finite()), "{k} is not finite in the last good checkpoint");
    }
    assert_no_partial_files(&out);
}

#[test]
fn persistent_nan_stops_the_run_with_its_last_good_checkpoint() {
    let dir = scratch("rel_nan_stop");
    let config =
        setup(&dir, 20, "save_every = 1\nmax_bad_steps = 3", "plugin = \"fault-plugin\"\nconfig = { fault = \"nan\", after = 3, lr = 0.01 }");
    let e = graft_err(&run_args(&config, &plugins()));
    assert!(e.contains("stopped at step 6: 3 steps in a row were skipped (non-finite loss or gradient)"), "{e}");
    check_last_good(&dir, &config, &e, 3);
    let out = dir.join("out");
    for s in 4..=6 {
        assert!(!out.join(format!("checkpoints/step-{s:06}")).exists(), "a checkpoint after a skipped step");
    }
    let log = graft_trainer::losslog::read(&out.join("loss.jsonl")).unwrap();
    assert_eq!(log.iter().map(|e| e.skipped).collect::<Vec<_>>(), [false, false, false, true, true, true]);
    // The last good parameters were exported: finite.
    for (k, v) in candle_core::safetensors::load(out.join("faults.graft.safetensors"), &Device::Cpu).unwrap() {
        let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{k} is not finite in the stop's export");
    }
}

#[test]
fn a_strategy_that_starts_panicking_stops_the_run_with_its_last_good_checkpoint() {
    let dir = scratch("rel_panic_stop");
    let strategy = "plugin = \"fault-plugin\"\nconfig = { fault = \"panic\", entry = \"forward\", after = 2, lr = 0.01 }";
    let config = setup(&dir, 20, "save_every = 1\nmax_bad_steps = 2", strategy);
    let e = graft_err(&run_args(&config, &plugins()));
    assert!(e.contains("stopped at step 4: 2 steps in a row were skipped (the strategy `fault-plugin` failed and is detached)"), "{e}");
    check_last_good(&dir, &config, &e, 2);
    // In-process: the failure is reported (detached, recorded skipped) and the parameters kept.
    let mut t = trainer(&config);
    for _ in 0..2 {
        assert!(!t.train_step().unwrap().skipped);
    }
    let before = params(&t);
    let r = t.train_step().unwrap();
    assert!(r.skipped && t.strategy_failed(), "{r:?}");
    assert_eq!(t.set.failed_strategies(), ["fault-plugin"]);
    assert_eq!(params(&t), before);
}

/// A run whose on-disk latent cache was filled only part way (a crash during caching) trains
/// exactly as a run that cached everything at once: each image's VAE noise is its own, not the
/// next draw of a shared generator (found by the kill test in host/tests/reliability_kill.rs).
#[test]
fn a_latent_cache_filled_part_way_gives_the_same_run() {
    let strategy = "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }";
    let run = |name: &str, drop_half: bool| {
        let dir = scratch(name);
        let config = setup(&dir, 10, "cache_latents = \"disk\"", strategy);
        let text = std::fs::read_to_string(&config).unwrap().replace("resolution = 64", "resolution = 64\nflip_aug = true");
        std::fs::write(&config, text).unwrap();
        if drop_half {
            // Cache everything, then lose every other entry, as a crash during caching would.
            drop(trainer(&config));
            let cache = dir.join("out/cache");
            let mut files: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files.iter().step_by(2) {
                std::fs::remove_file(f).unwrap();
            }
        }
        let mut t = trainer(&config);
        for _ in 0..3 {
            assert!(!t.train_step().unwrap().skipped);
        }
        params(&t)
    };
    assert!(run("rel_cache_whole", false) == run("rel_cache_part", true), "latents depend on what was cached before");
}

#[test]
fn a_strategy_failing_in_on_step_is_detached_and_the_step_skipped() {
    let dir = scratch("rel_on_step");
    let config = setup(&dir, 20, "", "plugin = \"fault-plugin\"\nconfig = { fault = \"error\", entry = \"on_step\", lr = 0.01 }");
    let mut t = trainer(&config);
    let before = params(&t);
    for n in 1..=2 {
        let r = t.train_step().unwrap();
        assert!(r.skipped && t.strategy_failed(), "{r:?}");
        assert_eq!(t.bad_in_row, n);
    }
    assert_eq!(params(&t), before);
}

// ------------------------------------------------------------------ trust

#[cfg(unix)]
#[test]
fn a_plugin_folder_writable_by_everyone_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("rel_trust");
    let lib = dir.join(graft_host_lib("fault-plugin"));
    std::fs::copy(plugins().join(graft_host_lib("fault-plugin")), &lib).unwrap();
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let scan = || {
        let mut m = PluginManager::new(vec![SearchDir { path: dir.clone(), origin: DirOrigin::Flag }]);
        m.scan();
        m
    };
    let lib_c = dir.canonicalize().unwrap().join(lib.file_name().unwrap());
    for (dir_mode, lib_mode, loads) in
        [(0o755, 0o755, true), (0o777, 0o755, false), (0o1777, 0o755, false), (0o755, 0o666, false), (0o775, 0o775, true)]
    {
        mode(&dir, dir_mode);
        mode(&lib, lib_mode);
        let m = scan();
        assert_eq!(m.get("fault-plugin").is_some(), loads, "folder {dir_mode:o}, library {lib_mode:o}");
        if !loads {
            let FileStatus::Failed(LoadError::Untrusted(why)) = &m.files()[&lib_c].status else { panic!("{:?}", m.files()[&lib_c].status) };
            assert!(
                why.contains("writable by everyone") && why.contains("chmod o-w") && why.contains("GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS"),
                "{why}"
            );
            let e = m.require("fault-plugin").unwrap_err().to_string();
            assert!(e.contains("refused"), "{e}");
        }
    }
    // The explicit override loads it (with a warning).
    mode(&dir, 0o777);
    mode(&lib, 0o755);
    // The environment is the whole test process's: reliability_plugins checks a refusal meanwhile.
    let env = graft_tests::env_lock();
    std::env::set_var("GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS", "1");
    let m = scan();
    std::env::remove_var("GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS");
    drop(env);
    mode(&dir, 0o755);
    let p = m.get("fault-plugin").expect("loaded with the override");
    // The hash graft shows is the library's SHA-256 (as sha256sum computes it).
    let out = std::process::Command::new("sha256sum").arg(&lib).output().unwrap();
    let want = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(p.sha256, want);
    assert_eq!(p.source, lib_c);
}

fn graft_host_lib(crate_name: &str) -> String {
    format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

#[test]
fn the_command_path_reports_each_skipped_step_and_completes() {
    // The same as above through `graft train` itself (in-process), resumed: the loss log keeps
    // every step exactly once.
    let dir = scratch("rel_nan_resume");
    let config = setup(&dir, 6, "save_every = 1", "plugin = \"fault-plugin\"\nconfig = { fault = \"nan\", after = 1, until = 2, lr = 0.01 }");
    let plugins = plugins();
    let mut args = run_args(&config, &plugins);
    args.extend(["--steps", "3"]);
    graft(&args).unwrap();
    let mut args = run_args(&config, &plugins);
    args.push("--resume");
    graft(&args).unwrap();
    let log = graft_trainer::losslog::read(&dir.join("out/loss.jsonl")).unwrap();
    assert_eq!(
        log.iter().map(|e| (e.step, e.skipped)).collect::<Vec<_>>(),
        [(0, false), (1, true), (2, false), (3, false), (4, false), (5, false)]
    );
}
