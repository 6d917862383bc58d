//! Shared helpers of the end-to-end tests: fixture paths, scratch folders, running the CLI.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use clap::Parser;

/// The committed tiny SDXL fixtures (see tests/fixtures/README.md).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sdxl")
}

pub fn tiny_single_file() -> PathBuf {
    fixtures().join("tiny-sdxl-sgm.safetensors")
}

/// A fresh scratch folder under the target directory, removed at the start of each use.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

/// Runs `graft ARGS...` in-process and returns its result.
pub fn graft(args: &[&str]) -> anyhow::Result<()> {
    let cli = graft_host::cli::Cli::try_parse_from(std::iter::once("graft").chain(args.iter().copied()))?;
    graft_host::cli::run(cli)
}

/// Runs `graft ARGS...` and returns the error text it must fail with.
pub fn graft_err(args: &[&str]) -> String {
    match graft(args) {
        Ok(()) => panic!("graft {args:?} succeeded but should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("read folder") {
        let entry = entry.expect("folder entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The lora plugin's source as one file (its `schema` module inline), for tests that build
/// variants of it as crates of their own.
pub fn lora_plugin_source() -> String {
    let src = std::fs::read_to_string(workspace().join("plugins/lora/src/lib.rs")).expect("read the lora plugin");
    let schema = std::fs::read_to_string(workspace().join("plugins/lora/src/schema.rs")).expect("read its schema");
    assert!(src.contains("\nmod schema;\n"), "the lora plugin's modules changed; update lora_plugin_source");
    src.replace("\nmod schema;\n", &format!("\nmod schema {{\n{schema}}}\n"))
}

/// The workspace's plugin crates that the tests load.
pub const TEST_PLUGINS: [&str; 9] =
    ["lora", "attention-gate", "progressive-fusion", "dora", "example-scale", "full", "fault-plugin", "fault-abi-version", "fault-layout"];

/// Builds the named workspace plugin crates into `target/plugin-tests` (not `target/`, whose
/// lock the running cargo holds) and returns the folder of the libraries. All of
/// [`TEST_PLUGINS`] are built together, once per test process: the tests share one process and
/// that folder, and a second cargo run would replace a library while another test copies or
/// loads it.
pub fn build_plugins(crates: &[&str]) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(c) = crates.iter().find(|c| !TEST_PLUGINS.contains(c)) {
        panic!("{c} is not in graft_tests::TEST_PLUGINS: add it there");
    }
    BUILT
        .get_or_init(|| {
            let target = workspace().join("target/plugin-tests");
            let mut cmd = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.current_dir(workspace()).arg("build").arg("--target-dir").arg(&target);
            for c in TEST_PLUGINS {
                cmd.args(["-p", c]);
            }
            let out = cmd.output().expect("run cargo");
            assert!(out.status.success(), "building {TEST_PLUGINS:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
            target.join("debug")
        })
        .clone()
}

/// Held by a test while it sets an environment variable, and by a test that needs that variable
/// unset: all the end-to-end tests share one process and its environment.
pub fn env_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // It guards no data of its own: a test that failed while holding it does not poison it.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small image + caption dataset: `n` PNGs of line-art shapes in a pastel palette, with
/// captions describing them (the demo's generator, `graft_host::demo::dataset`). Deterministic.
pub fn write_shapes_dataset(dir: &Path, n: usize, size: u32) {
    graft_host::demo::dataset::write_dataset(dir, n, size).expect("write the shapes dataset");
}

/// `graft serve` on the tiny model, on the CPU, on a free port, with `plugins` and a work folder
/// under `dir`.
pub fn serve_args(dir: &Path, plugins: PathBuf) -> graft_host::serve::ServeArgs {
    graft_host::serve::ServeArgs {
        dtype: graft_sdxl::WeightDtype::File,
        model: Some(tiny_model()),
        model_config: None,
        plugins: graft_host::serve::plugin_dir_args(plugins),
        port: 0,
        listen: None,
        lora_dirs: vec![],
        work_dir: dir.join("work"),
        cpu: true,
    }
}

/// Standard base64 (RFC 4648, padded), for PNGs in data URIs and screenshots.
pub fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap_or_else(|e| panic!("not base64 ({e}): {s:.80}"))
}
