//! The tiny SDXL VAE against diffusers' `AutoencoderKL` (tests/fixtures/reference/vae.safetensors,
//! written by tools/reference/make_fixtures.py): posterior mean and log-variance of a 96 x 128
//! image, and the decode of random latents (no scaling factor on either side).

use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_sdxl::rng::GraftRng;
use graft_sdxl::vae::{Vae, VaeConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_vae(dev: &Device) -> Vae {
    let dir = fixtures().join("tiny-sdxl/vae");
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = VaeConfig::from_json_str(&json, "tiny-sdxl/vae/config.json").unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // Safety: the fixture is mapped read-only and not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, dev) }.unwrap();
    Vae::new(vb, &config).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn compare(what: &str, ours: &Tensor, theirs: &Tensor) {
    let diff = max_abs_diff(ours, theirs);
    println!("vae {what} {:?}: max abs diff {diff:e}", ours.dims());
    assert!(diff < 1e-4, "vae {what}: max abs diff {diff} against diffusers");
}

#[test]
fn tiny_vae_matches_diffusers() {
    let dev = Device::Cpu;
    let reference = safetensors::load(fixtures().join("reference/vae.safetensors"), &dev).unwrap();
    let vae = tiny_vae(&dev);

    let dist = vae.encode(&reference["image"]).unwrap();
    compare("posterior.mean", &dist.mean, &reference["posterior.mean"]);
    compare("posterior.logvar", &dist.logvar, &reference["posterior.logvar"]);

    let decoded = vae.decode(&reference["latents"]).unwrap();
    compare("decoded", &decoded, &reference["decoded"]);
}

#[test]
fn sample_is_seeded_and_uses_the_variance() {
    let dev = Device::Cpu;
    let mean = Tensor::zeros((1, 4, 3, 5), DType::F32, &dev).unwrap();
    let logvar = Tensor::full(2f32 * 3f32.ln(), (1, 4, 3, 5), &dev).unwrap(); // std 3
    let dist = graft_sdxl::vae::LatentDist { mean, logvar };
    let a = dist.sample(&mut GraftRng::new(7)).unwrap();
    let b = dist.sample(&mut GraftRng::new(7)).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let expected = (GraftRng::new(7).randn((1, 4, 3, 5), &dev).unwrap() * 3.0).unwrap();
    assert!(max_abs_diff(&a, &expected) < 1e-5);
}

#[test]
fn wrong_input_shape_is_refused_with_a_message() {
    let dev = Device::Cpu;
    let vae = tiny_vae(&dev);
    let err = vae.decode(&Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("latents") && err.contains("[batch, 4, height, width]"), "{err}");
    let err = vae.encode(&Tensor::zeros((3, 16, 16), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("image"), "{err}");
}

/// The model asks for exactly the tensors the diffusers file holds, with their shapes.
#[test]
fn requests_are_exactly_the_file_keys() {
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-sdxl/vae");
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = VaeConfig::from_json_str(&json, "tiny-sdxl/vae/config.json").unwrap();
    let (vb, requests) = graft_sdxl::varbuilder::shape_only(&dev);
    Vae::new(vb, &config).unwrap();
    let mut asked: Vec<(String, Vec<usize>)> = requests.lock().unwrap().clone();
    asked.sort();
    let stored = safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev).unwrap();
    let mut stored: Vec<(String, Vec<usize>)> = stored.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    stored.sort();
    assert_eq!(asked, stored);
}

/// The SDXL VAE architecture, built without memory.
#[test]
fn sdxl_vae_shapes() {
    let dev = Device::Cpu;
    let (vb, requests) = graft_sdxl::varbuilder::shape_only(&dev);
    Vae::new(vb, &VaeConfig::sdxl_base()).unwrap();
    let asked = requests.lock().unwrap().clone();
    let has = |name: &str, shape: &[usize]| assert!(asked.iter().any(|(n, s)| n == name && s == shape), "no request {name} {shape:?}");
    has("encoder.conv_in.weight", &[128, 3, 3, 3]);
    has("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", &[256, 128, 1, 1]);
    has("encoder.down_blocks.2.downsamplers.0.conv.weight", &[512, 512, 3, 3]);
    has("encoder.mid_block.attentions.0.to_out.0.weight", &[512, 512]);
    has("encoder.conv_out.weight", &[8, 512, 3, 3]);
    has("quant_conv.weight", &[8, 8, 1, 1]);
    has("post_quant_conv.weight", &[4, 4, 1, 1]);
    has("decoder.up_blocks.0.resnets.2.conv2.weight", &[512, 512, 3, 3]);
    has("decoder.up_blocks.2.resnets.0.conv_shortcut.weight", &[256, 512, 1, 1]);
    has("decoder.up_blocks.3.resnets.0.conv_shortcut.weight", &[128, 256, 1, 1]);
    has("decoder.conv_out.weight", &[3, 128, 3, 3]);
    assert!(!asked.iter().any(|(n, _)| n.starts_with("decoder.up_blocks.3.upsamplers")));
}
