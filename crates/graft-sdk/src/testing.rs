//! The host's conformance checks inside a plugin's own `cargo test`.
//!
//! ```ignore
//! #[cfg(test)]
//! mod tests {
//!     #[test]
//!     fn conformance() {
//!         graft_sdk::conformance_test!();
//!     }
//! }
//! ```
//!
//! The test builds the plugin crate's library with cargo and runs `graft plugins check` on it:
//! the plan over the real SDXL layer list and over a test model, zero-init identity, that the
//! parameters take effect, fuse / unfuse, eject restoring the model bit for bit, and export ->
//! load (docs/PLUGINS.md, "Conformance"). It needs the `graft` executable: `GRAFT_BIN`, else
//! `graft` beside the test's target folder (inside the graft workspace), else on `PATH`.
//! `GRAFT_CHECK_MODEL` picks the model (default: graft's tiny test model).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the conformance checks on the crate this expands in; panics with every failed check.
#[macro_export]
macro_rules! conformance_test {
    () => {
        $crate::testing::check_crate(env!("CARGO_MANIFEST_DIR"), env!("CARGO_PKG_NAME"), None)
    };
    ($config:expr) => {
        $crate::testing::check_crate(env!("CARGO_MANIFEST_DIR"), env!("CARGO_PKG_NAME"), Some($config))
    };
}

/// Builds crate `name` at `manifest_dir` and runs `graft plugins check` on its library, with
/// `config` (JSON) or the manifest's example. Panics with the report when a check fails.
pub fn check_crate(manifest_dir: &str, name: &str, config: Option<&str>) {
    let lib = build(Path::new(manifest_dir), name);
    let graft = graft_binary().unwrap_or_else(|| {
        panic!("graft_sdk::testing needs the `graft` executable: set GRAFT_BIN, or put `graft` on PATH (cargo install --path host in a graft checkout)")
    });
    let mut cmd = Command::new(&graft);
    cmd.args(["plugins", "check", "--json"]).arg(&lib);
    if let Some(c) = config {
        cmd.args(["--config", c]);
    }
    if let Some(m) = std::env::var_os("GRAFT_CHECK_MODEL") {
        cmd.arg("--model").arg(m);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", graft.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|_| panic!("`graft plugins check {}` failed:\n{}{}", lib.display(), stdout, String::from_utf8_lossy(&out.stderr)));
    let checks = report["conformance"].as_array().cloned().unwrap_or_default();
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c["passed"] != serde_json::Value::Bool(true))
        .map(|c| format!("  {}: {}", c["check"].as_str().unwrap_or("?"), c["detail"].as_str().unwrap_or("")))
        .collect();
    if !out.status.success() || checks.is_empty() || !failed.is_empty() {
        panic!(
            "conformance of plugin `{name}` ({}):\n{}\nstrategy: {}\n{}",
            lib.display(),
            failed.join("\n"),
            report["new_strategy"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Builds the crate's cdylib into `target/graft-check` beside its target folder (a folder of its
/// own: the running `cargo test` holds the lock of the usual one) and returns the library.
fn build(manifest_dir: &Path, name: &str) -> PathBuf {
    let target = target_dir().unwrap_or_else(|| manifest_dir.join("target")).join("graft-check");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    assert!(out.status.success(), "building plugin `{name}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let file = format!("{}{}{}", std::env::consts::DLL_PREFIX, name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    target.join("debug").join(file)
}

/// The target folder the running test executable lives in (`<target>/debug/deps/<test>`).
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.to_path_buf())
}

fn graft_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRAFT_BIN") {
        return Some(PathBuf::from(p));
    }
    let name = format!("graft{}", std::env::consts::EXE_SUFFIX);
    let beside = target_dir().map(|t| t.join("debug").join(&name)).filter(|p| p.is_file());
    beside.or_else(|| std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(&name)).find(|p| p.is_file()))
}

/// Checks the strategy's config schema against its own parser, in a plain unit test (no build,
/// no `graft`): the schema is consistent (defaults of their type, within range), `new` accepts
/// the defaults, and `new` refuses an unknown key listing exactly the schema's keys. Panics
/// with what differs.
///
/// ```ignore
/// #[test]
/// fn schema_matches_parser() {
///     graft_sdk::testing::check_schema::<MyStrategy>();
/// }
/// ```
pub fn check_schema<S: crate::Strategy>() {
    let name = S::manifest().id;
    let schema = S::config_schema().unwrap_or_else(|| panic!("strategy `{name}` has no config_schema"));
    let parse = |json: &str| S::new(json).map(|_| ()).map_err(|e| e.to_string());
    if let Err(e) = crate::schema::check_against_parser(&schema, parse) {
        panic!("the config schema of `{name}` does not match its parser: {e}");
    }
}
