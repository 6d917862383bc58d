//! Bad input: each gets one clear error that names the thing and says what to do.

use std::collections::HashMap;

use graft_tests::{copy_dir, graft_err, scratch, tiny_model, tiny_single_file};

fn generate_err(model: &std::path::Path, extra: &[&str]) -> String {
    let out = scratch("bad_input_out").join("x.png");
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "1", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    graft_err(&args)
}

const SMALL: [&str; 4] = ["--width", "64", "--height", "64"];

#[test]
fn missing_model_path() {
    let e = generate_err(std::path::Path::new("/no/such/model"), &SMALL);
    assert!(e.contains("/no/such/model") && e.contains("no such file"), "{e}");
}

#[test]
fn size_not_a_multiple_of_8() {
    let e = generate_err(&tiny_model(), &["--width", "100", "--height", "64"]);
    assert!(e.contains("width 100") && e.contains("multiple of 8") && e.contains("96 or 104"), "{e}");
}

#[test]
fn unknown_scheduler() {
    let mut extra = SMALL.to_vec();
    extra.extend(["--scheduler", "heun_fancy"]);
    let e = generate_err(&tiny_model(), &extra);
    assert!(e.contains("heun_fancy") && e.contains("euler"), "{e}");
}

#[test]
fn truncated_single_file() {
    let dir = scratch("bad_truncated");
    let bytes = std::fs::read(tiny_single_file()).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = generate_err(&cut, &SMALL);
    assert!(e.contains("cut.safetensors") && e.contains("corrupt or truncated"), "{e}");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let e = generate_err(&garbage, &SMALL);
    assert!(e.contains("garbage.safetensors") && e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn checkpoint_that_is_not_sdxl() {
    let dir = scratch("bad_not_sdxl");
    let sd15 = dir.join("sd15.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tensors: HashMap<String, candle_core::Tensor> = [
        ("model.diffusion_model.input_blocks.0.0.weight".to_string(), t.clone()),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight".to_string(), t),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &sd15).unwrap();
    let e = generate_err(&sd15, &SMALL);
    assert!(e.contains("sd15.safetensors") && e.contains("1.x / 2.x") && e.contains("SDXL"), "{e}");
}

#[test]
fn missing_keys_and_wrong_shapes_are_all_listed() {
    let dir = scratch("bad_keys");
    let model = dir.join("model");
    copy_dir(&tiny_model(), &model);
    let unet_file = std::fs::read_dir(model.join("unet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut tensors = candle_core::safetensors::load(&unet_file, &candle_core::Device::Cpu).unwrap();
    let drop1 = "mid_block.attentions.0.proj_out.weight";
    let drop2 = "conv_in.bias";
    let reshape = "time_embedding.linear_1.bias";
    assert!(tensors.remove(drop1).is_some() && tensors.remove(drop2).is_some());
    let n = tensors[reshape].dim(0).unwrap();
    tensors.insert(reshape.into(), candle_core::Tensor::zeros(n + 1, candle_core::DType::F16, &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &unet_file).unwrap();
    let e = generate_err(&model, &SMALL);
    for needle in [drop1, drop2, reshape, "2 missing keys", "1 wrong shapes", "unet"] {
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    }
}

#[test]
fn missing_component_folder_and_pickle_weights() {
    let dir = scratch("bad_folder");
    let model = dir.join("model");
    copy_dir(&tiny_model(), &model);
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    let e = generate_err(&model, &SMALL);
    assert!(e.contains("vae"), "{e}");
    copy_dir(&tiny_model().join("vae"), &model.join("vae"));
    for entry in std::fs::read_dir(model.join("vae")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::fs::rename(&p, model.join("vae/diffusion_pytorch_model.bin")).unwrap();
        }
    }
    let e = generate_err(&model, &SMALL);
    assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");
}

#[test]
fn init_latents_of_the_wrong_shape() {
    let dir = scratch("bad_latents");
    let file = dir.join("latents.safetensors");
    let t = candle_core::Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), t)]), &file).unwrap();
    let mut extra = SMALL.to_vec();
    extra.extend(["--init-latents", file.to_str().unwrap()]);
    let e = generate_err(&tiny_model(), &extra);
    assert!(e.contains("[1, 4, 5, 5]") && e.contains("(1, 4, 8, 8)"), "{e}");
}
