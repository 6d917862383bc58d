//! Hot reload inside a running host: a copy of the example plugin's source is built, loaded and
//! used; its source changes and is rebuilt; the watcher reports the new build, the strategy
//! switches to it between two "steps" with its parameters and private state kept; a broken
//! library in its place is reported while the last good build keeps running; unchanged bytes
//! are skipped.

use crate::plugins_common as common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::*;
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{CallContext, PluginManager, ReloadEvent, StrategyInstance};
use graft_sdxl::rng::GraftRng;

const ID: &str = "reload-probe";

/// Writes the probe crate: the example plugin's source with its id, version and gain changed.
fn write_probe(dir: &Path, version: &str, gain: &str) {
    let src = std::fs::read_to_string(workspace().join("plugins/example-scale/src/lib.rs")).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "the example plugin no longer contains {from:?}; update this test");
        text.replace(from, to)
    };
    let src = replace(src, r#"Manifest::new("example-scale", env!("CARGO_PKG_VERSION"))"#, &format!(r#"Manifest::new("{ID}", "{version}")"#));
    let src = replace(src, "Ok(inputs.base_out()? + extra)", &format!("Ok(inputs.base_out()? + extra * {gain})"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), src).unwrap();
    let sdk = workspace().join("crates/graft-sdk");
    let manifest = format!(
        "[package]\nname = \"{ID}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\ngraft-sdk = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n{}",
        sdk.to_str().unwrap(),
        standalone_tail()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
}

/// Waits for a reload event about the probe's library.
fn wait_for(m: &mut PluginManager, what: &str, pick: impl Fn(&ReloadEvent) -> bool) -> ReloadEvent {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        for e in m.wait_reloads(Duration::from_secs(2)) {
            if pick(&e) {
                return e;
            }
            seen.push(e.to_string());
        }
    }
    panic!("no {what} event within 60 s; saw: {seen:#?}");
}

#[test]
fn a_rebuilt_plugin_takes_over_between_steps_with_its_parameters() -> graft_runtime::Result<()> {
    let src = tempfile::tempdir().unwrap();
    let lib = plugin_out().join(lib_file(ID));
    let _ = std::fs::remove_file(&lib);

    // Version 1, built and loaded.
    write_probe(src.path(), "1.0.0", "1.0");
    build_standalone(src.path(), "the reload probe v1");
    let mut m = manager(&plugin_out());
    assert_eq!(m.require(ID).unwrap().manifest.version, "1.0.0");

    let layers = layers();
    let layer = layer(&layers, TO_K);
    let store = ParamStore::new(&Device::Cpu, DType::F32, 5);
    let mut s = StrategyInstance::new(m.require(ID).unwrap(), None, r#"{"targets": ["*.to_k"]}"#).unwrap();
    let plan = s.plan(&layers).unwrap();
    store.apply_plan(s.name(), &plan)?;
    // "Training" changed the parameter and the plugin's private state.
    let mut rng = GraftRng::new(2);
    let key = ParamKey::new(ID, TO_K, "scale");
    let trained = rng.randn(6, &Device::Cpu)?;
    store.set(&key, &trained)?;
    s.on_step(41).unwrap();

    let x = rng.randn((2, 3, 6), &Device::Cpu)?;
    let w = rng.randn((8, 6), &Device::Cpu)?;
    let base_out = x.broadcast_matmul(&w.t()?)?;
    let extra = x.broadcast_mul(&trained)?.broadcast_matmul(&w.t()?)?;
    let mut forward = |s: &StrategyInstance| -> Tensor {
        let mut cx = CallContext { store: &store, rng: &mut rng, training: false, step: 0 };
        s.forward_linear(&mut cx, layer, Some(&w.clone().into()), &x, &base_out).expect("forward")
    };
    let close = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5;
    assert!(close(&forward(&s), &(&base_out + &extra)?));

    // Version 2: the source changes, cargo rebuilds, the watcher reports it.
    m.watch().unwrap();
    write_probe(src.path(), "2.0.0", "2.0");
    build_standalone(src.path(), "the reload probe v2");
    let event = wait_for(&mut m, "reload", |e| matches!(e, ReloadEvent::Reloaded { id, .. } if id == ID));
    let ReloadEvent::Reloaded { old_version, new_version, old_build, new_build, .. } = &event else { unreachable!() };
    assert_eq!((old_version.as_str(), new_version.as_str()), ("1.0.0", "2.0.0"));
    // The log tells the builds apart by their content.
    assert!(old_build.len() == 12 && new_build.len() == 12 && old_build != new_build, "{old_build} {new_build}");
    assert!(event.to_string().contains(&format!("(build {new_build})")), "{event}");
    // The old build is still what the strategy runs until the switch at the step boundary.
    assert!(close(&forward(&s), &(&base_out + &extra)?));

    let (_, diff) = s.reload(m.require(ID).unwrap(), &layers, &store).expect("switch to v2");
    assert!(diff.is_same(), "{diff}");
    assert_eq!(diff.kept, vec![key.clone()]);
    assert_eq!(s.manifest().version, "2.0.0");
    assert_eq!(store.get(&key).unwrap().var.as_tensor().to_vec1::<f32>()?, trained.to_vec1::<f32>()?);
    assert!(s.save_state().unwrap().contains("41"), "private state carried over");
    assert!(close(&forward(&s), &(&base_out + (&extra * 2.0)?)?));

    // A broken library in its place: reported, and version 2 keeps running.
    std::fs::write(&lib, b"garbage, not a library").unwrap();
    let event = wait_for(&mut m, "failure", |e| matches!(e, ReloadEvent::Failed { path, .. } if path == &lib));
    let ReloadEvent::Failed { still_running, .. } = &event else { unreachable!() };
    assert_eq!(still_running.as_deref(), Some("reload-probe 2.0.0"), "{event}");
    assert_eq!(m.require(ID).unwrap().manifest.version, "2.0.0");
    assert!(close(&forward(&s), &(&base_out + (&extra * 2.0)?)?));

    // The same bytes written again: skipped, no event.
    std::fs::write(&lib, b"garbage, not a library").unwrap();
    let quiet = m.wait_reloads(Duration::from_secs(2));
    assert!(quiet.iter().all(|e| !matches!(e, ReloadEvent::Failed { path, .. } if path == &lib)), "{quiet:?}");

    let _ = std::fs::remove_file(&lib);
    Ok(())
}
