//! Builds real plugin libraries with cargo, loads them from disk, and calls them through the
//! ops table with candle tensors on a small list of hook points.

use crate::plugins_common as common;

use candle_core::{DType, Device, Tensor};
use common::*;
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{check_plan, load_plugin, CallContext, FileStatus, StrategyInstance};
use graft_sdxl::rng::GraftRng;
use graft_tests::{graft, graft_err};

const CONFIG: &str = r#"{"targets": ["unet.*.to_[kv]"], "lr": 0.01}"#;

fn randn(rng: &mut GraftRng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn example_plugin_loads_with_its_manifest() {
    let dir = plugin_dir("plugins-load-manifest", &["example-scale"]);
    let m = manager(&dir);
    let p = m.require("example-scale").expect("example-scale loaded");
    assert_eq!(p.manifest.abi_version, graft_abi::ABI_VERSION);
    assert_eq!(p.manifest.version, "0.1.0");
    assert!(p.manifest.capabilities.contains(&"delta_weight".to_string()));
    assert!(serde_json::from_str::<serde_json::Value>(&p.manifest.config_example).is_ok());
    let entry = &m.files()[&dir.join(lib_file("example-scale"))];
    assert_eq!(entry.status, FileStatus::Active);
    let e = m.require("nope").unwrap_err().to_string();
    assert!(e.contains("no plugin with id `nope`") && e.contains("available: example-scale"), "{e}");
}

#[test]
fn plan_forward_delta_weight_export_and_gradients() -> graft_runtime::Result<()> {
    let dir = plugin_dir("plugins-load-forward", &["example-scale"]);
    let m = manager(&dir);
    let plugin = m.require("example-scale").unwrap();
    let layers = layers();
    let mut s = StrategyInstance::new(plugin, None, CONFIG).expect("strategy");
    let plan = s.plan(&layers).expect("plan");
    let attached: Vec<&str> = plan.attachments.iter().map(|a| a.layer.as_str()).collect();
    assert_eq!(attached, vec![TO_K, TO_V]);
    assert_eq!(plan.attachments[0].params[0].shape.as_slice(), &[6]);
    assert_eq!(plan.groups[0].lr, 0.01);

    let store = ParamStore::new(&Device::Cpu, DType::F32, 11);
    let diff = store.apply_plan(s.name(), &plan)?;
    assert_eq!(diff.created.len(), 2);
    let mut rng = GraftRng::new(4);
    let key = ParamKey::new("example-scale", TO_K, "scale");
    let scale = randn(&mut rng, &[6]);
    store.set(&key, &scale)?;

    // A cross-attention to_k: context [2, 3, 6] -> [2, 3, 8].
    let x = randn(&mut rng, &[2, 3, 6]);
    let w = randn(&mut rng, &[8, 6]);
    let b = randn(&mut rng, &[8]);
    let base_out = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
    let layer = layer(&layers, TO_K);
    let mut cx = CallContext { store: &store, rng: &mut rng, training: true, step: 1 };
    let y = s.forward_linear(&mut cx, layer, Some(&w.clone().into()), &x, &base_out).expect("forward");
    let want = (&base_out + x.broadcast_mul(&scale)?.broadcast_matmul(&w.t()?)?)?;
    assert!(max_diff(&y, &want) < 1e-5);

    // Every trainable parameter of the attached layer gets a gradient.
    let grads = y.sqr()?.sum_all()?.backward()?;
    let g = grads.get(store.get(&key).unwrap().var.as_tensor()).expect("gradient of scale");
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

    // Fusing delta_weight into the base weight gives the same output.
    let dw = s.delta_weight(&mut cx, layer, Some(&w.clone().into())).expect("delta_weight").expect("linear adapter");
    let fused = x.broadcast_matmul(&(&w + &dw)?.t()?)?.broadcast_add(&b)?;
    assert!(max_diff(&fused, &y) < 1e-4);

    // The default export is the full difference.
    let ex = s.export(&mut cx, layer, Some(&w.clone().into())).expect("export").expect("something to export");
    assert_eq!(ex.family, "diff");
    assert!(max_diff(&ex.tensors[0].1, &dw) < 1e-6);

    // Private state round trip.
    assert!(s.on_step(7).expect("on_step").is_empty());
    let state = s.save_state().expect("save_state");
    assert!(state.contains("7"), "{state}");
    let mut other = StrategyInstance::new(plugin, Some("copy"), CONFIG).unwrap();
    other.load_state(&state).expect("load_state");
    assert_eq!(other.save_state().unwrap(), state);
    Ok(())
}

#[test]
fn config_and_plan_errors_are_clear() {
    let dir = plugin_dir("plugins-load-config", &["example-scale"]);
    let m = manager(&dir);
    let plugin = m.require("example-scale").unwrap();
    let e = StrategyInstance::new(plugin, None, r#"{"targetz": []}"#).unwrap_err();
    assert_eq!(e.entry, "new_strategy");
    assert_eq!(e.kind, graft_abi::ErrorKind::CONFIG);
    let text = e.to_string();
    assert!(text.contains("unknown field `targetz`") && text.contains("strategy `example-scale`"), "{text}");

    let mut s = StrategyInstance::new(plugin, None, r#"{"targets": ["vae.*"]}"#).unwrap();
    let e = s.plan(&layers()).unwrap_err().to_string();
    assert!(e.contains("failed in plan") && e.contains("no linear layer matches"), "{e}");

    // The host checks a plan against the hook points.
    let mut plan = graft_abi::Plan::default();
    plan.attachments.push(graft_abi::Attachment { layer: "unet.nope".into(), params: Default::default(), attached: true });
    assert!(check_plan(&plan, &layers()).unwrap_err().contains("`unet.nope`, which is not a hook point"));
}

#[test]
fn the_same_library_loads_twice_from_private_copies() {
    let dir = plugin_dir("plugins-load-twice", &["example-scale"]);
    let path = dir.join(lib_file("example-scale"));
    let private = dir.join("private");
    let a = load_plugin(&path, &private, 1001).expect("first load");
    let b = load_plugin(&path, &private, 1002).expect("second load");
    // Two mappings: the OS did not hand back the first library for the second load.
    let fa = a.module().abi_version() as usize;
    let fb = b.module().abi_version() as usize;
    assert_ne!(fa, fb);
    assert_eq!(a.hash, b.hash);
    assert!(a.new_strategy("{}").is_ok() && b.new_strategy("{}").is_ok());
}

#[test]
fn cli_list_and_check() {
    let dir = plugin_dir("plugins-load-cli", &["example-scale", "fault-abi-version"]);
    let d = dir.to_str().unwrap();
    graft(&["plugins", "list", "--plugins", d, "--no-default-plugins"]).expect("list");
    graft(&["plugins", "list", "--plugins", d, "--no-default-plugins", "--json"]).expect("list --json");
    let lib = dir.join(lib_file("example-scale"));
    graft(&["plugins", "check", lib.to_str().unwrap()]).expect("check");

    let e = graft_err(&["plugins", "check", dir.join(lib_file("fault-abi-version")).to_str().unwrap()]);
    assert!(e.contains("is not loadable") && e.contains("ABI 999"), "{e}");
    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, b"not a library").unwrap();
    let e = graft_err(&["plugins", "check", junk.to_str().unwrap()]);
    assert!(e.contains("not a graft plugin"), "{e}");
    let e = graft_err(&["plugins", "check", lib.to_str().unwrap(), "--config", r#"{"targets": []}"#]);
    assert!(e.contains("`targets` is empty"), "{e}");
    let e = graft_err(&["plugins", "list", "--plugins", "/no/such/folder"]);
    assert!(e.contains("not a folder"), "{e}");
}

/// `graft plugins check`'s conformance checks, run on the DoRA plugin (parameters initialised
/// from the layer, the layer's bias, a DoRA export): all pass; a target pattern that matches
/// nothing is named even when the plugin itself lets it pass.
#[test]
fn conformance_checks_on_the_dora_plugin() {
    use graft_host::plugins::conformance;
    let dir = graft_tests::build_plugins(&["dora"]);
    let m = manager(&dir);
    let dora = m.require("dora").expect("dora plugin");
    let model = workspace().join("tests/fixtures/tiny-sdxl");
    let checks = conformance::run(dora, &dora.manifest.config_example, &model).expect("checks run");
    let names: Vec<&str> = checks.iter().map(|c| c.check).collect();
    assert_eq!(
        names,
        [
            "config schema",
            "plan on SDXL base 1.0",
            "plan on the test model",
            "zero-init identity",
            "parameters take effect",
            "fuse / unfuse",
            "eject restores the model",
            "export -> load"
        ]
    );
    for c in &checks {
        assert!(c.passed, "{}: {}", c.check, c.detail);
    }
    // The export is one LyCORIS file (kohya keys with dora_scale), no PEFT file.
    let export = checks.last().unwrap();
    assert!(export.detail.starts_with("check.safetensors: differs by"), "{}", export.detail);

    // The magnitude starts as the row norms of the base weight (init_param through the host).
    let sdxl = graft_sdxl::SdxlModel::load(&model, None, &Device::Cpu).unwrap();
    let mut set = graft_runtime::adapters::dispatcher::AdapterSet::new(&sdxl, 1);
    set.add(StrategyInstance::new(dora, None, "{}").unwrap(), 1.0, 1.0).unwrap();
    let layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k";
    let magnitude = set.store().get(&ParamKey::new("dora", layer, "magnitude")).expect("magnitude").var.as_tensor().clone();
    let weight = sdxl.registries()[0]
        .layers()
        .iter()
        .position(|l| l.name == layer)
        .and_then(|i| sdxl.registries()[0].linear_weights(i).cloned())
        .expect("layer weights");
    let norms = weight.read().unwrap().weight_f32().unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    assert!(max_diff(&magnitude, &norms) < 1e-6);

    let config = r#"{"targets": ["unet.*.to_q", "unet.*.no_such_layer"]}"#;
    let checks = conformance::run(dora, config, &model).expect("checks run");
    assert!(checks[0].passed, "{:?}", checks[0]);
    assert!(!checks[1].passed && checks[1].detail.contains("`unet.*.no_such_layer`"), "{:?}", checks[1]);
    assert!(!checks[2].passed && checks.len() == 3, "a plan that fails on the test model stops the checks: {checks:?}");
}

/// Every shipped plugin describes its configuration: a schema, read through the
/// `graft.config_schema` extension, that lists exactly the keys its parser accepts (compared with
/// the parser's own "unknown field" list), each with a default the parser takes and within its
/// range. A key the schema does not list is refused by the parser and, before it, by the host.
#[test]
fn shipped_plugins_have_config_schemas_matching_their_parsers() {
    use graft_host::plugins::conformance;
    let shipped = ["lora", "attention-gate", "progressive-fusion", "dora", "example-scale"];
    let built = graft_tests::build_plugins(&shipped);
    // A folder of their own: the sdk-v1 test builds an older `example-scale` into `built`.
    let dir = workspace().join("target/test-scratch/shipped-schemas");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for id in shipped {
        std::fs::copy(built.join(lib_file(id)), dir.join(lib_file(id))).unwrap();
    }
    let m = manager(&dir);
    for id in shipped {
        let p = m.require(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        let schema = p.config_schema.as_ref().unwrap_or_else(|| panic!("{id} has no config schema"));
        assert!(schema.keys.iter().all(|k| !k.help.is_empty()), "{id}: every key has its help line");
        let check = conformance::schema_check(p, &p.manifest.config_example);
        assert!(check.passed && check.detail.contains("the same as the parser's"), "{id}: {}", check.detail);
        StrategyInstance::new(p, None, &schema.defaults().to_string()).unwrap_or_else(|e| panic!("{id}: the defaults: {e}"));
        let probe = r#"{"not_a_key": 1}"#;
        let raw = p.new_strategy(probe).err().unwrap_or_else(|| panic!("{id}: its parser takes an unknown key"));
        assert!(raw.message.contains("unknown field `not_a_key`"), "{id}: {}", raw.message);
        let e = StrategyInstance::new(p, None, probe).unwrap_err().to_string();
        assert!(e.contains("(by its config schema): unknown field `not_a_key`"), "{id}: {e}");
    }
    // A value out of range is refused by the host, naming the key; `graft plugins check` shows
    // the schema as a table.
    let lora = m.require("lora").unwrap();
    let e = StrategyInstance::new(lora, None, r#"{"rank": 0}"#).unwrap_err();
    assert_eq!(e.kind, graft_abi::ErrorKind::CONFIG);
    assert!(e.to_string().contains("key `rank`: 0 is out of range (must be >= 1)"), "{e}");
    let table = graft_host::plugins::cli::schema_table(lora.config_schema.as_ref().unwrap());
    let rank = table.lines().find(|l| l.trim_start().starts_with("rank ")).unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = rank.split_whitespace().take(4).collect();
    assert_eq!(cols, ["rank", "int", "8", "[1,"], "{table}");
    graft(&["plugins", "check", "--load-only", dir.join(lib_file("lora")).to_str().unwrap()]).expect("check prints the schema");
}

/// `tests/fixtures/sdk-v1.tar.gz` holds graft-abi, graft-sdk and the example-scale plugin as they
/// were before anything was added to ABI version 1 (frozen; never edit it). Extracted into a
/// scratch folder, with the plugin renamed `sdk-v1-example` so its library does not replace the
/// workspace's example-scale.
fn extract_sdk_v1(test: &str) -> std::path::PathBuf {
    let dir = workspace().join("target/test-scratch").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new("tar")
        .arg("xzf")
        .arg(workspace().join("tests/fixtures/sdk-v1.tar.gz"))
        .arg("-C")
        .arg(&dir)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    // Cargo names a workspace crate's build by its path inside the workspace: under
    // `crates/graft-sdk` the first SDK would share (and overwrite) the artifacts of today's in the
    // tests' target folder. So it moves to `sdk-v1/`.
    std::fs::rename(dir.join("crates"), dir.join("sdk-v1")).unwrap();
    let manifest = dir.join("plugins/example-scale/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("name = \"example-scale\"", "name = \"sdk-v1-example\"");
    std::fs::write(&manifest, text).unwrap();
    dir
}

/// Copies the built `sdk-v1-example` library into a folder of its own and checks it: it loads,
/// and passes every conformance check.
fn check_v1_library(test: &str) {
    let libs = workspace().join("target/test-scratch").join(format!("{test}-lib"));
    let _ = std::fs::remove_dir_all(&libs);
    std::fs::create_dir_all(&libs).unwrap();
    std::fs::copy(plugin_out().join(lib_file("sdk-v1-example")), libs.join(lib_file("sdk-v1-example"))).unwrap();
    let m = manager(&libs);
    let p = m.require("example-scale").expect("the ABI-1 plugin loads");
    let model = workspace().join("tests/fixtures/tiny-sdxl");
    let checks = graft_host::plugins::conformance::run(p, &p.manifest.config_example, &model).expect("checks run");
    for c in &checks {
        assert!(c.passed, "{test}: {}: {}", c.check, c.detail);
    }
}

/// Plugins of the first SDK keep working: their source builds unchanged against today's SDK,
/// and a binary built with the first SDK loads in today's host (the additions came as the
/// `graft.ops` extension, not as changes to the ABI's types). Both pass the conformance checks.
/// One test, because both build the same crate into the tests' target folder.
#[test]
fn plugins_of_the_first_sdk_build_and_load() {
    // The source against today's SDK.
    let dir = extract_sdk_v1("sdk-v1-source");
    let plugin = dir.join("plugins/example-scale");
    let manifest = format!(
        "[package]\nname = \"sdk-v1-example\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\ngraft-sdk = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n{}",
        workspace().join("crates/graft-sdk").to_str().unwrap(),
        standalone_tail()
    );
    std::fs::write(plugin.join("Cargo.toml"), manifest).unwrap();
    build_standalone(&plugin, "the ABI-1 example plugin against today's SDK");
    check_v1_library("sdk-v1-source");

    // The binary built with the first SDK.
    let dir = extract_sdk_v1("sdk-v1-binary");
    let root: toml::Table = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap().parse().unwrap();
    let mut ws = toml::Table::new();
    ws.insert("members".into(), toml::Value::Array(vec!["sdk-v1/graft-abi".into(), "sdk-v1/graft-sdk".into(), "plugins/example-scale".into()]));
    ws.insert("resolver".into(), "2".into());
    for key in ["package", "dependencies"] {
        ws.insert(key.into(), root["workspace"][key].clone());
    }
    let deps = ws["dependencies"].as_table_mut().unwrap();
    for name in ["graft-abi", "graft-sdk"] {
        let mut dep = toml::Table::new();
        dep.insert("path".into(), format!("sdk-v1/{name}").into());
        deps.insert(name.into(), toml::Value::Table(dep));
    }
    let mut top = toml::Table::new();
    top.insert("workspace".into(), toml::Value::Table(ws));
    if let Some(p) = root.get("profile") {
        top.insert("profile".into(), p.clone());
    }
    std::fs::write(dir.join("Cargo.toml"), toml::to_string(&top).unwrap()).unwrap();
    build_standalone(&dir, "the ABI-1 example plugin with the first SDK");
    check_v1_library("sdk-v1-binary");
}
