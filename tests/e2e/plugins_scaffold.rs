//! `graft plugin new NAME` makes a crate that builds and loads as it is.

use crate::plugins_common as common;

use candle_core::{DType, Device};
use common::*;
use graft_runtime::adapters::store::ParamStore;
use graft_runtime::plugins::{load_plugin, CallContext, StrategyInstance};
use graft_sdxl::rng::GraftRng;
use graft_tests::{graft, graft_err};

#[test]
fn a_new_plugin_builds_loads_and_runs() -> graft_runtime::Result<()> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("scaffold-probe");
    let sdk = workspace().join("crates/graft-sdk");
    graft(&["plugin", "new", "scaffold-probe", "--dir", dir.to_str().unwrap(), "--sdk", sdk.to_str().unwrap()]).expect("plugin new");
    let cargo_toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(cargo_toml.contains("crate-type = [\"cdylib\"]") && cargo_toml.contains("[workspace]"), "{cargo_toml}");
    assert!(!cargo_toml.contains("candle"), "plugins never depend on candle");
    // A crate of its own: the SDK by absolute path, the host's dependency versions, a .gitignore.
    let sdk_abs = sdk.canonicalize().unwrap();
    assert!(cargo_toml.contains(&format!("path = \"{}\"", sdk_abs.display())), "{cargo_toml}");
    assert_eq!(std::fs::read_to_string(dir.join(".gitignore")).unwrap(), "/target\n");
    let abi_stable = |lock: &str| {
        let package = lock.split("[[package]]").find(|p| p.contains("name = \"abi_stable\""))?;
        package.lines().find(|l| l.starts_with("version = ")).map(str::to_string)
    };
    let host_lock = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
    assert_eq!(abi_stable(&std::fs::read_to_string(dir.join("Cargo.lock")).unwrap()), abi_stable(&host_lock));

    // Build it as the user would (plus the workspace's profiles, so the tests reuse the
    // dependencies already built).
    std::fs::write(dir.join("Cargo.toml"), cargo_toml.replace("[workspace]\n", &standalone_tail())).unwrap();
    build_standalone(&dir, "the scaffolded plugin");
    assert_eq!(abi_stable(&std::fs::read_to_string(dir.join("Cargo.lock")).unwrap()), abi_stable(&host_lock), "the build moved abi_stable");
    let lib = plugin_out().join(lib_file("scaffold-probe"));
    let plugin = load_plugin(&lib, &tmp.path().join("private"), 1).expect("the new plugin loads");
    assert_eq!(plugin.manifest.id, "scaffold-probe");
    // It starts with a config schema that matches its parser (the host's conformance check of it).
    let check = graft_host::plugins::conformance::schema_check(&plugin, &plugin.manifest.config_example);
    assert!(plugin.config_schema.is_some() && check.passed && check.detail.contains("the same as the parser's"), "{}", check.detail);

    // Its default strategy attaches a zero-initialised low-rank adapter: output unchanged.
    let layers = layers();
    let mut s = StrategyInstance::new(&plugin, None, &plugin.manifest.config_example).expect("config example");
    let plan = s.plan(&layers).expect("plan");
    let attached: Vec<&str> = plan.attachments.iter().map(|a| a.layer.as_str()).collect();
    assert_eq!(attached, vec![TO_Q, TO_K, TO_V]);
    let store = ParamStore::new(&Device::Cpu, DType::F32, 1);
    store.apply_plan(s.name(), &plan)?;
    let mut rng = GraftRng::new(3);
    let x = rng.randn((1, 4, 6), &Device::Cpu)?;
    let w = rng.randn((8, 6), &Device::Cpu)?;
    let base_out = x.broadcast_matmul(&w.t()?)?;
    let mut cx = CallContext { store: &store, rng: &mut rng, training: true, step: 0 };
    let y = s.forward_linear(&mut cx, layer(&layers, TO_K), Some(&w.clone().into()), &x, &base_out).expect("forward");
    assert_eq!(y.to_vec3::<f32>()?, base_out.to_vec3::<f32>()?);
    let _ = std::fs::remove_file(&lib);
    Ok(())
}

#[test]
fn bad_names_and_existing_folders_are_refused() {
    let e = graft_err(&["plugin", "new", "My Plugin"]);
    assert!(e.contains("lower-case letters"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let e = graft_err(&["plugin", "new", "p", "--dir", tmp.path().to_str().unwrap()]);
    assert!(e.contains("already exists and is not empty"), "{e}");
}
