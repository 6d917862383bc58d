//! Shared by the integration tests: the tiny fixture model's hook points and fixture paths.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use graft_formats::KeyMap;
use graft_sdxl::clip::{ClipConfig, ClipTextModel};
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::unet::{UNet, UNetConfig};
use graft_sdxl::vae::VaeConfig;
use graft_sdxl::varbuilder::shape_only;
use graft_sdxl::{Component, LayerInfo};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn lora_fixture(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn read(rel: &str) -> String {
    let p = fixtures().join("tiny-sdxl").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The SGM layout of the tiny model.
pub fn tiny_layout() -> SgmLayout {
    let unet = UNetConfig::from_json_str(&read("unet/config.json"), "unet").unwrap();
    let vae = VaeConfig::from_json_str(&read("vae/config.json"), "vae").unwrap();
    let te2 = ClipConfig::from_json_str(&read("text_encoder_2/config.json"), "te2").unwrap();
    SgmLayout::from_configs(&unet, &vae, &te2).unwrap()
}

/// Every hook point of the tiny model (built with shape-only weights).
pub fn tiny_layers() -> Vec<LayerInfo> {
    let dev = Device::Cpu;
    let unet_cfg = UNetConfig::from_json_str(&read("unet/config.json"), "unet").unwrap();
    let te1_cfg = ClipConfig::from_json_str(&read("text_encoder/config.json"), "te1").unwrap();
    let te2_cfg = ClipConfig::from_json_str(&read("text_encoder_2/config.json"), "te2").unwrap();
    let unet = UNet::new(shape_only(&dev).0, &unet_cfg).unwrap();
    let te1 = ClipTextModel::new(shape_only(&dev).0, &te1_cfg, Component::TextEncoder, false).unwrap();
    let te2 = ClipTextModel::new(shape_only(&dev).0, &te2_cfg, Component::TextEncoder2, true).unwrap();
    [unet.registry(), te1.registry(), te2.registry()].iter().flat_map(|r| r.layers().to_vec()).collect()
}

pub fn tiny_keys() -> KeyMap {
    KeyMap::from_layers(&tiny_layers(), &tiny_layout())
}

/// The expected tensors of tests/fixtures/lora/expected.safetensors.
pub fn expected() -> BTreeMap<String, Tensor> {
    graft_formats::read::read_file(&lora_fixture("expected.safetensors")).unwrap().tensors
}

/// The layers whose deltas the fixtures store.
pub fn selected() -> Vec<String> {
    let raw = graft_formats::read::read_file(&lora_fixture("expected.safetensors")).unwrap();
    serde_json::from_str(&raw.metadata["selected"]).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
