//! Round trips, format detection, LyCORIS math, key maps, unmatched keys and bad files.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use graft_formats::metadata::addnet_hash;
use graft_formats::read::read_file;
use graft_formats::write::write_safetensors;
use graft_formats::{
    read_adapter, to_kohya, write_kohya, write_lycoris, write_native, write_peft, AdapterFormat, AdapterWeights, KeyMap, KohyaMetadata,
    LokrFactor, ModuleKind, ModuleWeights, NativeInfo, StoreDtype,
};
use graft_sdxl::sgm::SgmLayout;

fn t(rows: &[&[f32]]) -> Tensor {
    let r = rows.len();
    let c = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|x| x.iter().copied()).collect();
    Tensor::from_vec(flat, (r, c), &Device::Cpu).unwrap()
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    // A small deterministic generator: the values only need to be varied.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let err = max_abs_diff(a, b);
    assert!(err <= tol, "{what}: max error {err}");
}

fn peft_fixture() -> graft_formats::AdapterFile {
    read_adapter(&lora_fixture("peft_diffusers.safetensors"), &tiny_keys()).unwrap().0
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ------------------------------------------------------------------ key maps

#[test]
fn kohya_names_sgm_and_diffusers() {
    let layout = tiny_layout();
    let cases = [
        (
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
        ),
        ("unet.down_blocks.2.attentions.1.proj_in", "lora_unet_input_blocks_8_1_proj_in"),
        ("unet.mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj", "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj"),
        ("unet.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k", "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k"),
        ("unet.up_blocks.1.attentions.1.proj_out", "lora_unet_output_blocks_4_1_proj_out"),
        ("text_encoder.text_model.encoder.layers.2.self_attn.q_proj", "lora_te1_text_model_encoder_layers_2_self_attn_q_proj"),
        ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", "lora_te2_text_model_encoder_layers_0_mlp_fc2"),
    ];
    let keys = tiny_keys();
    for (graft, kohya) in cases {
        assert_eq!(to_kohya(graft, &layout).unwrap(), kohya);
        assert_eq!(keys.from_kohya(kohya), Some(graft), "{kohya}");
        let diffusers = format!("lora_unet_{}", graft.trim_start_matches("unet.").replace('.', "_"));
        if graft.starts_with("unet.") {
            assert_eq!(keys.from_kohya(&diffusers), Some(graft), "{diffusers}");
        }
    }
    // Single text-encoder spelling.
    assert_eq!(keys.from_kohya("lora_te_text_model_encoder_layers_1_mlp_fc1"), Some("text_encoder.text_model.encoder.layers.1.mlp.fc1"));
    assert!(to_kohya("vae.encoder.conv_in", &layout).is_err());
}

#[test]
fn kohya_names_of_real_sdxl() {
    let layout = SgmLayout::sdxl();
    let names =
        ["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k", "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"];
    let keys = KeyMap::from_names(&names, &layout);
    assert_eq!(to_kohya(names[0], &layout).unwrap(), "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k");
    assert_eq!(to_kohya(names[1], &layout).unwrap(), "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2");
    assert_eq!(keys.from_kohya("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2"), Some(names[1]));
}

// ------------------------------------------------------------------ round trips

#[test]
fn kohya_and_peft_round_trips_keep_every_delta() {
    let keys = tiny_keys();
    let layout = tiny_layout();
    let src = peft_fixture();
    let dir = tmp();

    let kohya = dir.path().join("k.safetensors");
    let w = write_kohya(&kohya, &src.modules, &layout, &KohyaMetadata::new("rt"), StoreDtype::F32).unwrap();
    let bytes = std::fs::read(&kohya).unwrap();
    assert_eq!(addnet_hash(&bytes).unwrap(), w.metadata["sshs_model_hash"]);
    let (k, rk) = read_adapter(&kohya, &keys).unwrap();
    assert_eq!((k.format, rk.unmatched_keys.len()), (AdapterFormat::Kohya, 0));

    let peft = dir.path().join("p.safetensors");
    write_peft(&peft, &k.modules, StoreDtype::F32).unwrap();
    let (p, rp) = read_adapter(&peft, &keys).unwrap();
    assert_eq!((p.format, rp.unmatched_keys.len()), (AdapterFormat::Peft, 0));

    assert_eq!(src.modules.len(), p.modules.len());
    for ((a, b), c) in src.modules.iter().zip(&k.modules).zip(&p.modules) {
        assert_eq!((&a.layer, a.rank()), (&c.layer, c.rank()));
        let d = a.delta_weight(1.0).unwrap();
        assert_close(&b.delta_weight(1.0).unwrap(), &d, 1e-7, &b.layer);
        assert_close(&c.delta_weight(1.0).unwrap(), &d, 1e-7, &c.layer);
    }
}

#[test]
fn writers_are_deterministic() {
    let layout = tiny_layout();
    let src = peft_fixture();
    let dir = tmp();
    for (name, run) in [("kohya", 0), ("peft", 1)] {
        let a = dir.path().join(format!("{name}_a.safetensors"));
        let b = dir.path().join(format!("{name}_b.safetensors"));
        for p in [&a, &b] {
            if run == 0 {
                write_kohya(p, &src.modules, &layout, &KohyaMetadata::new("same"), StoreDtype::F16).unwrap();
            } else {
                write_peft(p, &src.modules, StoreDtype::F16).unwrap();
            }
        }
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{name}");
    }
    // No temporary files are left behind.
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn kohya_metadata_fields() {
    let dir = tmp();
    let src = peft_fixture();
    let mut meta = KohyaMetadata::new("my_style");
    meta.steps = Some(1200);
    meta.unet_lr = Some(1e-4);
    meta.text_encoder_lr = Some(1e-5);
    meta.network_args.insert("conv_dim".into(), "4".into());
    let path = dir.path().join("m.safetensors");
    // Uniform rank and alpha: the numbers, not "Dynamic".
    let uniform: Vec<ModuleWeights> = src.modules.iter().filter(|m| m.rank() == Some(4) && m.alpha() == Some(8.0)).cloned().collect();
    write_kohya(&path, &uniform, &tiny_layout(), &meta, StoreDtype::F16).unwrap();
    let m = read_file(&path).unwrap().metadata;
    let want = [
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "8.0"),
        ("ss_network_module", "networks.lora"),
        ("ss_network_args", r#"{"conv_dim":"4"}"#),
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_output_name", "my_style"),
        ("ss_steps", "1200"),
        ("ss_unet_lr", "0.0001"),
        ("ss_text_encoder_lr", "1e-05"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.sai_model_spec", "1.0.0"),
        ("modelspec.title", "my_style"),
        ("sshs_legacy_hash", "e3b0c442"), // a file under 1 MiB: sha256 of nothing
    ];
    for (k, v) in want {
        assert_eq!(m.get(k).map(|s| s.as_str()), Some(v), "{k}");
    }
    assert_eq!(m["sshs_model_hash"], addnet_hash(&std::fs::read(&path).unwrap()).unwrap());
}

#[test]
fn peft_metadata_is_what_diffusers_writes() {
    let dir = tmp();
    let path = dir.path().join("p.safetensors");
    write_peft(&path, &peft_fixture().modules, StoreDtype::F32).unwrap();
    let m = read_file(&path).unwrap().metadata;
    assert_eq!(m["format"], "pt");
    let cfg: serde_json::Value = serde_json::from_str(&m["lora_adapter_metadata"]).unwrap();
    assert_eq!(cfg["unet.r"], 4);
    assert_eq!(cfg["unet.lora_alpha"], 8);
    assert_eq!(cfg["unet.rank_pattern"]["mid_block.attentions.0.transformer_blocks.1.attn2.to_k"], 2);
    assert_eq!(cfg["unet.alpha_pattern"]["down_blocks.1.attentions.1.proj_in"], 3);
    assert_eq!(cfg["text_encoder.r"], 4);
    // Text encoder paths without `text_model.` so PEFT finds them in transformers 4 and 5 models.
    assert!(cfg["text_encoder_2.target_modules"].as_array().unwrap().iter().any(|v| v == "encoder.layers.0.mlp.fc1"));
    // indent=2, sorted keys, like json.dumps(..., indent=2, sort_keys=True).
    assert!(m["lora_adapter_metadata"].starts_with("{\n  \"text_encoder.alpha_pattern\": {},\n"));
}

#[test]
fn native_round_trip() {
    let keys = tiny_keys();
    let dir = tmp();
    let layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn1";
    let mut tensors = BTreeMap::new();
    tensors.insert("A".to_string(), randn((4, 56), 1));
    tensors.insert("B".to_string(), randn((56, 4), 2));
    tensors.insert("gate".to_string(), Tensor::new(&[0.25f32], &Device::Cpu).unwrap());
    let module = ModuleWeights { layer: layer.into(), weights: AdapterWeights::Native { tensors }, dora_scale: None };
    let info =
        NativeInfo { strategy: "attention-gate".into(), version: "0.1.0".into(), config: serde_json::json!({"rank": 4, "gate_init": 0.25}) };
    let path = dir.path().join("n.safetensors");
    write_native(&path, &info, &[module], StoreDtype::F32).unwrap();
    let raw = read_file(&path).unwrap();
    assert!(raw.tensors.contains_key(&format!("{layer}.gate")));
    assert_eq!(raw.metadata["graft.config"], r#"{"gate_init":0.25,"rank":4}"#);
    let (a, report) = read_adapter(&path, &keys).unwrap();
    assert_eq!(a.format, AdapterFormat::Native);
    assert_eq!(report.native.as_ref().unwrap(), &info);
    assert_eq!(report.attached[0].kind, ModuleKind::Native);
    let AdapterWeights::Native { tensors } = &a.modules[0].weights else { panic!() };
    assert_eq!(tensors.keys().collect::<Vec<_>>(), ["A", "B", "gate"]);
    assert!(a.modules[0].delta_weight(1.0).is_err(), "a native entry has no delta of its own");
}

// ------------------------------------------------------------------ LyCORIS

#[test]
fn kron_product() {
    let k = graft_formats::kron(&t(&[&[1., 2.], &[3., 4.]]), &t(&[&[0., 1.], &[1., 0.]])).unwrap();
    assert_eq!(vec2(&k), vec![vec![0., 1., 0., 2.], vec![1., 0., 2., 0.], vec![0., 3., 0., 4.], vec![3., 0., 4., 0.]]);
}

#[test]
fn loha_lokr_full_math() {
    // LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / r.
    let loha = ModuleWeights {
        layer: "x".into(),
        weights: AdapterWeights::LoHa {
            w1_a: t(&[&[1.], &[2.]]),
            w1_b: t(&[&[1., 1.]]),
            w2_a: t(&[&[1.], &[1.]]),
            w2_b: t(&[&[2., 3.]]),
            alpha: Some(0.5),
        },
        dora_scale: None,
    };
    assert_eq!(vec2(&loha.delta_weight(1.0).unwrap()), vec![vec![1., 1.5], vec![2., 3.]]);
    // LoKr with two full factors: scale 1 whatever the stored alpha (LyCORIS full-matrix mode).
    let w1 = t(&[&[1., 2.], &[3., 4.]]);
    let w2 = t(&[&[0., 1.], &[1., 0.]]);
    let full = ModuleWeights {
        layer: "x".into(),
        weights: AdapterWeights::LoKr { w1: LokrFactor::Full(w1.clone()), w2: LokrFactor::Full(w2.clone()), alpha: Some(10000.0) },
        dora_scale: None,
    };
    assert_eq!(full.scale(), 1.0);
    let kron = graft_formats::kron(&w1, &w2).unwrap();
    assert_close(&full.delta_weight(1.0).unwrap(), &kron, 0.0, "lokr full");
    // A split w2 (rank 2, alpha 1): scale 1/2.
    let split = ModuleWeights {
        layer: "x".into(),
        weights: AdapterWeights::LoKr {
            w1: LokrFactor::Full(w1.clone()),
            w2: LokrFactor::LowRank { a: t(&[&[0., 1.], &[1., 0.]]), b: t(&[&[1., 0.], &[0., 1.]]) },
            alpha: Some(1.0),
        },
        dora_scale: None,
    };
    assert_eq!(split.rank(), Some(2));
    assert_close(&split.delta_weight(2.0).unwrap(), &kron, 0.0, "lokr split, m = 2");
    // Full diff: just the diff times the multiplier.
    let diff = ModuleWeights::full("x", t(&[&[1., -2.]]), Some(Tensor::new(&[3f32], &Device::Cpu).unwrap()));
    assert_eq!(vec2(&diff.delta_weight(0.5).unwrap()), vec![vec![0.5, -1.]]);
    assert_eq!(diff.delta_bias(2.0).unwrap().unwrap().to_vec1::<f32>().unwrap(), vec![6.]);
}

#[test]
fn dora_on_rows_and_on_columns() {
    let base = t(&[&[3., 4.], &[0., 5.]]);
    let zero = ModuleWeights::lora("x", t(&[&[0., 0.]]), t(&[&[0.], &[0.]]), None);
    // Per output row ([out, 1]): each row rescaled to its magnitude.
    let rows = ModuleWeights { dora_scale: Some(t(&[&[10.], &[1.]])), ..zero.clone() };
    assert_close(&rows.merged_weight(&base, 1.0).unwrap(), &t(&[&[6., 8.], &[0., 1.]]), 1e-6, "rows");
    // The multiplier interpolates the merged weight (A1111, ComfyUI).
    assert_close(&rows.merged_weight(&base, 0.5).unwrap(), &t(&[&[4.5, 6.], &[0., 3.]]), 1e-6, "rows, m = 0.5");
    assert!(rows.delta_weight(1.0).is_err(), "DoRA needs the base weight");
    // Per input column ([1, in], older LyCORIS).
    let cols = ModuleWeights { dora_scale: Some(t(&[&[6., 1.]])), ..zero.clone() };
    let n = 41f32.sqrt();
    assert_close(&cols.merged_weight(&base, 1.0).unwrap(), &t(&[&[6., 4. / n], &[0., 5. / n]]), 1e-6, "columns");
    // With a LoRA delta the norm is taken after adding it: W + dW = [[3, 4], [0, 5]] + [[1, 0], [0, 0]].
    let lora =
        ModuleWeights { dora_scale: Some(t(&[&[1.], &[1.]])), ..ModuleWeights::lora("x", t(&[&[1., 0.]]), t(&[&[1.], &[0.]]), Some(1.0)) };
    let r0 = (16f32 + 16.).sqrt();
    assert_close(&lora.merged_weight(&base, 1.0).unwrap(), &t(&[&[4. / r0, 4. / r0], &[0., 1.]]), 1e-6, "lora + dora");
}

#[test]
fn lycoris_round_trip() {
    let keys = tiny_keys();
    let layout = tiny_layout();
    let q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"; // [48, 48]
    let k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"; // [48, 80]
    let ff = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"; // [56, 224]
    let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"; // [32, 32]
    let te2 = "text_encoder_2.text_model.encoder.layers.1.mlp.fc1"; // [64, 48]
    let modules = vec![
        ModuleWeights {
            layer: q.into(),
            weights: AdapterWeights::LoHa {
                w1_a: randn((48, 2), 1),
                w1_b: randn((2, 48), 2),
                w2_a: randn((48, 2), 3),
                w2_b: randn((2, 48), 4),
                alpha: Some(1.0),
            },
            dora_scale: None,
        },
        ModuleWeights {
            layer: k.into(),
            weights: AdapterWeights::LoKr {
                w1: LokrFactor::Full(randn((4, 8), 5)),
                w2: LokrFactor::LowRank { a: randn((12, 3), 6), b: randn((3, 10), 7) },
                alpha: Some(2.0),
            },
            dora_scale: None,
        },
        ModuleWeights::full(ff, randn((56, 224), 8), Some(randn((1, 56), 9).flatten_all().unwrap())),
        ModuleWeights {
            dora_scale: Some(randn((32, 1), 10).abs().unwrap()),
            ..ModuleWeights::lora(te, randn((4, 32), 11), randn((32, 4), 12), Some(2.0))
        },
        ModuleWeights {
            dora_scale: Some(randn((1, 48), 13).abs().unwrap()),
            ..ModuleWeights::lora(te2, randn((4, 48), 14), randn((64, 4), 15), None)
        },
    ];
    let dir = tmp();
    let path = dir.path().join("l.safetensors");
    let w = write_lycoris(&path, &modules, &layout, &KohyaMetadata::new("lyco"), StoreDtype::F32).unwrap();
    assert_eq!(w.metadata["ss_network_module"], "lycoris.kohya");
    let raw = read_file(&path).unwrap();
    for key in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w2_b",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lokr_w1",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lokr_w2_a",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2.diff_b",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale",
    ] {
        assert!(raw.tensors.contains_key(key), "{key}");
    }
    let (back, report) = read_adapter(&path, &keys).unwrap();
    assert_eq!(back.format, AdapterFormat::Lycoris);
    assert!(report.unmatched_keys.is_empty());
    let kinds: Vec<_> = report.attached.iter().map(|a| (a.kind, a.dora)).collect();
    assert_eq!(kinds.len(), 5);
    for m in &modules {
        let b = back.module(&m.layer).unwrap();
        assert_eq!(b.kind(), m.kind());
        let (out, inp) = m.weight_shape().unwrap();
        let base = randn((out, inp), 99);
        assert_close(&b.delta_for_base(&base, 0.7).unwrap(), &m.delta_for_base(&base, 0.7).unwrap(), 1e-6, &m.layer);
    }
    // A kohya LoRA file refuses what it cannot hold.
    assert!(write_kohya(&dir.path().join("x.safetensors"), &modules, &layout, &KohyaMetadata::new("x"), StoreDtype::F32).is_err());
    assert!(write_peft(&dir.path().join("y.safetensors"), &modules, StoreDtype::F32).is_err());
}

// ------------------------------------------------------------------ PEFT spellings and alpha

/// Rewrites the PEFT fixture's keys with `rename` (and optionally its metadata) into a new file.
fn rewrite(dir: &Path, name: &str, rename: &dyn Fn(&str) -> String, keep_meta: bool) -> std::path::PathBuf {
    let raw = read_file(&lora_fixture("peft_diffusers.safetensors")).unwrap();
    let tensors: BTreeMap<String, Tensor> = raw.tensors.iter().map(|(k, v)| (rename(k), v.clone())).collect();
    let meta = if keep_meta { raw.metadata.clone() } else { BTreeMap::new() };
    let path = dir.join(name);
    write_safetensors(&path, &tensors, &meta, StoreDtype::F32).unwrap();
    path
}

fn same_deltas(a: &graft_formats::AdapterFile, b: &graft_formats::AdapterFile) {
    assert_eq!(a.modules.len(), b.modules.len());
    for (x, y) in a.modules.iter().zip(&b.modules) {
        assert_eq!(x.layer, y.layer);
        assert_close(&x.delta_weight(1.0).unwrap(), &y.delta_weight(1.0).unwrap(), 1e-6, &x.layer);
    }
}

#[test]
fn older_diffusers_spellings() {
    let keys = tiny_keys();
    let src = peft_fixture();
    let dir = tmp();
    type Rename<'a> = &'a dyn Fn(&str) -> String;
    let spellings: [(&str, Rename); 4] = [
        ("lora_dot", &|k| k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")),
        ("linear_layer", &|k| {
            k.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(".lora_B.weight", ".lora_linear_layer.up.weight")
        }),
        // Attention processors: `attn1.processor.to_q_lora.down.weight`, text encoders `self_attn.to_q_lora`.
        ("processor", &|k| {
            let mut s = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight");
            for (p, q) in [("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")] {
                s = s.replace(&format!(".{p}.lora."), &format!(".processor.{q}_lora."));
            }
            for (p, q) in [("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")] {
                s = s.replace(&format!("self_attn.{p}.lora."), &format!("self_attn.{q}_lora."));
            }
            s
        }),
        // transformers 4 spelling of text encoder 1 (`text_model.`), the one real SDXL files use.
        ("text_model", &|k| k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")),
    ];
    for (name, f) in spellings {
        let path = rewrite(dir.path(), &format!("{name}.safetensors"), f, true);
        let (a, report) = read_adapter(&path, &keys).unwrap();
        assert!(report.unmatched_keys.is_empty(), "{name}: {:?}", report.unmatched_keys.first());
        assert_eq!(a.format, AdapterFormat::Peft, "{name}");
        same_deltas(&a, &src);
    }
    // UNet keys without a prefix (`save_attn_procs`): only the UNet part, text-encoder keys unmatched.
    let path = rewrite(dir.path(), "bare.safetensors", &|k| k.strip_prefix("unet.").unwrap_or(k).to_string(), false);
    let (a, _) = read_adapter(&path, &keys).unwrap();
    let unet = a.modules.iter().filter(|m| m.layer.starts_with("unet.")).count();
    assert_eq!(unet, 192);
}

#[test]
fn peft_alpha_sources() {
    let keys = tiny_keys();
    let dir = tmp();
    // No metadata: scale 1 (alpha = rank), with a warning.
    let path = rewrite(dir.path(), "nometa.safetensors", &|k| k.to_string(), false);
    let (a, report) = read_adapter(&path, &keys).unwrap();
    assert!(a.modules.iter().all(|m| m.alpha().is_none() && m.scale() == 1.0));
    assert!(report.warnings.iter().any(|w| w.contains("lora_adapter_metadata")), "{:?}", report.warnings);
    // rsLoRA: alpha / sqrt(r).
    let raw = read_file(&lora_fixture("peft_diffusers.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&raw.metadata["lora_adapter_metadata"]).unwrap();
    cfg["unet.use_rslora"] = serde_json::Value::Bool(true);
    let mut meta = raw.metadata.clone();
    meta.insert("lora_adapter_metadata".into(), cfg.to_string());
    let path = dir.path().join("rs.safetensors");
    write_safetensors(&path, &raw.tensors, &meta, StoreDtype::F32).unwrap();
    let (a, _) = read_adapter(&path, &keys).unwrap();
    let m = a.module("unet.up_blocks.1.attentions.0.proj_out").unwrap();
    assert!((m.scale() - 8.0 / 2.0).abs() < 1e-6, "rsLoRA scale {}", m.scale());
    let te = a.module("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").unwrap();
    assert!((te.scale() - 2.0).abs() < 1e-6);
    // A `.alpha` tensor wins over the metadata.
    let mut tensors = raw.tensors.clone();
    tensors.insert("unet.up_blocks.1.attentions.0.proj_out.alpha".into(), Tensor::new(1f32, &Device::Cpu).unwrap());
    let path = dir.path().join("alpha.safetensors");
    write_safetensors(&path, &tensors, &raw.metadata, StoreDtype::F32).unwrap();
    let (a, r) = read_adapter(&path, &keys).unwrap();
    assert!(r.unmatched_keys.is_empty());
    assert_eq!(a.module("unet.up_blocks.1.attentions.0.proj_out").unwrap().alpha(), Some(1.0));
}

// ------------------------------------------------------------------ unmatched keys and bad files

#[test]
fn every_unmatched_key_is_reported() {
    let keys = tiny_keys();
    let dir = tmp();
    let mut raw = read_file(&lora_fixture("kohya_sgm.safetensors")).unwrap();
    let extra = [
        // A module of an input block SDXL does not have.
        "lora_unet_input_blocks_9_0_in_layers_2.lora_down.weight",
        "lora_unet_input_blocks_9_0_in_layers_2.lora_up.weight",
        // A suffix graft does not know on a known module.
        "lora_unet_input_blocks_4_1_proj_in.bias_indices",
        // Not in the family at all.
        "something_else.weight",
        // A LoRA on an attention hook point (LoRA goes on linears only).
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1.lora_up.weight",
    ];
    for k in extra {
        raw.tensors.insert(k.into(), randn((2, 2), 1));
    }
    // Half a LoRA: a module whose lora_up is missing.
    let half = "lora_te2_text_model_encoder_layers_2_mlp_fc1";
    raw.tensors.remove(&format!("{half}.lora_up.weight")).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).chain([format!("{half}.alpha"), format!("{half}.lora_down.weight")]).collect();
    let path = dir.path().join("extra.safetensors");
    write_safetensors(&path, &raw.tensors, &raw.metadata, StoreDtype::F16).unwrap();
    let (a, report) = read_adapter(&path, &keys).unwrap();
    assert_eq!(a.modules.len(), 227);
    let mut want = extra.clone();
    want.sort();
    assert_eq!(report.unmatched_keys, want);
    assert!(report.warnings.iter().any(|w| w.contains(half)), "{:?}", report.warnings);
    let summary = report.summary();
    assert!(summary.contains("8 keys matched no layer") && summary.contains("something_else.weight"), "{summary}");
}

fn expect_err(path: &Path, keys: &KeyMap, needles: &[&str]) {
    let err = read_adapter(path, keys).err().unwrap_or_else(|| panic!("{} loaded", path.display())).to_string();
    assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
    for n in needles {
        assert!(err.contains(n), "error lacks `{n}`: {err}");
    }
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let keys = tiny_keys();
    let dir = tmp();
    let bytes = std::fs::read(lora_fixture("kohya_sgm.safetensors")).unwrap();

    let p = dir.path().join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_err(&p, &keys, &["truncated or corrupt"]);

    let p = dir.path().join("garbage.safetensors");
    std::fs::write(&p, b"not a safetensors file at all").unwrap();
    expect_err(&p, &keys, &["not a valid safetensors file"]);

    expect_err(&dir.path().join("missing.safetensors"), &keys, &["cannot read"]);

    let one = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let p = dir.path().join(name);
        let map: BTreeMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        write_safetensors(&p, &map, &BTreeMap::new(), StoreDtype::F32).unwrap();
        p
    };
    // SD 1.x names: nothing matches the SDXL layers.
    let p = one(
        "sd15.safetensors",
        vec![
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", randn((4, 320), 1)),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", randn((320, 4), 2)),
        ],
    );
    expect_err(&p, &keys, &["no key", "matched a layer"]);
    // Unknown key family.
    let p = one("model.safetensors", vec![("conv_in.weight", randn((4, 4), 1))]);
    expect_err(&p, &keys, &["not a known adapter format", "conv_in.weight"]);
    // A known layer with the wrong shape (another base model).
    let k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
    let p = one(
        "shape.safetensors",
        vec![(&format!("{k}.lora_down.weight"), randn((4, 768), 1)), (&format!("{k}.lora_up.weight"), randn((48, 4), 2))],
    );
    expect_err(&p, &keys, &[k, "another base model"]);
    // Tucker LoHa on a linear layer.
    let p = one("tucker.safetensors", vec![(&format!("{k}.hada_w1_a"), randn((48, 2), 1)), (&format!("{k}.hada_t1"), randn((2, 2), 2))]);
    expect_err(&p, &keys, &["hada_t1", "Tucker"]);
    // Bad graft-native config.
    let p = dir.path().join("native.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("graft.strategy".to_string(), "gate".to_string());
    meta.insert("graft.config".to_string(), "{not json".to_string());
    let mut ts = BTreeMap::new();
    ts.insert("unet.mid_block.attentions.0.transformer_blocks.0.attn1.A".to_string(), randn((2, 2), 1));
    write_safetensors(&p, &ts, &meta, StoreDtype::F32).unwrap();
    expect_err(&p, &keys, &["graft.config", "not valid JSON"]);
    // A non-float tensor.
    let p = dir.path().join("int.safetensors");
    let header = r#"{"lora_unet_input_blocks_4_1_proj_in.alpha":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&4i64.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    expect_err(&p, &keys, &["dtype I64", "lora_unet_input_blocks_4_1_proj_in.alpha"]);
}

#[test]
fn detection() {
    let dir = tmp();
    let keys = tiny_keys();
    for (file, format) in [
        ("kohya_sgm.safetensors", AdapterFormat::Kohya),
        ("kohya_diffusers_bf16.safetensors", AdapterFormat::Kohya),
        ("peft_diffusers.safetensors", AdapterFormat::Peft),
    ] {
        let raw = read_file(&lora_fixture(file)).unwrap();
        assert_eq!(graft_formats::detect(&raw), Some(format), "{file}");
    }
    let diff = ModuleWeights::full("unet.down_blocks.1.attentions.0.proj_in", randn((48, 48), 3), None);
    let p = dir.path().join("d.safetensors");
    graft_formats::write_diff(&p, &[diff], &tiny_layout(), &KohyaMetadata::new("d"), StoreDtype::BF16).unwrap();
    let (a, _) = read_adapter(&p, &keys).unwrap();
    assert_eq!(a.format, AdapterFormat::Lycoris);
    assert_eq!(a.modules[0].kind(), ModuleKind::Full);
}
