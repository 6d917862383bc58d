//! The tiny SDXL UNet against diffusers' output (tests/fixtures/reference/unet.safetensors, written
//! by tools/reference/make_fixtures.py): per-sample timesteps on [2,4,12,16], and the odd latent
//! size [1,4,7,9] that needs `forward_upsample_size`.

use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_sdxl::hooks::NoHooks;
use graft_sdxl::unet::{UNet, UNetConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_unet(dev: &Device) -> UNet {
    let dir = fixtures().join("tiny-sdxl/unet");
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, dev) }.unwrap();
    UNet::new(vb, &config).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn check(prefix: &str) {
    let dev = Device::Cpu;
    let reference = safetensors::load(fixtures().join("reference/unet.safetensors"), &dev).unwrap();
    let get = |k: &str| reference.get(&format!("{prefix}{k}")).unwrap_or_else(|| panic!("fixture has no {prefix}{k}"));
    let unet = tiny_unet(&dev);
    let out =
        unet.forward(get("sample"), get("timesteps"), get("encoder_hidden_states"), get("text_embeds"), get("time_ids"), &NoHooks).unwrap();
    let diff = max_abs_diff(&out, get("out"));
    println!("unet parity {:?}: max abs diff {diff:e}", out.dims());
    assert!(diff < 1e-4, "max abs diff {diff} against diffusers");
}

#[test]
fn per_sample_timesteps_2x4x12x16() {
    check("");
}

#[test]
fn odd_size_1x4x7x9() {
    check("odd.");
}
