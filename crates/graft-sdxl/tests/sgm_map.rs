//! The SGM name map against the real tiny fixture: every tensor of the diffusers folder
//! (tests/fixtures/tiny-sdxl/) is found, through the map and its transform, bit-exactly in the
//! single file (tests/fixtures/tiny-sdxl-sgm.safetensors), every tensor of the single file is
//! accounted for, and the inverse map rebuilds every single-file tensor from the folder.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{safetensors, DType, Device, Tensor};
use graft_sdxl::clip::ClipConfig;
use graft_sdxl::sgm::{self, SgmComponent, SgmLayout, SgmUnetLayout, SgmVaeLayout, Transform};
use graft_sdxl::unet::UNetConfig;
use graft_sdxl::vae::VaeConfig;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn json(path: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn usize_of(v: &serde_json::Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("config has no integer `{key}`")) as usize
}

/// The layout of the tiny model, read from its configs.
fn tiny_layout() -> SgmLayout {
    let dir = fixtures().join("tiny-sdxl");
    let unet = SgmUnetLayout::from_config(&UNetConfig::from_file(&dir.join("unet/config.json")).unwrap()).unwrap();
    // The same from the plain JSON values.
    let u = json(&dir.join("unet/config.json"));
    let types = |k: &str| -> Vec<String> { u[k].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect() };
    let plain = SgmUnetLayout::new(usize_of(&u, "layers_per_block"), &types("down_block_types"), &types("up_block_types"));
    assert_eq!(plain.unwrap(), unet);
    assert_eq!(unet, SgmUnetLayout::sdxl(), "the tiny UNet has SDXL's block structure");

    let v = json(&dir.join("vae/config.json"));
    let vae = SgmVaeLayout { num_blocks: v["block_out_channels"].as_array().unwrap().len(), layers_per_block: usize_of(&v, "layers_per_block") };
    let te2 = usize_of(&json(&dir.join("text_encoder_2/config.json")), "hidden_size");
    let layout = SgmLayout::new(unet, vae, te2);

    // The same from the crate's config types.
    let read = |sub: &str| std::fs::read_to_string(dir.join(sub).join("config.json")).unwrap();
    let from_configs = SgmLayout::from_configs(
        &UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
        &VaeConfig::from_json_str(&read("vae"), "vae").unwrap(),
        &ClipConfig::from_json_str(&read("text_encoder_2"), "text_encoder_2").unwrap(),
    );
    assert_eq!(from_configs.unwrap(), layout);
    layout
}

fn load(path: &PathBuf) -> HashMap<String, Tensor> {
    safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Same shape, dtype and bits (f16 -> f32 is exact).
fn assert_same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    let v = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    assert!(v(a) == v(b), "{what}: values differ");
}

#[test]
fn tiny_sdxl_single_file_matches_the_diffusers_folder() {
    let layout = tiny_layout();
    let single = load(&fixtures().join("tiny-sdxl-sgm.safetensors"));
    let keys: Vec<&str> = single.keys().map(|k| k.as_str()).collect();
    let contents = sgm::detect(&keys).expect("the fixture is detected as an SGM single file");
    for c in SgmComponent::ALL {
        assert!(contents.has(c), "{c:?} not detected");
    }

    let mut folder: HashMap<SgmComponent, HashMap<String, Tensor>> = HashMap::new();
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for c in SgmComponent::ALL {
        let file = match c {
            SgmComponent::Unet | SgmComponent::Vae => "diffusion_pytorch_model.safetensors",
            _ => "model.safetensors",
        };
        let tensors = load(&fixtures().join("tiny-sdxl").join(c.diffusers_folder()).join(file));
        let mut count = 0;
        for (name, tensor) in &tensors {
            let Some(key) = layout.to_sgm(c, name) else {
                problems.push(format!("{c:?} {name}: no SGM key"));
                continue;
            };
            let Some(stored) = single.get(&key.name) else {
                problems.push(format!("{c:?} {name}: SGM key {} not in the file", key.name));
                continue;
            };
            let what = format!("{c:?} {name} <- {} ({:?})", key.name, key.transform);
            assert_same(&what, &key.transform.to_diffusers(stored).unwrap(), tensor);
            if !matches!(key.transform, Transform::Rows { .. }) {
                assert_same(&format!("{what}, back"), &key.transform.to_sgm(tensor).unwrap(), stored);
            }
            used.insert(key.name);
            count += 1;
        }
        println!("{c:?}: {count} tensors mapped");
        folder.insert(c, tensors);
    }
    assert!(problems.is_empty(), "unmapped tensors:\n{}", problems.join("\n"));

    let extras: Vec<&str> = keys.iter().copied().filter(|k| sgm::is_known_extra(k)).collect();
    let unused: Vec<&str> = keys.iter().copied().filter(|k| !used.contains(*k) && !sgm::is_known_extra(k)).collect();
    assert!(unused.is_empty(), "SGM keys no diffusers tensor maps to: {unused:?}");
    println!("{} SGM keys used, known extras {extras:?}", used.len());
    assert_eq!(used.len() + extras.len(), single.len());

    // The inverse: every SGM tensor rebuilt from the folder's tensors.
    for (key, stored) in &single {
        if sgm::is_known_extra(key) {
            assert_eq!(layout.from_sgm(key), None, "{key}");
            continue;
        }
        let (c, names) = layout.from_sgm(key).unwrap_or_else(|| panic!("{key}: no diffusers name"));
        let tensors = &folder[&c];
        let parts: Vec<Tensor> =
            names.iter().map(|n| tensors.get(n).unwrap_or_else(|| panic!("{key} -> {c:?} {n}: not in the folder")).clone()).collect();
        let rebuilt = if parts.len() == 1 {
            layout.to_sgm(c, &names[0]).unwrap().transform.to_sgm(&parts[0]).unwrap()
        } else {
            sgm::fuse_rows(&parts).unwrap()
        };
        assert_same(&format!("{key} <- {names:?}"), &rebuilt, stored);
    }
}
