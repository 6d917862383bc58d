//! Diffusers folders in every precision and file naming load to the same model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use graft_sdxl::{PipelineHooks, SdxlModel};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Rewrites `file` in `dtype` under `new_name` (in the same folder).
fn convert(file: &Path, dtype: DType, new_name: &str) {
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let converted: std::collections::HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
    std::fs::remove_file(file).unwrap();
    candle_core::safetensors::save(&converted, file.with_file_name(new_name)).unwrap();
}

fn unet_output(model: &SdxlModel) -> Tensor {
    let emb = model.encode_prompts(&["a red fox"], PipelineHooks::none()).unwrap();
    let x = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[300f32], &Device::Cpu).unwrap();
    let ids = model.time_ids(64, 64, 1).unwrap();
    model.unet.forward(&x, &t, &emb.hidden, &emb.pooled, &ids, &graft_sdxl::NoHooks).unwrap()
}

#[test]
fn f32_bf16_and_variant_files_load() {
    let dir = std::env::temp_dir().join(format!("graft-loading-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reference = unet_output(&SdxlModel::load(&fixture(), None, &Device::Cpu).unwrap());

    // f32 weights and the `.fp16` variant file name: fp16 -> f32 is exact, so the output is too.
    let f32_dir = dir.join("f32");
    copy_dir(&fixture(), &f32_dir);
    convert(&f32_dir.join("unet/diffusion_pytorch_model.safetensors"), DType::F32, "diffusion_pytorch_model.safetensors");
    convert(&f32_dir.join("text_encoder/model.safetensors"), DType::F32, "model.fp16.safetensors");
    let got = unet_output(&SdxlModel::load(&f32_dir, None, &Device::Cpu).unwrap());
    assert_eq!((got - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

    // bf16 weights: rounded, so close but not equal.
    let bf16_dir = dir.join("bf16");
    copy_dir(&fixture(), &bf16_dir);
    convert(&bf16_dir.join("unet/diffusion_pytorch_model.safetensors"), DType::BF16, "diffusion_pytorch_model.bf16.safetensors");
    let got = unet_output(&SdxlModel::load(&bf16_dir, None, &Device::Cpu).unwrap());
    let diff = (got - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 0.0 && diff < 0.1, "bf16 diff {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}
