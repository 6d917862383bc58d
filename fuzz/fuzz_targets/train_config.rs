//! graft's own config files: the training config (from a file, as `graft train` reads it), the
//! compare config, and `[plugins] dirs` of graft.toml.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = graft_fuzz::scratch();
    let path = dir.join("train.toml");
    std::fs::write(&path, text).expect("write scratch file");
    if let Err(e) = graft_trainer::config::TrainConfig::from_file(&path) {
        graft_fuzz::names(&format!("{e:#}"), "train.toml");
    }
    if let Err(e) = graft_host::compare::config::CompareConfig::parse_str(text, "fuzz-compare.toml", &dir) {
        graft_fuzz::names(&format!("{e:#}"), "fuzz-compare.toml");
    }
    if let Err(e) = graft_host::plugins::config_dirs(&path) {
        graft_fuzz::names(&format!("{e:#}"), "train.toml");
    }
});
