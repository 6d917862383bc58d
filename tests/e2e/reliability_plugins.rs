//! Plugins under load: many hot reloads of a strategy while it trains (`Trainer` with the plugin
//! folder watched, as `graft train --watch` runs), some of them broken builds:
//!
//! - a source that does not compile: cargo fails, the library is untouched, the running build
//!   goes on;
//! - a build whose forward panics: taken up, then detached at its first step, the step skipped
//!   and reported, every parameter kept; the next good build takes over with them;
//! - a build for another ABI version, a file that is no library, a good build in a folder anyone
//!   can write to: refused and reported, the running build goes on.
//!
//! After every reload the parameters and optimizer moments are exactly those before it.

use crate::plugins_common as common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use graft_runtime::plugins::{FileStatus, LoadError};
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

const ID: &str = "reliability-probe";

/// The LoRA plugin's source with the probe's id, a version and a gain (an expression) on its
/// output.
fn probe_source(version: &str, gain: &str) -> String {
    let src = graft_tests::lora_plugin_source();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "the lora plugin no longer contains {from:?}; update this test");
        text.replace(from, to)
    };
    let src = replace(src, r#"Manifest::new("lora", env!("CARGO_PKG_VERSION"))"#, &format!(r#"Manifest::new("{ID}", "{version}")"#));
    replace(src, "Ok(base_out + ly * (c.multiplier * c.scale()))", &format!("Ok(base_out + ly * (({gain}) * c.multiplier * c.scale()))"))
}

fn write_crate(dir: &Path, name: &str, src: &str, deps: &str, workspace_tail: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), src).unwrap();
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n{deps}\n{workspace_tail}"
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
}

fn sdk_deps() -> String {
    format!(
        "graft-sdk = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n",
        workspace().join("crates/graft-sdk").to_str().unwrap()
    )
}

/// The builds the test swaps in, built at once as one small workspace.
struct Builds {
    good: Vec<(String, PathBuf)>,
    panics: PathBuf,
    abi999: PathBuf,
    /// A crate whose source does not compile.
    broken: PathBuf,
}

fn build_variants() -> Builds {
    let root = workspace().join("target/test-scratch/reliability_plugins_src");
    let _ = std::fs::remove_dir_all(&root);
    let good = [("probe-v1", "1.0.0", "1.0"), ("probe-v2", "2.0.0", "2.0"), ("probe-v3", "3.0.0", "0.5")];
    for (name, version, gain) in good {
        write_crate(&root.join(name), name, &probe_source(version, gain), &sdk_deps(), "");
    }
    let panic_gain = r#"if true { panic!("deliberate panic in the probe's forward") } else { 1.0 }"#;
    write_crate(&root.join("probe-panics"), "probe-panics", &probe_source("9.0.0-panics", panic_gain), &sdk_deps(), "");
    // The ABI fixture with the probe's id: a build of "the same plugin" for ABI 999.
    let abi_src = std::fs::read_to_string(workspace().join("tests/plugins/fault-abi-version/src/lib.rs"))
        .unwrap()
        .replace(r#"id: "fault-abi-version".into()"#, &format!(r#"id: "{ID}".into()"#));
    assert!(abi_src.contains(ID), "the ABI fixture changed; update this test");
    let abi_deps = format!(
        "graft-abi = {{ path = {:?} }}\nabi_stable = {{ version = \"0.11.3\", default-features = false }}\n",
        workspace().join("crates/graft-abi").to_str().unwrap()
    );
    write_crate(&root.join("probe-abi999"), "probe-abi999", &abi_src, &abi_deps, "");
    let mut tail = standalone_tail();
    tail = tail.replacen(
        "[workspace]",
        "[workspace]\nresolver = \"2\"\nmembers = [\"probe-v1\", \"probe-v2\", \"probe-v3\", \"probe-panics\", \"probe-abi999\"]",
        1,
    );
    std::fs::write(root.join("Cargo.toml"), tail).unwrap();
    std::fs::copy(workspace().join("Cargo.lock"), root.join("Cargo.lock")).unwrap();
    let out = cargo()
        .arg("build")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--workspace")
        .arg("--target-dir")
        .arg(plugin_target())
        .output()
        .unwrap();
    assert!(out.status.success(), "building the probe variants failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let broken = root.join("broken");
    write_crate(&broken, "probe-broken", &probe_source("0.0.0-broken", "not_a_value"), &sdk_deps(), &standalone_tail());
    std::fs::copy(workspace().join("Cargo.lock"), broken.join("Cargo.lock")).unwrap();
    let lib = |name: &str| plugin_out().join(lib_file(name));
    Builds {
        good: good.iter().map(|(n, v, _)| (v.to_string(), lib(n))).collect(),
        panics: lib("probe-panics"),
        abi999: lib("probe-abi999"),
        broken,
    }
}

/// Replaces the watched library the way cargo does: a new file renamed into place.
fn swap_in(lib: &Path, bytes: &[u8]) {
    let tmp = lib.with_file_name(".incoming.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, lib).unwrap();
}

fn version(t: &Trainer) -> String {
    t.set.strategies()[t.strategy].instance.manifest().version.clone()
}

type Snapshot = (Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>);

/// Every parameter and optimizer state tensor, by name.
fn snapshot(t: &Trainer) -> Snapshot {
    let params = t.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
    let mut state: Vec<(String, Vec<f32>)> = t
        .optimizer
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()))
        .collect();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    (params, state)
}

/// Polls (between steps, as the training loop does) until `done`, for at most 20 s.
fn poll_until(t: &mut Trainer, what: &str, done: impl Fn(&Trainer) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        t.poll_reloads().unwrap();
        if done(t) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(t: &Trainer, lib: &Path) -> Option<FileStatus> {
    t.plugins.files().get(lib).map(|e| e.status.clone())
}

fn good_step(t: &mut Trainer) {
    let r = t.train_step().unwrap();
    assert!(!r.skipped && r.loss.is_finite(), "{r:?}");
}

#[test]
fn many_hot_reloads_and_broken_builds_during_training_lose_nothing() {
    let builds = build_variants();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib = lib_dir.path().canonicalize().unwrap().join(lib_file(ID));
    let bytes: Vec<Vec<u8>> = builds.good.iter().map(|(_, p)| std::fs::read(p).unwrap()).collect();
    swap_in(&lib, &bytes[0]);

    let data = tempfile::tempdir().unwrap();
    graft_tests::write_shapes_dataset(&data.path().join("data"), 2, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\nseed = 2\nsteps = 1000\n[dataset]\ndir = \"data\"\nresolution = 64\n\
         [strategy]\nplugin = \"{ID}\"\nconfig = {{ rank = 4, alpha = 4, unet_lr = 0.01, dropout = 0.1 }}\n",
        workspace().join("tests/fixtures/tiny-sdxl").to_str().unwrap()
    );
    std::fs::write(data.path().join("train.toml"), config).unwrap();
    let config = TrainConfig::from_file(&data.path().join("train.toml")).unwrap();
    let mut t = Trainer::new(config, manager(lib_dir.path()), &Device::Cpu).unwrap();
    t.plugins.watch().unwrap();
    good_step(&mut t);

    let (mut reloads, mut refused, mut skipped) = (0, 0, 0);
    let mut current = 0;
    for round in 0..12 {
        // A good build: taken up between steps with everything kept.
        let next = (current + 1) % bytes.len();
        let before = snapshot(&t);
        swap_in(&lib, &bytes[next]);
        let want = builds.good[next].0.clone();
        poll_until(&mut t, &format!("reload {round} to {want}"), |t| version(t) == want);
        assert!(snapshot(&t) == before, "reload {round} changed parameters or optimizer moments");
        reloads += 1;
        current = next;
        good_step(&mut t);

        match round {
            2 => {
                // A source that does not compile: cargo fails; nothing changes here.
                let out = cargo()
                    .arg("build")
                    .arg("--manifest-path")
                    .arg(builds.broken.join("Cargo.toml"))
                    .arg("--target-dir")
                    .arg(plugin_target())
                    .output()
                    .unwrap();
                assert!(!out.status.success(), "the broken probe compiled");
                assert!(String::from_utf8_lossy(&out.stderr).contains("not_a_value"));
                std::thread::sleep(Duration::from_millis(400));
                t.poll_reloads().unwrap();
                assert_eq!(version(&t), builds.good[current].0);
                good_step(&mut t);
                refused += 1;
            }
            4 => {
                // A build that panics in forward: detached at its first step, step skipped,
                // parameters kept, until a good build replaces it.
                let before = snapshot(&t);
                swap_in(&lib, &std::fs::read(&builds.panics).unwrap());
                poll_until(&mut t, "the panicking build", |t| version(t) == "9.0.0-panics");
                reloads += 1;
                for _ in 0..2 {
                    let r = t.train_step().unwrap();
                    assert!(r.skipped && t.strategy_failed(), "{r:?}");
                    skipped += 1;
                }
                assert_eq!(t.set.failed_strategies(), [ID]);
                assert!(snapshot(&t).0 == before.0, "a failed strategy lost parameters");
                swap_in(&lib, &bytes[current]);
                poll_until(&mut t, "the good build after the panicking one", |t| version(t) == builds.good[current].0);
                reloads += 1;
                assert!(!t.strategy_failed());
                assert!(snapshot(&t).0 == before.0);
                good_step(&mut t);
                refused += 1;
            }
            6 => {
                // Built for another ABI version: refused, reported in the file list.
                swap_in(&lib, &std::fs::read(&builds.abi999).unwrap());
                poll_until(&mut t, "the ABI 999 build to be refused", |t| {
                    status(t, &lib) == Some(FileStatus::Failed(LoadError::AbiVersion { found: 999 }))
                });
                assert_eq!(version(&t), builds.good[current].0);
                good_step(&mut t);
                refused += 1;
            }
            8 => {
                // Not a library at all.
                swap_in(&lib, b"\x7fELF truncated by a crash");
                poll_until(&mut t, "the junk file to be refused", |t| {
                    matches!(status(t, &lib), Some(FileStatus::Failed(LoadError::NotAPlugin(_))))
                });
                assert_eq!(version(&t), builds.good[current].0);
                good_step(&mut t);
                refused += 1;
            }
            10 => {
                // A good build in a folder anyone can write to: refused until the folder is fixed
                // (and while no other test sets GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS).
                use std::os::unix::fs::PermissionsExt;
                let _env = graft_tests::env_lock();
                let next = (current + 1) % bytes.len();
                std::fs::set_permissions(lib_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
                swap_in(&lib, &bytes[next]);
                poll_until(&mut t, "the build in a world-writable folder to be refused", |t| {
                    matches!(status(t, &lib), Some(FileStatus::Failed(LoadError::Untrusted(_))))
                });
                assert_eq!(version(&t), builds.good[current].0);
                good_step(&mut t);
                std::fs::set_permissions(lib_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
                swap_in(&lib, &bytes[next]);
                let want = builds.good[next].0.clone();
                poll_until(&mut t, "the same build once the folder is fixed", |t| version(t) == want);
                current = next;
                reloads += 1;
                good_step(&mut t);
                refused += 1;
            }
            _ => {}
        }
    }
    println!("{reloads} hot reloads, {refused} broken builds refused or survived, {skipped} steps skipped, {} steps", t.step);
    assert!(reloads >= 15 && refused == 5);
    // Optimizer moments kept across all of it: every parameter has been stepped every good step.
    let first = t.parameters()[0].0.clone();
    assert_eq!(t.optimizer.step_count(&first), t.step - skipped);
}
