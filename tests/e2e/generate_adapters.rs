//! Adapter files in generation (tests/fixtures/lora, made by tools/reference/check_lora_files.py):
//! unfused outputs equal diffusers' `load_lora_weights` for the kohya and PEFT files, on the UNet
//! and both text encoders, at weights 1.0 and 0.5; several adapters at once; fuse / unfuse
//! restores the base weights bit for bit; `graft generate` with `--adapter`, prompt tags and
//! `--lora-dir`, `--prompts`, `--batch-size`, `--grid`, `--fuse`; graft-native files through their
//! strategy plugin; every key accounted for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use graft_formats::{write_native, ModuleWeights, NativeInfo, StoreDtype};
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::{add_native, fuse_all, unfuse_all, FileAdapters};
use graft_runtime::adapters::store::ParamKey;
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_sdxl::{PipelineHooks, SdxlModel};
use graft_tests::{fixtures, graft, graft_err, scratch, tiny_model};
use graft_trainer::png_out::read_parameters;

fn lora(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn model() -> SdxlModel {
    SdxlModel::load(&tiny_model(), None, &Device::Cpu).unwrap()
}

fn load(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_iter().collect()
}

fn expected() -> BTreeMap<String, Tensor> {
    load(&lora("expected.safetensors"))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// The UNet output for the inputs of reference/unet.safetensors (main case).
fn unet_out(model: &SdxlModel, hooks: PipelineHooks) -> Tensor {
    let r = load(&fixtures().join("reference/unet.safetensors"));
    model.unet.forward(&r["sample"], &r["timesteps"], &r["encoder_hidden_states"], &r["text_embeds"], &r["time_ids"], hooks.unet).unwrap()
}

/// The penultimate hidden states of both text encoders for the prompts of reference/te.safetensors.
fn te_out(model: &SdxlModel, hooks: PipelineHooks) -> (Tensor, Tensor) {
    let r = load(&fixtures().join("reference/te.safetensors"));
    let ids = |k: &str| r[k].to_dtype(DType::U32).unwrap();
    let a = model.text_encoder.forward(&ids("te1.input_ids"), hooks.text_encoder).unwrap();
    let b = model.text_encoder_2.forward(&ids("te2.input_ids"), hooks.text_encoder_2).unwrap();
    (a.hidden_states[2].clone(), b.hidden_states[2].clone())
}

/// Checks the UNet and text-encoder outputs against diffusers' at `tag` (`w1` / `w05`) for each part.
fn check_outputs(model: &SdxlModel, files: &FileAdapters, te_tag: &str, unet_tag: &str, what: &str) -> [f32; 3] {
    let exp = expected();
    let hooks = files.hooks(PipelineHooks::none());
    let u = unet_out(model, hooks.pipeline());
    let want = &exp[&format!("peft_diffusers/unet_out.{unet_tag}")];
    let du = max_diff(&u, want);
    assert!(du <= 1e-4 * max_abs(want).max(1.0), "{what}: UNet output differs by {du}");
    let (t1, t2) = te_out(model, hooks.pipeline());
    let w1 = &exp[&format!("peft_diffusers/te1.hidden_states.2.{te_tag}")];
    let w2 = &exp[&format!("peft_diffusers/te2.hidden_states.2.{te_tag}")];
    let (d1, d2) = (max_diff(&t1, w1), max_diff(&t2, w2));
    assert!(d1 <= 1e-4 * max_abs(w1).max(1.0), "{what}: text_encoder differs by {d1}");
    assert!(d2 <= 1e-4 * max_abs(w2).max(1.0), "{what}: text_encoder_2 differs by {d2}");
    [du, d1, d2]
}

/// Every linear base weight of the model, as stored.
fn base_weights(model: &SdxlModel) -> Vec<(String, Vec<f32>, Option<Vec<f32>>)> {
    let mut out = Vec::new();
    for reg in model.registries() {
        for (i, info) in reg.layers().iter().enumerate() {
            if let Some(w) = reg.linear_weights(i) {
                let w = w.read().unwrap();
                let v = w.weight_f32().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = w.bias.as_ref().map(|b| b.to_vec1::<f32>().unwrap());
                out.push((info.name.clone(), v, b));
            }
        }
    }
    out
}

#[test]
fn kohya_and_peft_files_match_diffusers_at_weights_1_and_half() {
    let model = model();
    let base = unet_out(&model, PipelineHooks::none());
    for file in ["peft_diffusers.safetensors", "kohya_sgm.safetensors"] {
        let mut files = FileAdapters::new(&model).unwrap();
        let a = files.load(&lora(file), file, 1.0, 1.0).unwrap();
        let ad = &files.adapters()[a];
        assert!(ad.report.unmatched_keys.is_empty(), "{file}: {:?}", ad.report.unmatched_keys);
        assert_eq!(ad.counts(), [192, 18, 18], "{file}: 192 UNet linears, 6 per layer of 3-layer text encoders");
        let d = check_outputs(&model, &files, "w1", "w1", &format!("{file} at 1.0"));
        println!("{file} weight 1.0: max |diff| UNet {:.2e}, text_encoder {:.2e}, text_encoder_2 {:.2e}", d[0], d[1], d[2]);
        files.set_weights(a, 0.5, 0.5).unwrap();
        let d = check_outputs(&model, &files, "w05", "w05", &format!("{file} at 0.5"));
        println!("{file} weight 0.5: max |diff| UNet {:.2e}, text_encoder {:.2e}, text_encoder_2 {:.2e}", d[0], d[1], d[2]);
        // Separate weights, A1111's <lora:name:te:unet>.
        files.set_weights(a, 0.5, 1.0).unwrap();
        check_outputs(&model, &files, "w05", "w1", &format!("{file} at te 0.5, unet 1.0"));
        // Disabled: the base model.
        files.set_enabled(a, false).unwrap();
        let hooks = files.hooks(PipelineHooks::none());
        assert_eq!(max_diff(&unet_out(&model, hooks.pipeline()), &base), 0.0);
    }
}

#[test]
fn several_adapters_at_once_add_up() {
    // The same adapter from two files at half weight each is the adapter at weight 1; a third
    // (bf16 kohya file with diffusers names) at weight 0 changes nothing.
    let model = model();
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&lora("peft_diffusers.safetensors"), "peft", 0.5, 0.5).unwrap();
    files.load(&lora("kohya_sgm.safetensors"), "kohya", 0.5, 0.5).unwrap();
    files.load(&lora("kohya_diffusers_bf16.safetensors"), "bf16", 0.0, 0.0).unwrap();
    check_outputs(&model, &files, "w1", "w1", "two halves");
}

#[test]
fn fuse_gives_the_same_outputs_and_unfuse_restores_the_weights_bit_for_bit() {
    let model = model();
    let before = base_weights(&model);
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&lora("peft_diffusers.safetensors"), "peft", 1.0, 1.0).unwrap();
    files.load(&lora("lycoris_mixed.safetensors"), "lycoris", 1.0, 1.0).unwrap();
    let hooks_out = |files: &FileAdapters| {
        let h = files.hooks(PipelineHooks::none());
        (unet_out(&model, h.pipeline()), te_out(&model, h.pipeline()))
    };
    let (unfused_u, (unfused_t1, unfused_t2)) = hooks_out(&files);
    let fused = files.fuse().unwrap();
    assert_eq!(fused, 228, "every adapted layer (the LyCORIS layers are among the LoRA's)");
    assert!(files.is_fused());
    let (u, (t1, t2)) = hooks_out(&files);
    // The plain model sees the fused weights too.
    assert_eq!(max_diff(&unet_out(&model, PipelineHooks::none()), &u), 0.0);
    assert!(max_diff(&u, &unfused_u) <= 1e-4 * max_abs(&unfused_u).max(1.0), "{}", max_diff(&u, &unfused_u));
    assert!(max_diff(&t1, &unfused_t1) <= 1e-4 * max_abs(&unfused_t1).max(1.0));
    assert!(max_diff(&t2, &unfused_t2) <= 1e-4 * max_abs(&unfused_t2).max(1.0));
    assert_eq!(files.unfuse(), 228);
    let after = base_weights(&model);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert!(b == a, "{}: base weight not restored bit for bit", b.0);
    }
    assert_eq!(max_diff(&hooks_out(&files).0, &unfused_u), 0.0, "unfused again: the same outputs");
}

#[test]
fn lycoris_entries_fuse_to_lycoris_weights() {
    // The fused weight minus the loaded weight is what the LyCORIS library applies (LoHa, LoKr,
    // DoRA on rows and columns, full diff with bias).
    let model = model();
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&lora("lycoris_mixed.safetensors"), "lycoris", 1.0, 1.0).unwrap();
    let want = load(&lora("lycoris_expected.safetensors"));
    let weight = |name: &str| -> Tensor {
        for reg in model.registries() {
            if let Some(i) = reg.index_of(name) {
                return reg.linear_weights(i).unwrap().read().unwrap().weight_f32().unwrap();
            }
        }
        panic!("no {name}")
    };
    let before: BTreeMap<String, Tensor> = want.keys().map(|k| (k.clone(), weight(k))).collect();
    assert_eq!(files.fuse().unwrap(), want.len());
    for (layer, w) in &want {
        let d = (weight(layer) - &before[layer]).unwrap();
        let err = max_diff(&d, w);
        assert!(err <= 1e-5 * max_abs(w).max(1.0), "{layer}: {err}");
    }
    files.unfuse();
}

/// The bf16 kohya file with diffusers names (no alpha on the text encoders): fused weights minus
/// loaded weights are diffusers' `fuse_lora` deltas, at weight 1 and 0.5.
#[test]
fn bf16_kohya_file_with_diffusers_names_fuses_to_the_diffusers_deltas() {
    let model = model();
    let exp = expected();
    let selected: Vec<String> =
        serde_json::from_str(&graft_formats::read::read_file(&lora("expected.safetensors")).unwrap().metadata["selected"]).unwrap();
    let weight = |name: &str| -> Tensor {
        for reg in model.registries() {
            if let Some(i) = reg.index_of(name) {
                return reg.linear_weights(i).unwrap().read().unwrap().weight_f32().unwrap();
            }
        }
        panic!("no {name}")
    };
    let before: BTreeMap<&String, Tensor> = selected.iter().map(|l| (l, weight(l))).collect();
    let mut files = FileAdapters::new(&model).unwrap();
    let a = files.load(&lora("kohya_diffusers_bf16.safetensors"), "bf16", 1.0, 1.0).unwrap();
    for w in [1.0, 0.5] {
        files.set_weights(a, w, w).unwrap();
        files.fuse().unwrap();
        for layer in &selected {
            let want = (&exp[&format!("kohya_diffusers_bf16/{layer}")] * w).unwrap();
            let got = (weight(layer) - &before[layer]).unwrap();
            let d = max_diff(&got, &want);
            assert!(d <= 1e-5 * max_abs(&want).max(1.0), "{layer} at {w}: {d}");
        }
        files.unfuse();
    }
}

#[test]
fn keys_that_match_nothing_are_listed_and_a_file_that_matches_nothing_fails() {
    let model = model();
    let dir = scratch("adapters_unmatched");
    let raw = graft_formats::read::read_file(&lora("kohya_sgm.safetensors")).unwrap();
    let mut tensors = raw.tensors.clone();
    let t = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("lora_unet_no_such_block_attn1_to_q.lora_down.weight".into(), t.clone());
    tensors.insert("lora_te1_text_model_encoder_layers_7_mlp_fc1.lora_up.weight".into(), t.clone());
    let extra = dir.join("extra.safetensors");
    graft_formats::write::write_safetensors(&extra, &tensors, &raw.metadata, StoreDtype::F32).unwrap();
    let mut files = FileAdapters::new(&model).unwrap();
    let a = files.load(&extra, "extra", 1.0, 1.0).unwrap();
    let r = &files.adapters()[a].report;
    assert_eq!(
        r.unmatched_keys,
        vec![
            "lora_te1_text_model_encoder_layers_7_mlp_fc1.lora_up.weight".to_string(),
            "lora_unet_no_such_block_attn1_to_q.lora_down.weight".to_string()
        ]
    );
    assert!(r.summary().contains("2 keys matched no layer"), "{}", r.summary());

    // An SD 1.x-style file: nothing matches.
    let mut sd15 = BTreeMap::new();
    sd15.insert("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight".to_string(), t.clone());
    sd15.insert("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight".to_string(), t.t().unwrap());
    let bad = dir.join("sd15.safetensors");
    graft_formats::write::write_safetensors(&bad, &sd15, &BTreeMap::new(), StoreDtype::F32).unwrap();
    let e = format!("{:#}", files.load(&bad, "sd15", 1.0, 1.0).unwrap_err());
    assert!(e.contains("sd15.safetensors") && e.contains("no key"), "{e}");
    let e = graft_err(&[
        "generate",
        "--model",
        tiny_model().to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--adapter",
        bad.to_str().unwrap(),
        "--out",
        dir.join("x.png").to_str().unwrap(),
    ]);
    assert!(e.contains("sd15.safetensors") && e.contains("no key"), "{e}");
}

fn png(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn generate_with_adapter_flag_prompt_tags_and_fuse() {
    let dir = scratch("generate_adapters_cli");
    let model = tiny_model();
    let m = model.to_str().unwrap();
    let lora_dir = fixtures().join("lora");
    let common = ["--model", m, "--width", "64", "--height", "48", "--steps", "2", "--seed", "5"];
    let run = |name: &str, prompt: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec!["generate", "--prompt", prompt, "--out", out.to_str().unwrap()];
        args.extend(common);
        args.extend(extra);
        graft(&args).unwrap();
        out
    };
    let kohya = lora("kohya_sgm.safetensors");
    let base = run("base.png", "a red fox", &[]);
    let flag = run("flag.png", "a red fox", &["--adapter", &format!("{}:0.5", kohya.display())]);
    // By file stem and by ss_output_name (`tiny_kohya_sgm`) in --lora-dir.
    let tag = run("tag.png", "a red fox<lora:kohya_sgm:0.5>", &["--lora-dir", lora_dir.to_str().unwrap()]);
    let alias = run("alias.png", "<lora:tiny_kohya_sgm:0.5>a red fox", &["--lora-dir", lora_dir.to_str().unwrap()]);
    let fused = run("fused.png", "a red fox", &["--adapter", &format!("{}:0.5", kohya.display()), "--fuse"]);
    assert_ne!(png(&base), png(&flag), "the adapter changes the image");
    assert_eq!(png(&flag), png(&tag), "a tag with the tags removed is the same as --adapter");
    assert_eq!(png(&flag), png(&alias));
    let d = max_pixel_diff(&png(&flag), &png(&fused));
    assert!(d <= 2, "fused and unfused differ by {d} levels");
    let params = read_parameters(&tag).unwrap().unwrap();
    assert!(params.starts_with("a red fox<lora:kohya_sgm:0.5>\n"), "{params}");
    let hash = &graft_formats::read::read_file(&kohya).unwrap().metadata["sshs_model_hash"][..12];
    assert!(params.contains(&format!("Lora hashes: \"kohya_sgm: {hash}\"")), "{params}");

    // te 0 / unet 0.5 differs from 0.5 / 0.5 (the text encoders are adapted too).
    let split = run("split.png", "a red fox <lora:kohya_sgm:0:0.5>", &["--lora-dir", lora_dir.to_str().unwrap()]);
    assert_ne!(png(&split), png(&tag));

    let e = graft_err(&["generate", "--model", m, "--prompt", "<lora:nope:1> fox", "--lora-dir", lora_dir.to_str().unwrap()]);
    assert!(e.contains("no adapter named `nope`"), "{e}");
    let e = graft_err(&["generate", "--model", m, "--prompt", "<lora:kohya_sgm:1> fox"]);
    assert!(e.contains("--lora-dir"), "{e}");
}

#[test]
fn prompt_file_batches_and_grid() {
    let dir = scratch("generate_adapters_prompts");
    let m = tiny_model();
    let lora_dir = fixtures().join("lora");
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "# three prompts\na red fox <lora:peft_diffusers:0.7> --d 3\na red fox --d 3\n\
         a blue cat <lora:peft_diffusers:0.7> --n blurry --d 9\na cat --w 48 --h 64 --l 1\n",
    )
    .unwrap();
    let run = |sub: &str, batch: &str| -> Vec<PathBuf> {
        let out = dir.join(sub).join("img.png");
        graft(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "2",
            "--lora-dir",
            lora_dir.to_str().unwrap(),
            "--batch-size",
            batch,
            "--images-per-prompt",
            "2",
            "--grid",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    };
    let one = run("b1", "1");
    let four = run("b4", "4");
    let names: Vec<String> = one.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "img.png",
            "img_00_3.png",
            "img_01_4.png",
            "img_02_3.png",
            "img_03_4.png",
            "img_04_9.png",
            "img_05_10.png",
            "img_06_3.png",
            "img_07_4.png"
        ]
    );
    for (a, b) in one.iter().zip(&four).skip(1) {
        let d = max_pixel_diff(&png(a), &png(b));
        assert!(d <= 2, "{}: batched and single images differ by {d} levels", a.display());
    }
    assert_ne!(png(&one[1]), png(&one[3]), "the same seed with and without the adapter");
    let grid = image::open(&one[0]).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * (64 + 4) + 4, 3 * (64 + 4) + 4));
    let p = read_parameters(&one[5]).unwrap().unwrap();
    assert!(p.starts_with("a blue cat <lora:peft_diffusers:0.7>\nNegative prompt: blurry\n") && p.contains("Lora hashes"), "{p}");
    assert!(!read_parameters(&one[3]).unwrap().unwrap().contains("Lora hashes"));
}

/// A graft-native attention-gate file applied through the plugin: the parameters the file holds
/// are the strategy's, and `graft generate --adapter` uses it beside a kohya file.
#[test]
fn graft_native_file_goes_through_its_strategy() {
    let plugins = graft_tests::build_plugins(&["attention-gate"]);
    let dir = scratch("generate_adapters_native");
    let model = model();
    let mut rng = graft_sdxl::rng::GraftRng::new(21);
    let layers = ["unet.mid_block.attentions.0.transformer_blocks.0.attn2", "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn1"];
    let mut modules = Vec::new();
    for l in layers {
        let dim = model.layers().iter().find(|i| i.name == l).unwrap().in_features;
        let mut t = BTreeMap::new();
        t.insert("A".to_string(), (rng.randn((2, dim), &Device::Cpu).unwrap() * 0.3).unwrap());
        t.insert("B".to_string(), (rng.randn((dim, 2), &Device::Cpu).unwrap() * 0.3).unwrap());
        t.insert("gate".to_string(), Tensor::new(&[0.8f32], &Device::Cpu).unwrap());
        modules.push(ModuleWeights { layer: l.to_string(), weights: graft_formats::AdapterWeights::Native { tensors: t }, dora_scale: None });
    }
    let info = NativeInfo {
        strategy: "attention-gate".into(),
        version: "0.1.0".into(),
        config: serde_json::json!({"rank": 2, "targets": layers, "unfreeze": []}),
    };
    let path = dir.join("gate.graft.safetensors");
    write_native(&path, &info, &modules, StoreDtype::F32).unwrap();

    let mut manager = PluginManager::new(vec![SearchDir { path: plugins.clone(), origin: DirOrigin::Flag }]);
    manager.scan();
    let plugin = manager.require("attention-gate").unwrap();
    let mut files = FileAdapters::new(&model).unwrap();
    let (file, report) = graft_formats::read_adapter(&path, files.keys()).unwrap();
    assert_eq!(report.attached.len(), 2);
    let mut set = AdapterSet::new(&model, 0);
    let r = add_native(&mut set, plugin, "gate", &path, &file, 1.0, 1.0).unwrap();
    assert_eq!((r.set, r.missing.len(), r.unmatched.len()), (6, 0, 0));
    for m in &modules {
        let graft_formats::AdapterWeights::Native { tensors } = &m.weights else { unreachable!() };
        for (name, t) in tensors {
            let p = set.store().get(&ParamKey::new("gate", &m.layer, name)).unwrap();
            assert_eq!(max_diff(p.var.as_tensor(), t), 0.0);
        }
    }
    let base = unet_out(&model, PipelineHooks::none());
    files.load(&lora("peft_diffusers.safetensors"), "peft", 1.0, 1.0).unwrap();
    let lora_only = {
        let h = files.hooks(PipelineHooks::none());
        unet_out(&model, h.pipeline())
    };
    let both = {
        let s = set.hooks();
        let h = files.hooks(s.pipeline());
        unet_out(&model, h.pipeline())
    };
    assert!(max_diff(&both, &lora_only) > 1e-3, "the gate changes the output");
    assert!(max_diff(&lora_only, &base) > 1e-3);
    // Fusing folds the LoRA; the gate has no weight difference and stays a hook.
    let (f, s) = fuse_all(&mut files, &mut set).unwrap();
    assert_eq!((f, s), (228, 0));
    let fused = {
        let sh = set.hooks();
        let h = files.hooks(sh.pipeline());
        unet_out(&model, h.pipeline())
    };
    assert!(max_diff(&fused, &both) <= 1e-4 * max_abs(&both).max(1.0));
    unfuse_all(&mut files, &mut set);

    // Through the command line, beside a kohya file.
    let out = dir.join("native.png");
    let args = |out: &Path, adapters: &[String]| {
        let mut a: Vec<String> = [
            "generate",
            "--model",
            tiny_model().to_str().unwrap(),
            "--prompt",
            "a red fox",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "2",
            "--plugins",
            plugins.to_str().unwrap(),
            "--no-default-plugins",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for x in adapters {
            a.push("--adapter".into());
            a.push(x.clone());
        }
        a
    };
    let run = |out: &Path, adapters: &[String]| {
        let a = args(out, adapters);
        graft(&a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    };
    run(&out, &[path.display().to_string(), lora("kohya_sgm.safetensors").display().to_string()]);
    let only = dir.join("only_kohya.png");
    run(&only, &[lora("kohya_sgm.safetensors").display().to_string()]);
    assert_ne!(png(&out), png(&only));
    let e = graft_err(
        &args(&dir.join("x.png"), &[path.display().to_string()])
            .iter()
            .map(|s| s.as_str())
            .filter(|s| *s != "--plugins" && *s != plugins.to_str().unwrap())
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("attention-gate"), "{e}");
}

/// The registry weight (linear or conv kernel) of hook point `name`, in f32.
fn hook_weight(model: &SdxlModel, name: &str) -> Tensor {
    for reg in model.registries() {
        if let Some(i) = reg.index_of(name) {
            return reg.linear_weights(i).unwrap().read().unwrap().weight_f32().unwrap();
        }
    }
    panic!("no hook point {name}")
}

#[test]
fn locon_and_tucker_files_apply_as_lycoris_computes() {
    // LoCon (3x3, 1x1, stride-2) and Tucker LoCon entries made by the LyCORIS library: the fused
    // kernel minus the loaded kernel is LyCORIS' weight difference, the unfused extra convolution
    // gives the fused model's output, and unfuse restores the kernels bit for bit.
    let model = model();
    let mut files = FileAdapters::new(&model).unwrap();
    let a = files.load(&lora("lycoris_locon.safetensors"), "locon", 1.0, 1.0).unwrap();
    let want = load(&lora("lycoris_locon_expected.safetensors"));
    let ad = &files.adapters()[a];
    assert_eq!(ad.report.format, graft_formats::AdapterFormat::Lycoris, "lora_mid makes it a LyCORIS file");
    assert!(ad.report.unmatched_keys.is_empty() && ad.report.warnings.is_empty(), "{}", ad.report.summary());
    assert_eq!(ad.file.modules.len(), want.len());

    let base = unet_out(&model, PipelineHooks::none());
    let unfused = unet_out(&model, files.hooks(PipelineHooks::none()).pipeline());
    assert!(max_diff(&base, &unfused) > 1e-3, "the LoCon changes the UNet output");
    let before = base_weights(&model);
    let kernels: BTreeMap<String, Tensor> = want.keys().map(|k| (k.clone(), hook_weight(&model, k))).collect();
    assert_eq!(files.fuse().unwrap(), want.len());
    for (layer, w) in &want {
        let d = (hook_weight(&model, layer) - &kernels[layer]).unwrap();
        let err = max_diff(&d, w);
        println!("{layer}: max |graft - LyCORIS| {err:.2e}");
        assert!(err <= 1e-5 * max_abs(w).max(1.0), "{layer}: {err}");
    }
    let fused = unet_out(&model, PipelineHooks::none());
    let d = max_diff(&fused, &unfused);
    assert!(d <= 1e-4 * max_abs(&fused).max(1.0), "fused vs unfused conv adapters: {d}");
    files.unfuse();
    assert!(before == base_weights(&model), "unfuse restores every kernel bit for bit");
    assert_eq!(max_diff(&unet_out(&model, PipelineHooks::none()), &base), 0.0);

    // At weight 0.5 the difference halves (unfused).
    files.set_weights(a, 1.0, 0.5).unwrap();
    let half = unet_out(&model, files.hooks(PipelineHooks::none()).pipeline());
    assert!(max_diff(&half, &base) > 0.0 && max_diff(&half, &unfused) > 0.0);
}

#[test]
fn generate_with_a_locon_file_changes_the_image() {
    let dir = scratch("generate_locon");
    let model = tiny_model();
    let m = model.to_str().unwrap();
    let locon = lora("lycoris_locon.safetensors");
    let common = ["--model", m, "--width", "64", "--height", "48", "--steps", "2", "--seed", "5", "--prompt", "a red fox"];
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec!["generate", "--out", out.to_str().unwrap()];
        args.extend(common);
        args.extend(extra);
        graft(&args).unwrap();
        out
    };
    let base = run("base.png", &[]);
    let with = run("locon.png", &["--adapter", &format!("{}:1", locon.display())]);
    let fused = run("fused.png", &["--adapter", &format!("{}:1", locon.display()), "--fuse"]);
    assert_ne!(png(&base), png(&with), "the LoCon changes the image");
    let d = max_pixel_diff(&png(&with), &png(&fused));
    assert!(d <= 2, "fused and unfused LoCon differ by {d} levels");
}
