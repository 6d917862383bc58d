//! Plugins that fail on purpose: each fault is reported clearly (strategy, entry point, layer,
//! reason), parameters are kept, and the host goes on running.

use crate::plugins_common as common;

use candle_core::{DType, Device, Tensor};
use common::*;
use graft_abi::ErrorKind;
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{CallContext, FileStatus, LoadError, PluginError, PluginManager, StrategyInstance};
use graft_sdxl::rng::GraftRng;

const ENTRIES: [&str; 8] = ["new", "plan", "forward", "delta_weight", "on_step", "export", "save_state", "load_state"];

fn fault_manager(test: &str) -> PluginManager {
    manager(&plugin_dir(test, &["fault-plugin"]))
}

struct Bench {
    store: ParamStore,
    rng: GraftRng,
    x: Tensor,
    w: Tensor,
    base_out: Tensor,
}

fn bench() -> Bench {
    let mut rng = GraftRng::new(9);
    let x = rng.randn((2, 3, 6), &Device::Cpu).unwrap();
    let w = rng.randn((8, 6), &Device::Cpu).unwrap();
    let base_out = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    Bench { store: ParamStore::new(&Device::Cpu, DType::F32, 1), rng, x, w, base_out }
}

/// Runs a strategy's whole lifecycle, stopping at the first error.
fn lifecycle(m: &PluginManager, name: &str, config: &str, b: &mut Bench) -> Result<Tensor, PluginError> {
    let plugin = m.require("fault-plugin").unwrap();
    let layers = layers();
    let mut s = StrategyInstance::new(plugin, Some(name), config)?;
    let plan = s.plan(&layers)?;
    b.store.apply_plan(name, &plan).unwrap();
    let layer = layer(&layers, TO_K);
    let mut cx = CallContext { store: &b.store, rng: &mut b.rng, training: true, step: 1 };
    let y = s.forward_linear(&mut cx, layer, Some(&b.w.clone().into()), &b.x, &b.base_out)?;
    s.delta_weight(&mut cx, layer, Some(&b.w.clone().into()))?;
    s.on_step(1)?;
    s.export(&mut cx, layer, Some(&b.w.clone().into()))?;
    let state = s.save_state()?;
    s.load_state(&state)?;
    Ok(y)
}

fn entry_name(entry: &str) -> &str {
    if entry == "new" {
        "new_strategy"
    } else {
        entry
    }
}

fn config(fault: &str, entry: &str) -> String {
    format!(r#"{{"fault": "{fault}", "entry": "{entry}"}}"#)
}

#[test]
fn a_panic_in_any_entry_point_is_an_error_and_the_host_goes_on() {
    let m = fault_manager("plugins-faults-panic");
    let mut b = bench();
    for entry in ENTRIES {
        let e = lifecycle(&m, entry, &config("panic", entry), &mut b).expect_err(entry);
        assert!(e.is_panic(), "{entry}: {e}");
        assert_eq!(e.entry, entry_name(entry));
        let text = e.to_string();
        assert!(text.contains(&format!("deliberate panic in {entry}")), "{text}");
        assert!(text.contains("panicked at ") && text.contains("fault-plugin/src/lib.rs"), "{text}");
        assert!(text.contains(&format!("strategy `{entry}` (plugin fault-plugin 0.1.0)")), "{text}");
    }
    // The host, the plugin and other strategies still work.
    let y = lifecycle(&m, "healthy", r#"{"fault": "none"}"#, &mut b).expect("healthy strategy");
    let want = (&b.base_out + 0.5).unwrap();
    assert_eq!(y.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap());
}

#[test]
fn an_error_from_any_entry_point_is_reported() {
    let m = fault_manager("plugins-faults-error");
    let mut b = bench();
    for entry in ENTRIES {
        let e = lifecycle(&m, entry, &config("error", entry), &mut b).expect_err(entry);
        assert!(!e.is_panic());
        assert_eq!(e.entry, entry_name(entry));
        assert!(e.message.contains(&format!("deliberate error in {entry}")), "{e}");
    }
}

#[test]
fn a_wrong_shape_is_reported() {
    let m = fault_manager("plugins-faults-shape");
    let mut b = bench();
    let e = lifecycle(&m, "s", &config("shape", "forward"), &mut b).unwrap_err().to_string();
    assert!(e.contains("failed in forward at layer `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`"), "{e}");
    assert!(e.contains("returned a tensor of shape [2, 3, 7], the hook point's output has shape [2, 3, 8]"), "{e}");
    let e = lifecycle(&m, "s", &config("shape", "delta_weight"), &mut b).unwrap_err().to_string();
    assert!(e.contains("failed in delta_weight") && e.contains("expected [out, in] = [8, 6]"), "{e}");
}

#[test]
fn unknown_and_stale_handles_are_reported() {
    let m = fault_manager("plugins-faults-handle");
    let mut b = bench();
    let e = lifecycle(&m, "s", &config("handle", "forward"), &mut b).unwrap_err();
    assert_eq!(e.kind, ErrorKind::OP);
    assert!(e.message.contains("unknown tensor handle 12345"), "{e}");

    // A handle kept from one call and used in the next.
    let plugin = m.require("fault-plugin").unwrap();
    let layers = layers();
    let mut s = StrategyInstance::new(plugin, Some("stale"), &config("stale", "forward")).unwrap();
    b.store.apply_plan("stale", &s.plan(&layers).unwrap()).unwrap();
    let mut cx = CallContext { store: &b.store, rng: &mut b.rng, training: false, step: 0 };
    let layer = layer(&layers, TO_K);
    s.forward_linear(&mut cx, layer, Some(&b.w.clone().into()), &b.x, &b.base_out).expect("first call");
    let e = s.forward_linear(&mut cx, layer, Some(&b.w.clone().into()), &b.x, &b.base_out).unwrap_err();
    assert!(e.message.contains("comes from an earlier call"), "{e}");
}

#[test]
fn parameters_survive_a_failing_plugin() {
    let m = fault_manager("plugins-faults-params");
    let mut b = bench();
    lifecycle(&m, "p", r#"{"fault": "none"}"#, &mut b).expect("healthy");
    let key = ParamKey::new("p", TO_K, "bias");
    let value = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
    b.store.set(&key, &value).unwrap();
    let n = b.store.len();
    // Same strategy name, now panicking in forward.
    let e = lifecycle(&m, "p", &config("panic", "forward"), &mut b).unwrap_err();
    assert!(e.is_panic());
    assert_eq!(b.store.len(), n);
    let kept = b.store.get(&key).unwrap().var.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(kept, value.to_vec1::<f32>().unwrap());
}

#[test]
fn another_abi_version_is_refused() {
    let dir = plugin_dir("plugins-faults-abi", &["fault-abi-version", "example-scale"]);
    let m = manager(&dir);
    let entry = &m.files()[&dir.join(lib_file("fault-abi-version"))];
    assert_eq!(entry.status, FileStatus::Failed(LoadError::AbiVersion { found: 999 }));
    let text = LoadError::AbiVersion { found: 999 }.to_string();
    assert!(text.contains("ABI 999") && text.contains("ABI 1") && text.contains("rebuild"), "{text}");
    assert!(m.get("fault-abi-version").is_none());
    // The other plugin in the folder is fine.
    assert!(m.get("example-scale").is_some());
    let e = m.require("fault-abi-version").unwrap_err().to_string();
    assert!(e.contains("failed: built for graft plugin ABI 999"), "{e}");
}

#[test]
fn a_foreign_layout_is_refused() {
    let dir = plugin_dir("plugins-faults-layout", &["fault-layout"]);
    let m = manager(&dir);
    let entry = &m.files()[&dir.join(lib_file("fault-layout"))];
    let FileStatus::Failed(LoadError::Incompatible(why)) = &entry.status else {
        panic!("expected an incompatible layout, got {:?}", entry.status);
    };
    assert!(why.contains("layout") && why.contains("expected graft-abi, found fault-layout"), "{why}");
    assert_eq!(m.plugins().count(), 0);
}

#[test]
fn a_file_that_is_not_a_library_is_reported() {
    let dir = plugin_dir("plugins-faults-junk", &[]);
    std::fs::write(dir.join(lib_file("junk")), b"\x7fELF but not really").unwrap();
    let m = manager(&dir);
    let entry = m.files().values().next().expect("the junk file is listed");
    assert!(matches!(entry.status, FileStatus::Failed(LoadError::NotAPlugin(_))), "{:?}", entry.status);
}
