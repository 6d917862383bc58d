//! Shared by the fuzz targets: the tiny fixture model's key map and scratch files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use graft_formats::KeyMap;

/// The workspace's tiny SDXL fixture.
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sdxl")
}

/// The key map of the tiny model's hook points (built once).
pub fn tiny_keys() -> &'static KeyMap {
    static KEYS: OnceLock<KeyMap> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tiny_model();
        let config = graft_sdxl::SdxlConfig::from_diffusers_folder(&dir).expect("tiny model config");
        let layers = graft_sdxl::model::layers_of(&config).expect("tiny model layers");
        let read = |c: &str| std::fs::read_to_string(dir.join(c).join("config.json")).expect("config.json");
        let layout = graft_sdxl::sgm::SgmLayout::from_configs(
            &graft_sdxl::unet::UNetConfig::from_json_str(&read("unet"), "unet").expect("unet config"),
            &graft_sdxl::vae::VaeConfig::from_json_str(&read("vae"), "vae").expect("vae config"),
            &graft_sdxl::clip::ClipConfig::from_json_str(&read("text_encoder_2"), "te2").expect("te2 config"),
        )
        .expect("layout");
        KeyMap::from_layers(&layers, &layout)
    })
}

/// A scratch folder of this process.
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Panics (a finding) when an error does not name what it is about.
pub fn names(error: &str, what: &str) {
    assert!(error.contains(what), "the error does not name {what}: {error}");
}
