//! `graft inspect`, `graft convert` and `graft merge` on the LoRA fixtures (tests/fixtures/lora)
//! and the tiny model: conversions keep every weight difference, the math-less ones fail clearly,
//! merges are exact by concatenation and near-optimal by SVD, and adapters merged into a
//! checkpoint (single file or diffusers folder, from either) give diffusers' outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use graft_formats::{read_adapter, AdapterFile, AdapterFormat, KeyMap, ModuleKind, StoreDtype};
use graft_host::tools::inspect::{inspect, InspectArgs};
use graft_host::tools::ArchArgs;
use graft_runtime::adapters::dispatcher::AdapterSet;
use graft_runtime::adapters::files::{add_native, FileAdapters};
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_sdxl::{PipelineHooks, SdxlModel};
use graft_tests::{fixtures, graft, graft_err, scratch, tiny_model};

fn lora(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn keys() -> KeyMap {
    let config = graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny_model()).unwrap();
    graft_host::tools::key_map(&config).unwrap().0
}

fn read(path: &Path) -> AdapterFile {
    let (file, report) = read_adapter(path, &keys()).unwrap();
    assert!(report.unmatched_keys.is_empty(), "{}: {:?}", path.display(), report.unmatched_keys);
    file
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Every layer's weight difference at weight `w` (DoRA against the tiny model's weights is not
/// needed here).
fn deltas(file: &AdapterFile, w: f64) -> BTreeMap<String, Tensor> {
    file.modules.iter().map(|m| (m.layer.clone(), m.delta_weight(w).unwrap())).collect()
}

fn assert_same_deltas(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, tol: f32, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: other layers");
    for (k, x) in a {
        let d = max_diff(x, &b[k]);
        assert!(d <= tol * max_abs(x).max(1e-3), "{what}: {k}: {d}");
    }
}

const CFG: &str = "--model-config";

#[test]
fn inspect_reports_format_layers_ranks_alphas_metadata_and_base_model() {
    let tiny = tiny_model();
    let arch = ArchArgs { model_config: Some(tiny.clone()) };
    let args = |f: &str| InspectArgs { file: lora(f), layers: true, json: true, full: false, arch: arch.clone() };
    let k = inspect(&args("kohya_sgm.safetensors")).unwrap();
    assert_eq!(k["format"], "kohya");
    assert_eq!(k["layers"], 228);
    assert_eq!(k["layers_per_component"], serde_json::json!({"text_encoder": 18, "text_encoder_2": 18, "unet": 192}));
    assert_eq!(k["ranks"], serde_json::json!({"2": 1, "4": 227}));
    assert_eq!(k["alphas"], serde_json::json!({"3": 1, "8": 227}));
    assert_eq!(k["dtypes"], serde_json::json!({"F16": 684}));
    assert_eq!(k["base_model"]["sdxl"], true);
    assert_eq!(k["metadata"]["ss_output_name"], "tiny_kohya_sgm");
    assert_eq!(k["unmatched_keys"], serde_json::json!([]));
    let p = inspect(&args("peft_diffusers.safetensors")).unwrap();
    assert_eq!(p["format"], "peft");
    assert_eq!(p["ranks"], k["ranks"]);
    let b = inspect(&args("kohya_diffusers_bf16.safetensors")).unwrap();
    assert_eq!(b["alphas"]["none (= rank)"], 36, "no alpha on the text encoders");
    let l = inspect(&args("lycoris_mixed.safetensors")).unwrap();
    assert_eq!(l["format"], "lycoris");
    assert_eq!(l["kinds"], serde_json::json!({"full": 1, "loha": 1, "loha+dora": 1, "lokr": 3, "lora+dora": 2}));

    let text = graft_host::tools::inspect::text(&k, true, false);
    for want in [
        "format:      kohya",
        "base model:  SDXL (ss_base_model_version = sdxl_base_v1-0",
        "layers:      228",
        "ranks:       2 (1), 4 (227)",
        "unmatched:   none",
        "ss_output_name: tiny_kohya_sgm",
        "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_k lora rank 2 alpha 8 scale 4",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    // Through the command line, and on the built-in SDXL base architecture nothing of the tiny
    // model matches: said, not an error.
    graft(&["inspect", s(&lora("kohya_sgm.safetensors")), CFG, s(&tiny)]).unwrap();
    let sdxl = inspect(&InspectArgs { file: lora("kohya_sgm.safetensors"), layers: false, json: true, full: false, arch: ArchArgs::default() })
        .unwrap();
    assert_eq!(sdxl["matches_model"], false);
    assert!(sdxl["error"].as_str().unwrap().contains("another"), "{}", sdxl["error"]);
    let e = graft_err(&["inspect", s(&fixtures().join("nope.safetensors"))]);
    assert!(e.contains("nope.safetensors"), "{e}");
}

#[test]
fn convert_between_kohya_peft_lycoris_keeps_every_delta() {
    let dir = scratch("tools_convert");
    let tiny = tiny_model();
    let want = deltas(&read(&lora("peft_diffusers.safetensors")), 1.0);
    let conv = |input: &Path, to: &str, out: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(out);
        let mut args = vec!["convert", s(input), "--to", to, "--out", s(&out), CFG, s(&tiny), "--dtype", "f32"];
        args.extend(extra);
        graft(&args).unwrap();
        out
    };
    let kohya = conv(&lora("peft_diffusers.safetensors"), "kohya", "k.safetensors", &[]);
    let f = read(&kohya);
    assert_eq!(f.format, AdapterFormat::Kohya);
    assert_same_deltas(&want, &deltas(&f, 1.0), 1e-6, "peft -> kohya");
    let raw = graft_formats::read::read_file(&kohya).unwrap();
    assert!(raw.tensors.keys().any(|k| k.starts_with("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.")));
    assert_eq!(raw.metadata["ss_output_name"], "k");

    let kd = conv(&kohya, "kohya-diffusers", "kd.safetensors", &["--name", "my_style"]);
    let raw = graft_formats::read::read_file(&kd).unwrap();
    assert!(raw.tensors.keys().any(|k| k.starts_with("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.")));
    assert_eq!(raw.metadata["ss_output_name"], "my_style");
    assert_eq!(raw.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert_same_deltas(&want, &deltas(&read(&kd), 1.0), 1e-6, "kohya -> kohya-diffusers");

    let peft = conv(&kd, "peft", "p.safetensors", &[]);
    let f = read(&peft);
    assert_eq!(f.format, AdapterFormat::Peft);
    assert_same_deltas(&want, &deltas(&f, 1.0), 1e-6, "kohya-diffusers -> peft");

    let ly = conv(&peft, "lycoris", "l.safetensors", &[]);
    assert_same_deltas(&want, &deltas(&read(&ly), 1.0), 1e-6, "peft -> lycoris");

    // The stored dtype is kept by default.
    let f16 = dir.join("f16.safetensors");
    graft(&["convert", s(&lora("kohya_sgm.safetensors")), "--to", "peft", "--out", s(&f16), CFG, s(&tiny)]).unwrap();
    let h = graft_host::generate::lora_dir::read_header(&f16).unwrap();
    assert!(h.tensors.values().all(|t| t.dtype == "F16"));

    // LyCORIS entries that are not LoRAs: a clear error, or LyCORIS to LyCORIS exactly.
    let e =
        graft_err(&["convert", s(&lora("lycoris_mixed.safetensors")), "--to", "kohya", "--out", s(&dir.join("x.safetensors")), CFG, s(&tiny)]);
    assert!(e.contains("LoRA form") && e.contains("lycoris_mixed"), "{e}");
    let mixed = read(&lora("lycoris_mixed.safetensors"));
    let again = read(&conv(&lora("lycoris_mixed.safetensors"), "lycoris", "mixed.safetensors", &[]));
    for (a, b) in mixed.modules.iter().zip(&again.modules) {
        assert_eq!((a.layer.as_str(), a.kind(), a.dora_scale.is_some()), (b.layer.as_str(), b.kind(), b.dora_scale.is_some()));
        let base = Tensor::ones(a.weight_shape().unwrap(), DType::F32, &Device::Cpu).unwrap();
        assert!(max_diff(&a.delta_for_base(&base, 1.0).unwrap(), &b.delta_for_base(&base, 1.0).unwrap()) < 1e-6);
    }
}

#[test]
fn convert_with_rank_resizes_and_approximates() {
    let dir = scratch("tools_convert_rank");
    let tiny = tiny_model();
    let want = deltas(&read(&lora("kohya_sgm.safetensors")), 1.0);
    // Rank 4 holds every layer exactly; rank 2 does not.
    let r4 = dir.join("r4.safetensors");
    graft(&["convert", s(&lora("kohya_sgm.safetensors")), "--to", "kohya", "--rank", "4", "--out", s(&r4), CFG, s(&tiny), "--dtype", "f32"])
        .unwrap();
    assert_same_deltas(&want, &deltas(&read(&r4), 1.0), 1e-5, "rank 4");
    let r2 = dir.join("r2.safetensors");
    graft(&["convert", s(&lora("kohya_sgm.safetensors")), "--to", "peft", "--rank", "2", "--out", s(&r2), CFG, s(&tiny), "--dtype", "f32"])
        .unwrap();
    let f = read(&r2);
    assert!(f.modules.iter().all(|m| m.rank() == Some(2)));
    let got = deltas(&f, 1.0);
    let layer = "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_k"; // rank 2 already: exact
    assert!(max_diff(&got[layer], &want[layer]) < 1e-5 * max_abs(&want[layer]));
    let other = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    };
    let e = rel(&got[other], &want[other]);
    assert!(e > 1e-3 && e < 1.0, "rank 2 of a rank-4 difference: {e}");

    // LoHa / LoKr / full entries (no DoRA) become LoRAs by SVD; at full rank exactly.
    let mixed = read(&lora("lycoris_mixed.safetensors"));
    let plain: Vec<_> = mixed
        .modules
        .iter()
        .filter(|m| m.dora_scale.is_none() && !matches!(m.weights, graft_formats::AdapterWeights::Full { .. }))
        .cloned()
        .collect();
    assert_eq!(plain.iter().map(|m| m.kind()).collect::<Vec<_>>(), [ModuleKind::LoKr, ModuleKind::LoHa, ModuleKind::LoKr, ModuleKind::LoKr]);
    let src = dir.join("lohakr.safetensors");
    let layout = graft_sdxl::sgm::SgmLayout::from_configs(
        &graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny).unwrap().unet,
        &graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny).unwrap().vae,
        &graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny).unwrap().text_encoder_2,
    )
    .unwrap();
    graft_formats::write_lycoris(&src, &plain, &layout, &graft_formats::KohyaMetadata::new("x"), StoreDtype::F32).unwrap();
    let out = dir.join("lohakr_lora.safetensors");
    graft(&["convert", s(&src), "--to", "kohya", "--rank", "64", "--out", s(&out), CFG, s(&tiny), "--dtype", "f32"]).unwrap();
    let want: BTreeMap<String, Tensor> = plain.iter().map(|m| (m.layer.clone(), m.delta_weight(1.0).unwrap())).collect();
    assert_same_deltas(&want, &deltas(&read(&out), 1.0), 1e-5, "LoHa/LoKr at full rank");
    let e = graft_err(&["convert", s(&lora("kohya_sgm.safetensors")), "--to", "kohya", "--rank", "0", "--out", s(&out), CFG, s(&tiny)]);
    assert!(e.contains("at least 1"), "{e}");
}

/// UNet output of the tiny model for reference/unet.safetensors' inputs.
fn unet_out(model: &SdxlModel, hooks: PipelineHooks) -> Tensor {
    let r: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("reference/unet.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    model.unet.forward(&r["sample"], &r["timesteps"], &r["encoder_hidden_states"], &r["text_embeds"], &r["time_ids"], hooks.unet).unwrap()
}

fn te_out(model: &SdxlModel, hooks: PipelineHooks) -> (Tensor, Tensor) {
    let r: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("reference/te.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let ids = |k: &str| r[k].to_dtype(DType::U32).unwrap();
    let a = model.text_encoder.forward(&ids("te1.input_ids"), hooks.text_encoder).unwrap();
    let b = model.text_encoder_2.forward(&ids("te2.input_ids"), hooks.text_encoder_2).unwrap();
    (a.hidden_states[2].clone(), b.hidden_states[2].clone())
}

fn expected(k: &str) -> Tensor {
    candle_core::safetensors::load(lora("expected.safetensors"), &Device::Cpu).unwrap().remove(&format!("peft_diffusers/{k}")).unwrap()
}

/// A model matches diffusers' outputs with the LoRA fixture at `tag` (`w1` / `w05`).
fn check_model(model: &SdxlModel, tag: &str, tol: f32, what: &str) {
    let u = unet_out(model, PipelineHooks::none());
    let want = expected(&format!("unet_out.{tag}"));
    let d = max_diff(&u, &want);
    assert!(d <= tol * max_abs(&want).max(1.0), "{what}: UNet differs by {d}");
    let (t1, t2) = te_out(model, PipelineHooks::none());
    for (got, k) in [(t1, "te1"), (t2, "te2")] {
        let want = expected(&format!("{k}.hidden_states.2.{tag}"));
        let d = max_diff(&got, &want);
        assert!(d <= tol * max_abs(&want).max(1.0), "{what}: {k} differs by {d}");
    }
}

#[test]
fn merge_adapters_exactly_and_by_svd() {
    let dir = scratch("tools_merge_adapters");
    let tiny = tiny_model();
    let want = deltas(&read(&lora("peft_diffusers.safetensors")), 1.0);
    let k = format!("{}:0.5", lora("kohya_sgm.safetensors").display());
    let p = format!("{}:0.5", lora("peft_diffusers.safetensors").display());
    let exact = dir.join("exact.safetensors");
    graft(&["merge", "--adapter", &k, "--adapter", &p, "--out", s(&exact), CFG, s(&tiny), "--dtype", "f32"]).unwrap();
    let f = read(&exact);
    assert_eq!(f.format, AdapterFormat::Kohya);
    assert_same_deltas(&want, &deltas(&f, 1.0), 1e-5, "two halves concatenated");
    let m = f.module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").unwrap();
    assert_eq!((m.rank(), m.scale()), (Some(8), 1.0), "ranks add up, scale 1");

    // By SVD to rank 4: the two halves are one rank-4 adapter, so nothing is lost.
    let svd = dir.join("svd.safetensors");
    graft(&["merge", "--adapter", &k, "--adapter", &p, "--rank", "4", "--to", "peft", "--out", s(&svd), CFG, s(&tiny), "--dtype", "f32"])
        .unwrap();
    let f = read(&svd);
    assert!(f.modules.iter().all(|m| m.rank().unwrap() <= 4));
    assert_same_deltas(&want, &deltas(&f, 1.0), 1e-4, "svd to rank 4");

    // Separate weights: text encoders at 0 leave them out.
    let unet_only = dir.join("unet_only.safetensors");
    let spec = format!("{}:0:1", lora("kohya_sgm.safetensors").display());
    graft(&["merge", "--adapter", &spec, "--out", s(&unet_only), CFG, s(&tiny)]).unwrap();
    assert_eq!(read(&unet_only).modules.len(), 192);

    // LyCORIS kinds do not concatenate: a clear error, or one full difference with --to lycoris.
    let ly = format!("{}", lora("lycoris_mixed.safetensors").display());
    let e = graft_err(&["merge", "--adapter", &ly, "--adapter", &k, "--out", s(&dir.join("x.safetensors")), CFG, s(&tiny)]);
    assert!(e.contains("DoRA") || e.contains("concatenate"), "{e}");
}

#[test]
fn merge_full_and_lora_into_lycoris_sums_the_differences() {
    let dir = scratch("tools_merge_lycoris");
    let tiny = tiny_model();
    // The LyCORIS entries without DoRA, written alone.
    let mixed = read(&lora("lycoris_mixed.safetensors"));
    let plain: Vec<_> = mixed.modules.iter().filter(|m| m.dora_scale.is_none()).cloned().collect();
    let config = graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny).unwrap();
    let layout = graft_sdxl::sgm::SgmLayout::from_configs(&config.unet, &config.vae, &config.text_encoder_2).unwrap();
    let src = dir.join("plain.safetensors");
    graft_formats::write_lycoris(&src, &plain, &layout, &graft_formats::KohyaMetadata::new("x"), StoreDtype::F32).unwrap();
    let out = dir.join("sum.safetensors");
    let k = lora("kohya_sgm.safetensors");
    let e = graft_err(&["merge", "--adapter", s(&src), "--adapter", s(&k), "--out", s(&out), CFG, s(&tiny)]);
    assert!(e.contains("concatenate") && e.contains("--to lycoris"), "{e}");
    graft(&[
        "merge",
        "--adapter",
        s(&src),
        "--adapter",
        &format!("{}:0.5", k.display()),
        "--to",
        "lycoris",
        "--out",
        s(&out),
        CFG,
        s(&tiny),
        "--dtype",
        "f32",
    ])
    .unwrap();
    let got = read(&out);
    let lora_d = deltas(&read(&k), 0.5);
    for m in &got.modules {
        let mut want = lora_d[&m.layer].clone();
        if let Some(p) = plain.iter().find(|p| p.layer == m.layer) {
            want = (want + p.delta_weight(1.0).unwrap()).unwrap();
            assert_eq!(m.kind(), ModuleKind::Full, "{}", m.layer);
        } else {
            assert_eq!(m.kind(), ModuleKind::Lora, "{}", m.layer);
        }
        assert!(max_diff(&m.delta_weight(1.0).unwrap(), &want) <= 1e-5 * max_abs(&want), "{}", m.layer);
    }
    // The full diff's bias difference is kept.
    let b = got.module("unet.mid_block.attentions.0.transformer_blocks.1.ff.net.2").unwrap();
    assert!(b.delta_bias(1.0).unwrap().is_some());
}

#[test]
fn merge_into_checkpoints_matches_diffusers() {
    let dir = scratch("tools_merge_checkpoint");
    let tiny = tiny_model();
    let half = format!("{}:0.5", lora("kohya_sgm.safetensors").display());
    // Diffusers folder -> single file (f32), loaded with the tiny configs.
    let single = dir.join("merged.safetensors");
    graft(&["merge", "--model", s(&tiny), "--adapter", &half, "--out", s(&single), "--dtype", "f32"]).unwrap();
    let m = SdxlModel::load(&single, Some(&tiny), &Device::Cpu).unwrap();
    check_model(&m, "w05", 1e-4, "folder -> single file");
    drop(m);
    // Diffusers folder -> diffusers folder (stored dtypes kept: f16, so a looser tolerance).
    let folder = dir.join("merged_folder");
    graft(&["merge", "--model", s(&tiny), "--adapter", &half, "--out", s(&folder)]).unwrap();
    assert!(folder.join("model_index.json").is_file() && folder.join("tokenizer_2/vocab.json").is_file());
    let h = graft_host::generate::lora_dir::read_header(&folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(h.tensors.values().all(|t| t.dtype == "F16"));
    let m = SdxlModel::load(&folder, None, &Device::Cpu).unwrap();
    check_model(&m, "w05", 2e-3, "folder -> folder (f16)");
    drop(m);
    // Single file -> single file and -> diffusers folder: TE2's q, k, v live in one fused in_proj.
    let sgm = fixtures().join("tiny-sdxl-sgm.safetensors");
    let full = lora("peft_diffusers.safetensors");
    let s2 = dir.join("from_single.safetensors");
    graft(&["merge", "--model", s(&sgm), CFG, s(&tiny), "--adapter", s(&full), "--out", s(&s2), "--dtype", "f32"]).unwrap();
    let m = SdxlModel::load(&s2, Some(&tiny), &Device::Cpu).unwrap();
    check_model(&m, "w1", 1e-4, "single file -> single file");
    drop(m);
    let f2 = dir.join("from_single_folder");
    graft(&["merge", "--model", s(&sgm), CFG, s(&tiny), "--adapter", s(&full), "--out", s(&f2), "--dtype", "f32"]).unwrap();
    let m = SdxlModel::load(&f2, None, &Device::Cpu).unwrap();
    check_model(&m, "w1", 1e-4, "single file -> folder");
    drop(m);

    // Weight 0: every tensor of the single file is copied byte for byte (extras included).
    let zero = dir.join("zero.safetensors");
    graft(&["merge", "--model", s(&sgm), CFG, s(&tiny), "--adapter", &format!("{}:0", full.display()), "--out", s(&zero)]).unwrap();
    let a = std::fs::read(&sgm).unwrap();
    let b = std::fs::read(&zero).unwrap();
    let (sa, sb) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    let mut names: Vec<String> = sa.names().into_iter().map(String::from).collect();
    names.sort();
    let mut names_b: Vec<String> = sb.names().into_iter().map(String::from).collect();
    names_b.sort();
    assert_eq!(names, names_b);
    for n in &names {
        let (x, y) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
        assert!(x.dtype() == y.dtype() && x.shape() == y.shape() && x.data() == y.data(), "{n}");
    }

    let e = graft_err(&["merge", "--model", s(&tiny), "--adapter", &half, "--out", s(&tiny)]);
    assert!(e.contains("--model itself"), "{e}");
}

/// kohya -> graft-native (`lora` strategy) -> applied through the plugin gives the kohya file's
/// output; graft-native -> kohya through the plugin's export gives its deltas back.
#[test]
fn graft_native_lora_files_round_trip_through_the_plugin() {
    let plugins = graft_tests::build_plugins(&["lora"]);
    let dir = scratch("tools_native");
    let tiny = tiny_model();
    let native = dir.join("style.graft.safetensors");
    let pl = ["--plugins", s(&plugins), "--no-default-plugins"];
    let bf16 = lora("kohya_diffusers_bf16.safetensors");
    let mut args = vec!["convert", s(&bf16), "--to", "native", "--out", s(&native), CFG, s(&tiny), "--dtype", "f32"];
    args.extend(pl);
    graft(&args).unwrap();
    let (file, report) = read_adapter(&native, &keys()).unwrap();
    assert_eq!(file.format, AdapterFormat::Native);
    assert_eq!(report.native.as_ref().unwrap().strategy, "lora");

    let model = SdxlModel::load(&tiny, None, &Device::Cpu).unwrap();
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&lora("kohya_diffusers_bf16.safetensors"), "k", 1.0, 1.0).unwrap();
    let want = unet_out(&model, files.hooks(PipelineHooks::none()).pipeline());
    let mut m = PluginManager::new(vec![SearchDir { path: plugins.clone(), origin: DirOrigin::Flag }]);
    m.scan();
    let mut set = AdapterSet::new(&model, 0);
    let r = add_native(&mut set, m.require("lora").unwrap(), "style", &native, &file, 1.0, 1.0).unwrap();
    assert_eq!((r.set, r.missing.len(), r.unmatched.len()), (456, 0, 0));
    let got = {
        let h = set.hooks();
        unet_out(&model, h.pipeline())
    };
    assert!(max_diff(&got, &want) <= 1e-4 * max_abs(&want).max(1.0), "{}", max_diff(&got, &want));

    let back = dir.join("back.safetensors");
    let mut args = vec!["convert", s(&native), "--to", "kohya", "--out", s(&back), CFG, s(&tiny), "--dtype", "f32"];
    args.extend(pl);
    graft(&args).unwrap();
    assert_same_deltas(&deltas(&read(&lora("kohya_diffusers_bf16.safetensors")), 1.0), &deltas(&read(&back), 1.0), 1e-5, "native -> kohya");
    let e = graft_err(&["convert", s(&native), "--to", "kohya", "--out", s(&back), CFG, s(&tiny), "--no-default-plugins"]);
    assert!(e.contains("strategy plugin `lora`"), "{e}");
}

#[test]
fn locon_and_tucker_files_inspect_convert_and_fail_clearly_on_bad_shapes() {
    let dir = scratch("tools_locon");
    let tiny = tiny_model();
    let arch = ArchArgs { model_config: Some(tiny.clone()) };
    let r = inspect(&InspectArgs { file: lora("lycoris_locon.safetensors"), layers: true, json: true, full: false, arch }).unwrap();
    assert_eq!(r["format"], "lycoris");
    assert_eq!(r["layers"], 6);
    // The 1x1 shortcut's factors are a plain LoRA of its [out, in] matrix.
    assert_eq!(r["kinds"], serde_json::json!({"locon": 3, "locon-tucker": 2, "lora": 1}));
    assert_eq!(r["unmatched_keys"], serde_json::json!([]));
    let list = r["layer_list"].as_array().unwrap();
    let l = list.iter().find(|l| l["layer"] == "unet.down_blocks.1.resnets.0.conv1").unwrap();
    assert_eq!((l["kind"].as_str(), l["weight_shape"].clone()), (Some("locon"), serde_json::json!([48, 32, 3, 3])));

    // LyCORIS -> LyCORIS keeps every kernel difference; kohya takes the LoCon entries but not
    // Tucker; PEFT takes none.
    let src = read(&lora("lycoris_locon.safetensors"));
    let want = deltas(&src, 1.0);
    let out = dir.join("l.safetensors");
    graft(&["convert", s(&lora("lycoris_locon.safetensors")), "--to", "lycoris", "--out", s(&out), CFG, s(&tiny)]).unwrap();
    let again = read(&out);
    assert_same_deltas(&want, &deltas(&again, 1.0), 1e-6, "locon -> lycoris");
    let raw = graft_formats::read::read_file(&out).unwrap();
    let config = graft_sdxl::SdxlConfig::from_diffusers_folder(&tiny).unwrap();
    let layout = graft_host::tools::key_map(&config).unwrap().1;
    let key = |layer: &str, t: &str| format!("{}.{t}", graft_formats::to_kohya(layer, &layout).unwrap());
    // SGM names, as kohya writes SDXL files: the shortcut is `input_blocks_4_0_skip_connection`.
    let sc = key("unet.down_blocks.1.resnets.0.conv_shortcut", "lora_down.weight");
    assert_eq!(sc, "lora_unet_input_blocks_4_0_skip_connection.lora_down.weight");
    assert_eq!(raw.tensors[&sc].dims(), [3, 32, 1, 1], "1x1 factors as kernels");
    assert_eq!(raw.tensors[&key("unet.mid_block.resnets.0.conv2", "lora_mid.weight")].dims(), [3, 3, 3, 3]);
    assert_eq!(raw.tensors[&key("unet.mid_block.resnets.0.conv2", "lora_up.weight")].dims(), [56, 3, 1, 1]);
    assert_eq!(raw.tensors[&key("unet.down_blocks.1.resnets.0.conv1", "lora_down.weight")].dims(), [4, 32, 3, 3]);
    let e =
        graft_err(&["convert", s(&lora("lycoris_locon.safetensors")), "--to", "kohya", "--out", s(&dir.join("k.safetensors")), CFG, s(&tiny)]);
    assert!(e.contains("mid_block.resnets.0.conv2") && e.contains("Tucker"), "{e}");
    let e =
        graft_err(&["convert", s(&lora("lycoris_locon.safetensors")), "--to", "peft", "--out", s(&dir.join("p.safetensors")), CFG, s(&tiny)]);
    assert!(e.contains("conv"), "{e}");

    // Malformed: a mid of the wrong rank, a 3x3 kernel on a 1x1 conv, a kernel on a linear.
    let bad = |name: &str, put: Vec<(&str, Tensor)>| -> String {
        let mut tensors: std::collections::HashMap<String, Tensor> =
            candle_core::safetensors::load(lora("lycoris_locon.safetensors"), &Device::Cpu).unwrap();
        for (key, t) in put {
            tensors.insert(key.to_string(), t);
        }
        let path = dir.join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let e = read_adapter(&path, &keys()).expect_err("an error").to_string();
        assert!(e.contains(name), "{e}");
        e
    };
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let e = bad("mid.safetensors", vec![("lora_unet_mid_block_resnets_0_conv2.lora_mid.weight", z(&[2, 3, 3, 3]))]);
    assert!(e.contains("lora_mid") && e.contains("[2, 3, 3, 3]"), "{e}");
    let e = bad("kernel.safetensors", vec![("lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight", z(&[3, 32, 3, 3]))]);
    assert!(e.contains("conv_shortcut") && e.contains("kernel is 3x3") && e.contains("1x1"), "{e}");
    let e = bad(
        "linear.safetensors",
        vec![
            ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", z(&[4, 48, 3, 3])),
            ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight", z(&[48, 4, 1, 1])),
        ],
    );
    assert!(e.contains("proj_in") && e.contains("linear"), "{e}");
}
