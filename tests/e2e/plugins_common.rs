//! Shared by the plugin tests (the `plugins_common` module of the e2e binary): building real plugin crates with
//! cargo, scratch plugin folders, a small list of hook points.
//!
//! Plugins are built into `target/plugin-tests` (not `target/`), so the cargo running the tests
//! does not hold the lock we need; abi_stable and the other dependencies compile there once.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use graft_runtime::plugins::{layers_to_abi, DirOrigin, PluginManager, SearchDir};
use graft_sdxl::hooks::{AttentionKind, BlockPosition, Component, LayerInfo, LayerKind};

/// The workspace's plugin crates the tests load.
pub const WORKSPACE_PLUGINS: [&str; 4] = ["example-scale", "fault-plugin", "fault-abi-version", "fault-layout"];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn plugin_target() -> PathBuf {
    workspace().join("target/plugin-tests")
}

/// Where cargo puts the plugin libraries built by the tests.
pub fn plugin_out() -> PathBuf {
    plugin_target().join("debug")
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The file name of a crate's cdylib on this platform.
pub fn lib_file(crate_name: &str) -> String {
    format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

fn run_cargo(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run cargo for {what}: {e}"));
    assert!(out.status.success(), "cargo failed for {what}:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Builds the workspace plugin crates (once per test process: `graft_tests::build_plugins`) and
/// returns their folder.
pub fn built_plugins() -> PathBuf {
    graft_tests::build_plugins(&WORKSPACE_PLUGINS)
}

/// A fresh folder holding copies of the given built workspace plugins.
pub fn plugin_dir(test: &str, crates: &[&str]) -> PathBuf {
    let from = built_plugins();
    let dir = workspace().join("target/test-scratch").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    for c in crates {
        let f = lib_file(c);
        std::fs::copy(from.join(&f), dir.join(&f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    dir
}

/// A manager over one folder, scanned.
pub fn manager(dir: &Path) -> PluginManager {
    let mut m = PluginManager::new(vec![SearchDir { path: dir.to_path_buf(), origin: DirOrigin::Flag }]);
    m.scan();
    m
}

/// The `[workspace]` table and the workspace's profiles, for a crate built outside the
/// workspace into the same target folder (so the dependencies built there are reused).
pub fn standalone_tail() -> String {
    let root: toml::Table = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap().parse().unwrap();
    let mut tail = toml::Table::new();
    tail.insert("workspace".into(), toml::Value::Table(toml::Table::new()));
    if let Some(p) = root.get("profile") {
        tail.insert("profile".into(), p.clone());
    }
    toml::to_string(&tail).unwrap()
}

/// Builds a crate that is its own workspace into the tests' plugin target folder, with the
/// workspace's lock file (same dependency versions).
pub fn build_standalone(dir: &Path, what: &str) {
    if !dir.join("Cargo.lock").exists() {
        std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
    }
    let mut cmd = cargo();
    cmd.arg("build").arg("--manifest-path").arg(dir.join("Cargo.toml")).arg("--target-dir").arg(plugin_target());
    run_cargo(cmd, what);
}

fn linear(name: &str, inf: usize, outf: usize, attention: Option<AttentionKind>) -> LayerInfo {
    LayerInfo {
        name: name.to_string(),
        kind: LayerKind::Linear,
        component: if name.starts_with("unet") { Component::Unet } else { Component::TextEncoder },
        in_features: inf,
        out_features: outf,
        block: if name.starts_with("unet") { BlockPosition::Down(0) } else { BlockPosition::TextLayer(0) },
        attention,
        conv: None,
    }
}

pub const TO_Q: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q";
pub const TO_K: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
pub const TO_V: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v";
pub const ATTN2: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2";
pub const TE_Q: &str = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";

/// A few hook points of odd, unequal sizes (cross-attention: context width 6, query width 8).
pub fn layers() -> Vec<graft_abi::LayerInfo> {
    let cross = Some(AttentionKind::CrossAttention);
    let host = vec![
        linear(TO_Q, 8, 8, cross),
        linear(TO_K, 6, 8, cross),
        linear(TO_V, 6, 8, cross),
        LayerInfo {
            name: ATTN2.to_string(),
            kind: LayerKind::Attention,
            component: Component::Unet,
            in_features: 8,
            out_features: 8,
            block: BlockPosition::Down(0),
            attention: cross,
            conv: None,
        },
        linear(TE_Q, 5, 5, Some(AttentionKind::SelfAttention)),
    ];
    layers_to_abi(&host)
}

pub fn layer<'a>(layers: &'a [graft_abi::LayerInfo], name: &str) -> &'a graft_abi::LayerInfo {
    layers.iter().find(|l| l.name() == name).expect("layer")
}

/// Builds the workspace plugin crates into the tests' target folder (once per test process:
/// `graft_tests::build_plugins`) and returns a manager over a scratch folder `test` holding a
/// copy of `crate_name`.
pub fn single_plugin_manager(crate_name: &str, test: &str) -> PluginManager {
    let built = graft_tests::build_plugins(&[crate_name]);
    let dir = workspace().join("target/test-scratch").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    let f = lib_file(crate_name);
    std::fs::copy(built.join(&f), dir.join(&f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    manager(&dir)
}

/// The hook points of the tiny fixture model and of the real SDXL base 1.0, as plugins see them.
pub fn tiny_layers() -> Vec<graft_abi::LayerInfo> {
    let cfg = graft_sdxl::SdxlConfig::from_diffusers_folder(&workspace().join("tests/fixtures/tiny-sdxl")).expect("tiny config");
    graft_runtime::plugins::layers_to_abi(&graft_sdxl::model::layers_of(&cfg).expect("tiny layers"))
}

pub fn sdxl_layers() -> Vec<graft_abi::LayerInfo> {
    graft_runtime::plugins::layers_to_abi(&graft_sdxl::model::layers_of(&graft_sdxl::SdxlConfig::sdxl_base()).expect("SDXL layers"))
}

pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}
