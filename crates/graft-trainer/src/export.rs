//! Writing a trained strategy's adapter files.
//!
//! What a strategy exports decides the files (each layer's `ExportedLayer.family`):
//!
//! | family | tensors | file(s) |
//! |---|---|---|
//! | `lora` | `down` [r, in], `up` [out, r] (+ alpha) | `{name}.safetensors` (kohya: SGM names, `.alpha`, `ss_*` / `modelspec.*` metadata, `sshs_*` hashes) and `{name}.peft.safetensors` (PEFT / diffusers, alpha in `lora_adapter_metadata`) |
//! | `lora` on a conv | `down` [r, in, kh, kw], `up` [out, r, 1, 1] (+ alpha); Tucker: `down` [r, in, 1, 1], `mid` [r, r, kh, kw] | LoCon keys in `{name}.safetensors` (kohya, `conv_dim` / `conv_alpha` in `ss_network_args`; with `mid` a LyCORIS file, `use_tucker`); no PEFT file |
//! | `diff` | `diff` [out, in] (+ `diff_b` [out]) | `{name}.safetensors`, a LyCORIS file (full `diff` entries, beside any `lora` ones) |
//! | `native` | any | `{name}.graft.safetensors`, metadata `graft.strategy` / `graft.version` / `graft.config` |
//!
//! A strategy that mixes `lora` and `diff` layers gets one LyCORIS `{name}.safetensors` holding
//! both (A1111 and ComfyUI apply it module by module) and no PEFT file: PEFT holds plain LoRA
//! only, and a PEFT file with part of the adapter would silently change the result.
//! Base weights the strategy unfroze (`AdapterSet::base_diffs`) go, as trained minus loaded
//! weights, to a LyCORIS full-diff file `{name}.diff.safetensors`, which A1111 and ComfyUI load
//! with the adapter. Every file is written to a temporary file and renamed (graft-formats).
//! Tensors are stored as f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use graft_abi as abi;
use graft_formats::adapter::AdapterWeights;
use graft_formats::{KohyaMetadata, ModuleWeights, NativeInfo, StoreDtype};
use graft_sdxl::sgm::SgmLayout;

use crate::error::{At, Error, Result};

use graft_runtime::adapters::dispatcher::{AdapterSet, StrategyId};
use graft_runtime::plugins::strategy::ExportedLayer;

/// What the files say about the training.
#[derive(Debug, Clone)]
pub struct ExportMeta {
    /// `ss_steps`.
    pub steps: u64,
    /// `ss_unet_lr`.
    pub unet_lr: Option<f64>,
    /// `ss_text_encoder_lr`.
    pub text_encoder_lr: Option<f64>,
    /// The base model (a path or a name); its file name becomes `ss_sd_model_name`.
    pub base_model: String,
    /// The SGM layout of the model, for kohya's UNet module names
    /// (`SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2)`).
    pub sgm_layout: SgmLayout,
}

/// Which plugin build made an export, and with what config (for the file metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySource {
    /// The plugin id (what a graft-native file names to be read back).
    pub id: String,
    pub version: String,
    /// The strategy's config (JSON).
    pub config: String,
}

/// Writes the adapter files of strategy `s` of `set` into `out_dir` (see the module docs) and
/// returns their paths. `name` is the file stem and the kohya `ss_output_name`.
pub fn export_strategy(set: &AdapterSet, s: StrategyId, out_dir: &Path, name: &str, meta: &ExportMeta) -> Result<Vec<PathBuf>> {
    let st = set
        .strategies()
        .get(s.index())
        .ok_or_else(|| Error::Internal(format!("export: there is no strategy number {} ({} in use)", s.index(), set.strategies().len())))?;
    let manifest = st.instance.manifest();
    let source = StrategySource { id: manifest.id.clone(), version: manifest.version.clone(), config: st.instance.config().to_string() };
    let exported = set.export(s).at(|| format!("export of strategy `{}`", st.name()))?;
    let base = set.base_diffs(s)?;
    write_exports(&source, &exported, &base, set.layers(), out_dir, name, meta)
        .at(|| format!("export of strategy `{}` to {}", st.name(), out_dir.display()))
}

/// The file-writing half of [`export_strategy`], on what a strategy exported: `exported` layer by
/// layer, `base_diffs` as `(layer, weight difference, bias difference)`, checked against the
/// model's hook points `layers`.
pub fn write_exports(
    source: &StrategySource,
    exported: &[(String, ExportedLayer)],
    base_diffs: &[(String, Tensor, Option<Tensor>)],
    layers: &[abi::LayerInfo],
    out_dir: &Path,
    name: &str,
    meta: &ExportMeta,
) -> Result<Vec<PathBuf>> {
    crate::names::check_name("output name", name)?;
    if exported.is_empty() && base_diffs.is_empty() {
        return Err(Error::Export(format!(
            "strategy `{}` exported nothing: no layer gave an export and no base weight was unfrozen",
            source.id
        )));
    }
    let info = |layer: &str| -> Result<&abi::LayerInfo> {
        layers.iter().find(|l| l.name() == layer).ok_or_else(|| Error::Export(format!("layer `{layer}` is not a hook point of this model")))
    };
    let in_out = |layer: &str| -> Result<(usize, usize)> {
        let l = info(layer)?;
        Ok((l.in_features as usize, l.out_features as usize))
    };

    let mut linear = Vec::new();
    let mut native = Vec::new();
    // (rank, alpha) of the conv (LoCon) entries, and whether one is Tucker.
    let mut conv_dims: Option<(usize, f32)> = None;
    let mut tucker = false;
    for (layer, e) in exported {
        let module = module_of(layer, e).at(|| format!("layer `{layer}`"))?;
        if matches!(module.weights, AdapterWeights::Native { .. }) {
            native.push(module);
        } else {
            module.validate(Some(in_out(layer)?))?;
            let kernel = info(layer)?.conv().map(|g| (g.kernel[0] as usize, g.kernel[1] as usize));
            module.validate_kernel(kernel).at(|| format!("layer `{layer}`"))?;
            if kernel.is_some() {
                let r = module.rank().unwrap_or(0);
                conv_dims.get_or_insert((r, module.alpha().unwrap_or(r as f32)));
                tucker |= matches!(module.weights, AdapterWeights::Lora { mid: Some(_), .. });
            }
            linear.push(module);
        }
    }
    let mut base = Vec::new();
    for (layer, diff, diff_b) in base_diffs {
        let m = ModuleWeights::full(layer.clone(), diff.clone(), diff_b.clone());
        m.validate(Some(in_out(layer)?))?;
        base.push(m);
    }

    let mut kohya = kohya_metadata(source, name, meta);
    if let Some((r, a)) = conv_dims {
        // kohya's LoCon arguments (strings, as kohya writes them).
        kohya.network_args.insert("conv_dim".into(), r.to_string().into());
        kohya.network_args.insert("conv_alpha".into(), graft_formats::metadata::py_float(a as f64).into());
        if tucker {
            kohya.network_args.insert("use_tucker".into(), "True".into());
        }
    }
    let mut written = Vec::new();
    if !linear.is_empty() {
        let path = out_dir.join(format!("{name}.safetensors"));
        let plain = linear.iter().all(|m| matches!(m.weights, AdapterWeights::Lora { mid: None, .. }) && m.dora_scale.is_none());
        if plain {
            graft_formats::write_kohya(&path, &linear, &meta.sgm_layout, &kohya, StoreDtype::F32)?;
            written.push(path);
            if conv_dims.is_none() {
                let peft = out_dir.join(format!("{name}.peft.safetensors"));
                graft_formats::write_peft(&peft, &linear, StoreDtype::F32)?;
                written.push(peft);
            } else {
                tracing::info!(
                    "{}: LoCon (conv) layers: a kohya file only, no PEFT file",
                    out_dir.join(format!("{name}.safetensors")).display()
                );
            }
        } else {
            tracing::info!(
                "{}: {}: a LyCORIS file (kohya key names; A1111, ComfyUI and graft read it), no PEFT file",
                path.display(),
                describe_modules(&linear)
            );
            graft_formats::write_lycoris(&path, &linear, &meta.sgm_layout, &kohya, StoreDtype::F32)?;
            written.push(path);
        }
    }
    if !native.is_empty() {
        let path = out_dir.join(format!("{name}.graft.safetensors"));
        let config = serde_json::from_str(&source.config)
            .map_err(|e| Error::Export(format!("the strategy config is not valid JSON: {}: {e}", source.config)))?;
        let info = NativeInfo { strategy: source.id.clone(), version: source.version.clone(), config };
        graft_formats::write_native(&path, &info, &native, StoreDtype::F32)?;
        written.push(path);
    }
    if !base.is_empty() {
        let path = out_dir.join(format!("{name}.diff.safetensors"));
        let mut m = kohya.clone();
        m.output_name = format!("{name}.diff");
        m.title = Some(format!("{name} (trained base weights)"));
        graft_formats::write_diff(&path, &base, &meta.sgm_layout, &m, StoreDtype::F32)?;
        written.push(path);
    }
    Ok(written)
}

/// What a list of entries holds, e.g. "64 LoRA layers with DoRA magnitudes, 2 full weight
/// differences".
fn describe_modules(modules: &[ModuleWeights]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in modules {
        let kind = match (&m.weights, m.dora_scale.is_some()) {
            (AdapterWeights::Lora { .. }, true) => "LoRA layers with DoRA magnitudes".to_string(),
            (AdapterWeights::Lora { .. }, false) => "plain LoRA layers".to_string(),
            (AdapterWeights::Full { .. }, _) => "full weight differences".to_string(),
            (_, dora) => format!("{} layers{}", m.kind(), if dora { " with DoRA magnitudes" } else { "" }),
        };
        *counts.entry(kind).or_default() += 1;
    }
    counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// One exported layer as an adapter-file entry. Every tensor must be used: an unknown one is an
/// error, never dropped.
fn module_of(layer: &str, e: &ExportedLayer) -> Result<ModuleWeights> {
    let mut tensors: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (n, t) in &e.tensors {
        if tensors.insert(n.as_str(), t).is_some() {
            return Err(Error::Export(format!("the export has two tensors named `{n}`")));
        }
    }
    let mut take = |n: &str| tensors.remove(n).cloned();
    let module = match e.family.as_str() {
        "lora" => {
            let (Some(down), Some(up)) = (take("down"), take("up")) else {
                return Err(Error::Export("the `lora` family needs tensors `down` and `up`".to_string()));
            };
            if let Some(a) = e.alpha {
                if !a.is_finite() || a < 0.0 {
                    return Err(Error::Export(format!("alpha {a} must be finite and >= 0")));
                }
            }
            let mid = take("mid");
            // Kernels as the readers hold them: 1x1 factors as matrices ([out, r, 1, 1] up,
            // a Tucker [r, in, 1, 1] down); a k x k LoCon down stays [r, in, kh, kw].
            let (down, up) = (graft_formats::read::as_matrix(&down)?, graft_formats::read::as_matrix(&up)?);
            if let Some(m) = &mid {
                if m.rank() != 4 {
                    return Err(Error::Export(format!("`mid` must be a [r, r, kh, kw] kernel, got shape {:?}", m.dims())));
                }
            }
            let mut m = ModuleWeights::lora(layer, down, up, e.alpha.map(|a| a as f32));
            if let AdapterWeights::Lora { mid: slot, .. } = &mut m.weights {
                *slot = mid;
            }
            m.dora_scale = take("dora_scale");
            m
        }
        "diff" => {
            let Some(diff) = take("diff") else {
                return Err(Error::Export("the `diff` family needs a tensor `diff`".to_string()));
            };
            ModuleWeights::full(layer, diff, take("diff_b"))
        }
        "native" => {
            let all: BTreeMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
            tensors.clear();
            if all.is_empty() {
                return Err(Error::Export("the `native` export has no tensors".to_string()));
            }
            ModuleWeights { layer: layer.to_string(), weights: AdapterWeights::Native { tensors: all }, dora_scale: None }
        }
        other => {
            return Err(Error::Export(format!("export family `{other}` cannot be written by this host (it writes `lora`, `diff` and `native`)")))
        }
    };
    if !tensors.is_empty() {
        let names: Vec<&str> = tensors.keys().copied().collect();
        return Err(Error::Export(format!("the `{}` export has tensors this family does not have: {}", e.family, names.join(", "))));
    }
    Ok(module)
}

/// kohya's metadata for these files.
fn kohya_metadata(source: &StrategySource, name: &str, meta: &ExportMeta) -> KohyaMetadata {
    let mut k = KohyaMetadata::new(name);
    k.steps = Some(meta.steps);
    k.unet_lr = meta.unet_lr;
    k.text_encoder_lr = meta.text_encoder_lr;
    let model = Path::new(&meta.base_model).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| meta.base_model.clone());
    if !model.is_empty() {
        k.extra.insert("ss_sd_model_name".into(), model);
    }
    k.extra.insert(
        "ss_training_comment".into(),
        format!("trained with graft {}, strategy {} {}, config {}", env!("CARGO_PKG_VERSION"), source.id, source.version, source.config),
    );
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use graft_formats::{read_adapter, AdapterFormat, KeyMap};
    use graft_sdxl::SdxlConfig;

    struct Tiny {
        layers: Vec<graft_sdxl::LayerInfo>,
        abi: Vec<abi::LayerInfo>,
        meta: ExportMeta,
    }

    fn tiny() -> Tiny {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
        let cfg = SdxlConfig::from_diffusers_folder(&dir).unwrap();
        let layers = graft_sdxl::model::layers_of(&cfg).unwrap();
        let abi = graft_runtime::plugins::strategy::layers_to_abi(&layers);
        let sgm_layout = SgmLayout::from_configs(&cfg.unet, &cfg.vae, &cfg.text_encoder_2).unwrap();
        let meta =
            ExportMeta { steps: 120, unet_lr: Some(1e-4), text_encoder_lr: Some(5e-5), base_model: dir.display().to_string(), sgm_layout };
        Tiny { layers, abi, meta }
    }

    fn source() -> StrategySource {
        StrategySource { id: "test-strategy".into(), version: "0.3.1".into(), config: r#"{"rank": 2, "b": [1, 2]}"#.into() }
    }

    /// The first linears of the UNet and of each text encoder whose name ends with `suffix`.
    fn pick<'a>(t: &'a Tiny, suffix: &str) -> Vec<&'a graft_sdxl::LayerInfo> {
        ["unet.", "text_encoder.", "text_encoder_2."]
            .iter()
            .filter_map(|c| t.layers.iter().find(|l| l.name.starts_with(c) && l.name.ends_with(suffix)))
            .collect()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        graft_sdxl::rng::GraftRng::new(seed).randn(shape, &Device::Cpu).unwrap()
    }

    fn lora(l: &graft_sdxl::LayerInfo, r: usize, alpha: Option<f64>, seed: u64) -> (String, ExportedLayer) {
        let down = randn(&[r, l.in_features], seed);
        let up = randn(&[l.out_features, r], seed + 1);
        (l.name.clone(), ExportedLayer { family: "lora".into(), tensors: vec![("down".into(), down), ("up".into(), up)], alpha })
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn expected_delta(e: &ExportedLayer) -> Tensor {
        let get = |n: &str| e.tensors.iter().find(|(k, _)| k == n).unwrap().1.clone();
        let (down, up) = (get("down"), get("up"));
        let r = down.dims()[0] as f64;
        (up.matmul(&down).unwrap() * e.alpha.map_or(1.0, |a| a / r)).unwrap()
    }

    #[test]
    fn lora_layers_give_kohya_and_peft_files_with_the_same_deltas() {
        let t = tiny();
        let dir = tempfile::tempdir().unwrap();
        let q = pick(&t, "to_q");
        let k = pick(&t, "attn1.to_out.0");
        let te = pick(&t, "self_attn.k_proj");
        let mut exported = vec![lora(q[0], 4, Some(8.0), 1), lora(k[0], 2, Some(1.0), 3)];
        exported.push(lora(te[0], 3, None, 5));
        exported.push(lora(te[1], 3, Some(6.0), 7));
        let files = write_exports(&source(), &exported, &[], &t.abi, dir.path(), "my_style", &t.meta).unwrap();
        assert_eq!(files, vec![dir.path().join("my_style.safetensors"), dir.path().join("my_style.peft.safetensors")]);

        let keys = KeyMap::from_layers(&t.layers, &t.meta.sgm_layout);
        for (path, format) in [(&files[0], AdapterFormat::Kohya), (&files[1], AdapterFormat::Peft)] {
            let (file, report) = read_adapter(path, &keys).unwrap();
            assert_eq!(file.format, format);
            assert!(report.unmatched_keys.is_empty(), "{}", report.summary());
            assert_eq!(file.modules.len(), 4);
            for (layer, e) in &exported {
                let m = file.module(layer).unwrap_or_else(|| panic!("{layer} in {}", path.display()));
                let d = max_diff(&m.delta_weight(1.0).unwrap(), &expected_delta(e));
                assert!(d < 1e-5, "{layer} ({format}): {d}");
            }
        }
        // kohya: SGM module names and metadata.
        let raw = graft_formats::read::read_file(&files[0]).unwrap();
        assert!(raw.keys().any(|k| k.starts_with("lora_unet_input_blocks_")
            || k.starts_with("lora_unet_middle_block_")
            || k.starts_with("lora_unet_output_blocks_")));
        assert!(raw.keys().any(|k| k.starts_with("lora_te1_text_model_encoder_layers_0_self_attn_k_proj")));
        assert!(raw.keys().any(|k| k.starts_with("lora_te2_")));
        let md = &raw.metadata;
        assert_eq!(md["ss_output_name"], "my_style");
        assert_eq!(md["ss_network_dim"], "Dynamic", "mixed ranks");
        assert_eq!(md["ss_network_alpha"], "Dynamic");
        assert_eq!(md["ss_steps"], "120");
        assert_eq!(md["ss_unet_lr"], "0.0001");
        assert_eq!(md["ss_text_encoder_lr"], "5e-05");
        assert_eq!(md["ss_base_model_version"], "sdxl_base_v1-0");
        assert_eq!(md["ss_sd_model_name"], "tiny-sdxl");
        assert_eq!(md["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
        assert_eq!(md["modelspec.title"], "my_style");
        assert!(md["ss_training_comment"].contains("test-strategy 0.3.1"));
        let hash = graft_formats::metadata::addnet_hash(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!(md["sshs_model_hash"], hash);
        // One rank and alpha everywhere: plain numbers.
        let one = vec![lora(q[0], 4, Some(8.0), 1), lora(k[0], 4, Some(8.0), 3)];
        let files = write_exports(&source(), &one, &[], &t.abi, dir.path(), "plain", &t.meta).unwrap();
        let raw = graft_formats::read::read_file(&files[0]).unwrap();
        assert_eq!((raw.metadata["ss_network_dim"].as_str(), raw.metadata["ss_network_alpha"].as_str()), ("4", "8.0"));
    }

    #[test]
    fn native_and_base_diffs_and_mixed_families() {
        let t = tiny();
        let dir = tempfile::tempdir().unwrap();
        let attn = t.layers.iter().find(|l| l.name.ends_with("attn2") && l.name.starts_with("unet.")).unwrap();
        let v = pick(&t, "attn2.to_v")[0];
        let out = pick(&t, "attn2.to_out.0")[0];
        let native = ExportedLayer {
            family: "native".into(),
            tensors: vec![("A".into(), randn(&[2, attn.in_features], 1)), ("g".into(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap())],
            alpha: None,
        };
        let diff_v = randn(&[v.out_features, v.in_features], 2);
        let diff_out = randn(&[out.out_features, out.in_features], 3);
        let bias = randn(&[out.out_features], 4);
        let base = vec![(v.name.clone(), diff_v.clone(), None), (out.name.clone(), diff_out.clone(), Some(bias.clone()))];
        let files = write_exports(&source(), &[(attn.name.clone(), native)], &base, &t.abi, dir.path(), "gate", &t.meta).unwrap();
        assert_eq!(files, vec![dir.path().join("gate.graft.safetensors"), dir.path().join("gate.diff.safetensors")]);

        let keys = KeyMap::from_layers(&t.layers, &t.meta.sgm_layout);
        let (file, report) = read_adapter(&files[0], &keys).unwrap();
        assert_eq!(file.format, AdapterFormat::Native);
        let info = report.native.unwrap();
        assert_eq!((info.strategy.as_str(), info.version.as_str()), ("test-strategy", "0.3.1"));
        assert_eq!(info.config, serde_json::json!({"rank": 2, "b": [1, 2]}));
        let AdapterWeights::Native { tensors } = &file.module(&attn.name).unwrap().weights else { panic!("native") };
        assert_eq!(tensors.keys().collect::<Vec<_>>(), vec!["A", "g"]);

        let (file, report) = read_adapter(&files[1], &keys).unwrap();
        assert_eq!(file.format, AdapterFormat::Lycoris);
        assert!(report.unmatched_keys.is_empty());
        assert_eq!(max_diff(&file.module(&v.name).unwrap().delta_weight(1.0).unwrap(), &diff_v), 0.0);
        let m = file.module(&out.name).unwrap();
        assert_eq!(max_diff(&m.delta_weight(1.0).unwrap(), &diff_out), 0.0);
        assert_eq!(max_diff(&m.delta_bias(1.0).unwrap().unwrap(), &bias), 0.0);
        let raw = graft_formats::read::read_file(&files[1]).unwrap();
        assert_eq!(raw.metadata["ss_output_name"], "gate.diff");
        assert_eq!(raw.metadata["ss_network_module"], "lycoris.kohya");

        // lora + diff layers: one LyCORIS file, no PEFT file.
        let q = pick(&t, "to_q")[0];
        let mixed = vec![
            lora(q, 2, Some(4.0), 9),
            (v.name.clone(), ExportedLayer { family: "diff".into(), tensors: vec![("diff".into(), diff_v.clone())], alpha: None }),
        ];
        let files = write_exports(&source(), &mixed, &[], &t.abi, dir.path(), "mixed", &t.meta).unwrap();
        assert_eq!(files, vec![dir.path().join("mixed.safetensors")]);
        let (file, _) = read_adapter(&files[0], &keys).unwrap();
        assert_eq!(file.format, AdapterFormat::Lycoris);
        assert!(max_diff(&file.module(&q.name).unwrap().delta_weight(1.0).unwrap(), &expected_delta(&mixed[0].1)) < 1e-5);
        assert_eq!(max_diff(&file.module(&v.name).unwrap().delta_weight(1.0).unwrap(), &diff_v), 0.0);
    }

    #[test]
    fn bad_exports_are_clear_errors() {
        let t = tiny();
        let dir = tempfile::tempdir().unwrap();
        let q = pick(&t, "to_q")[0];
        let err = |exported: Vec<(String, ExportedLayer)>, name: &str| {
            format!("{:#}", write_exports(&source(), &exported, &[], &t.abi, dir.path(), name, &t.meta).unwrap_err())
        };
        let e = err(vec![], "x");
        assert!(e.contains("exported nothing"), "{e}");
        let e = err(vec![lora(q, 2, None, 1)], "a/b");
        assert!(e.contains("without a folder"), "{e}");
        let mut odd = lora(q, 2, None, 1);
        odd.1.family = "loha".into();
        let e = err(vec![odd], "x");
        assert!(e.contains(&q.name) && e.contains("`loha`"), "{e}");
        let mut extra = lora(q, 2, None, 1);
        extra.1.tensors.push(("gate".into(), randn(&[1], 2)));
        let e = err(vec![extra], "x");
        assert!(e.contains("gate") && e.contains("does not have"), "{e}");
        // A LoRA made for another shape.
        let (name, mut wrong) = lora(q, 2, None, 1);
        wrong.tensors[0].1 = randn(&[2, q.in_features + 1], 3);
        let e = err(vec![(name, wrong)], "x");
        assert!(e.contains(&q.name), "{e}");
        let e = err(vec![("unet.nowhere".into(), lora(q, 2, None, 1).1)], "x");
        assert!(e.contains("not a hook point"), "{e}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written on errors");
    }
}
