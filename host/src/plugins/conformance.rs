//! `graft plugins check LIB --conformance`: what every strategy plugin must do, run against the
//! host's real machinery.
//!
//! 1. `plan` over the real SDXL layer list (the built-in config, no weights) and over the test
//!    model's; every include pattern of a `targets` config key must match a layer, and every
//!    parameter's optimizer group must be declared;
//! 2. zero-init identity: attached with its initial parameters, the model computes what it
//!    computed without it;
//! 3. after its parameters move (a seeded perturbation), the output changes;
//! 4. fuse / unfuse gives the same output as the hooks, and unfuse puts every weight back;
//! 5. eject restores the model's output bit for bit;
//! 6. export -> load: the files it writes, loaded the way `graft generate` loads them, give the
//!    output the strategy gave;
//! 7. config schema (when the plugin has one): consistent (defaults of their type and within
//!    range), its defaults accepted by the plugin's parser, the same keys as the parser's (read
//!    from serde's "unknown field" error), and the configuration under test fits it.
//!
//! The same checks run from a plugin's own `cargo test` through `graft_sdk::testing`.

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use graft_abi as abi;
use graft_sdxl::{GenerateParams, SdxlConfig, SdxlModel};

use graft_runtime::adapters::dispatcher::{AdapterSet, StrategyId};
use graft_runtime::adapters::files::{add_native, FileAdapters};
use graft_runtime::plugins::loader::LoadedPlugin;
use graft_runtime::plugins::strategy::{layers_to_abi, StrategyInstance};
use graft_trainer::export::{export_strategy, ExportMeta};

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub check: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Relative deviations under this count as equal where float rounding is allowed.
const TOLERANCE: f64 = 1e-4;

fn outcome(check: &'static str, passed: bool, detail: impl Into<String>) -> Outcome {
    Outcome { check, passed, detail: detail.into() }
}

/// Runs every check of `plugin` with `config` on the model at `model_path`.
pub fn run(plugin: &LoadedPlugin, config: &str, model_path: &Path) -> anyhow::Result<Vec<Outcome>> {
    let mut out = vec![schema_check(plugin, config)];
    let sdxl = layers_to_abi(&graft_sdxl::model::layers_of(&SdxlConfig::sdxl_base())?);
    out.push(plan_check("plan on SDXL base 1.0", plugin, config, &sdxl)?);

    let model = SdxlModel::load(model_path, None, &Device::Cpu).with_context(|| format!("test model {}", model_path.display()))?;
    let tiny = layers_to_abi(&graft_sdxl::model::layers_of(&model.config)?);
    let planned = plan_check("plan on the test model", plugin, config, &tiny)?;
    let plan_ok = planned.passed;
    out.push(planned);
    if !plan_ok {
        return Ok(out);
    }

    let mut set = AdapterSet::new(&model, 7);
    let clean = latents(&model, &set)?;
    let instance = StrategyInstance::new(plugin, None, config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (s, _) = set.add(instance, 1.0, 1.0)?;
    set.set_training(false);

    let at_init = latents(&model, &set)?;
    let d = rel(&at_init, &clean)?;
    out.push(outcome(
        "zero-init identity",
        d <= TOLERANCE,
        format!("output with the initial parameters differs by {d:.2e} (relative; must be <= {TOLERANCE:.0e})"),
    ));

    perturb(&set, s)?;
    let trained = latents(&model, &set)?;
    let d = rel(&trained, &clean)?;
    out.push(outcome(
        "parameters take effect",
        d > 1e-6,
        format!("moving every trainable parameter by N(0, 0.05) changes the output by {d:.2e} (relative)"),
    ));

    let fused_n = set.fuse()?;
    let fused = latents(&model, &set)?;
    set.unfuse();
    let unfused = latents(&model, &set)?;
    let (d_f, d_u) = (rel(&fused, &trained)?, rel(&unfused, &trained)?);
    out.push(outcome(
        "fuse / unfuse",
        d_f <= TOLERANCE && d_u == 0.0,
        format!("{fused_n} hook points fused: differs from the hooks by {d_f:.2e}; after unfuse by {d_u:.2e} (must be 0)"),
    ));

    let dir = std::env::temp_dir().join(format!("graft-conformance-{}-{}", std::process::id(), plugin.manifest.id));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let meta = ExportMeta {
        steps: 0,
        unet_lr: None,
        text_encoder_lr: None,
        base_model: model_path.display().to_string(),
        sgm_layout: graft_sdxl::sgm::SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2)?,
    };
    let written = export_strategy(&set, s, &dir, "check", &meta);

    set.eject(s)?;
    let ejected = latents(&model, &set)?;
    let same = ejected.flatten_all()?.to_vec1::<f32>()? == clean.flatten_all()?.to_vec1::<f32>()?;
    out.push(outcome(
        "eject restores the model",
        same,
        if same { "bit for bit".to_string() } else { format!("differs by {:.2e} after eject", rel(&ejected, &clean)?) },
    ));

    out.push(match written {
        Err(e) => outcome("export -> load", false, format!("export failed: {e:#}")),
        Ok(files) => round_trip(plugin, &model, &files, &trained)?,
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// The plugin's config schema against its own parser (raw `new_strategy`, without the host's
/// schema check in between).
pub fn schema_check(plugin: &LoadedPlugin, config: &str) -> Outcome {
    const CHECK: &str = "config schema";
    let Some(schema) = &plugin.config_schema else {
        return outcome(CHECK, true, "no config schema (the serve UI offers a JSON text box)");
    };
    let parse = |json: &str| plugin.new_strategy(json).map(|_| ()).map_err(|e| e.to_string());
    match graft_sdk::schema::check_against_parser(schema, parse) {
        Err(e) => outcome(CHECK, false, e),
        Ok(summary) => match schema.validate_json(config) {
            Ok(()) => outcome(CHECK, true, summary),
            Err(e) => outcome(CHECK, false, format!("the configuration under test does not fit the schema: {e}")),
        },
    }
}

fn plan_check(check: &'static str, plugin: &LoadedPlugin, config: &str, layers: &[abi::LayerInfo]) -> anyhow::Result<Outcome> {
    let mut instance = match StrategyInstance::new(plugin, None, config) {
        Ok(i) => i,
        Err(e) => return Ok(outcome(check, false, e.to_string())),
    };
    let plan = match instance.plan(layers) {
        Ok(p) => p,
        Err(e) => return Ok(outcome(check, false, e.to_string())),
    };
    let unmatched = unmatched_targets(config, layers)?;
    if !unmatched.is_empty() {
        return Ok(outcome(check, false, format!("target patterns that match no layer: {}", unmatched.join(", "))));
    }
    // Training refuses a parameter in a group the plan does not declare: say so before that.
    let groups: Vec<&str> = plan.groups.iter().map(|g| g.name.as_str()).collect();
    for a in plan.attachments.iter() {
        if let Some(p) = a.params.iter().find(|p| !groups.contains(&p.group.as_str())) {
            return Ok(outcome(
                check,
                false,
                format!(
                    "parameter `{}` of `{}` is in optimizer group `{}`, which the plan does not declare (it declares: {})",
                    p.name,
                    a.layer,
                    p.group,
                    if groups.is_empty() { "none".to_string() } else { groups.join(", ") }
                ),
            ));
        }
    }
    if plan.attachments.is_empty() && plan.unfreeze.is_empty() {
        return Ok(outcome(check, false, format!("the plan attaches to none of the {} layers and unfreezes nothing", layers.len())));
    }
    Ok(outcome(
        check,
        true,
        format!("{} attachments, {} unfrozen base weights, {} groups", plan.attachments.len(), plan.unfreeze.len(), plan.groups.len()),
    ))
}

/// The include patterns of a `targets` key (the shipped plugins' convention) that select no layer.
fn unmatched_targets(config: &str, layers: &[abi::LayerInfo]) -> anyhow::Result<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(if config.trim().is_empty() { "{}" } else { config })?;
    let Some(targets) = value.get("targets").and_then(|t| t.as_array()) else { return Ok(Vec::new()) };
    let mut unmatched = Vec::new();
    for p in targets.iter().filter_map(|t| t.as_str()).filter(|p| !p.starts_with('!')) {
        let m = graft_sdk::LayerMatcher::new(&[p]).map_err(|e| anyhow::anyhow!("target `{p}`: {e}"))?;
        if m.filter(layers).is_empty() {
            unmatched.push(format!("`{p}`"));
        }
    }
    Ok(unmatched)
}

fn check_params() -> GenerateParams {
    GenerateParams { prompt: "a red circle".into(), width: 64, height: 64, steps: 2, seed: 3, ..Default::default() }
}

/// Latents after 2 Euler steps at 64x64 from a fixed seed, through `set`'s hooks.
fn latents(model: &SdxlModel, set: &AdapterSet) -> anyhow::Result<Tensor> {
    Ok(model.generate(&check_params(), set.hooks().pipeline(), &mut |_, _| {})?.latents)
}

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(diff / scale.max(1e-12))
}

/// Moves every trainable parameter of strategy `s` and its unfrozen base weights by seeded
/// N(0, 0.05) noise, as training would.
fn perturb(set: &AdapterSet, s: StrategyId) -> anyhow::Result<()> {
    let name = set.strategies()[s].name().to_string();
    let mut rng = graft_sdxl::rng::GraftRng::new(11);
    for (key, p) in set.store().trainable(Some(&name)) {
        let t = p.var.as_tensor();
        set.store().set(&key, &(t + (rng.randn(t.dims(), t.device())? * 0.05)?)?)?;
    }
    for b in set.unfrozen().iter().filter(|b| b.strategy == name) {
        let t = b.weight.as_tensor();
        b.weight.set(&(t + (rng.randn(t.dims(), t.device())? * 0.05)?)?)?;
    }
    Ok(())
}

/// Loads the exported files on the clean model, as `graft generate` does, and compares.
fn round_trip(plugin: &LoadedPlugin, model: &SdxlModel, files: &[std::path::PathBuf], want: &Tensor) -> anyhow::Result<Outcome> {
    let is_peft = |p: &Path| p.to_string_lossy().ends_with(".peft.safetensors");
    let mut combos: Vec<Vec<&std::path::PathBuf>> = vec![files.iter().filter(|p| !is_peft(p)).collect()];
    if files.iter().any(|p| is_peft(p)) {
        // The PEFT file in place of the kohya one.
        combos.push(files.iter().filter(|p| p.file_name().is_some_and(|n| n != "check.safetensors")).collect());
    }
    let mut details = Vec::new();
    let mut passed = true;
    for combo in combos {
        let mut adapters = FileAdapters::new(model)?;
        let mut set = AdapterSet::new(model, 7);
        for path in &combo {
            let bytes = std::fs::read(path)?;
            let raw = graft_formats::read::read_bytes(&bytes, path)?;
            let (file, report) = graft_formats::read_raw(&raw, adapters.keys())?;
            if file.format == graft_formats::AdapterFormat::Native {
                add_native(&mut set, plugin, plugin.manifest.id.as_str(), path, &file, 1.0, 1.0)?;
            } else {
                let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                adapters.add(&name, path, file, report, 1.0, 1.0)?;
            }
        }
        let inner = set.hooks();
        let hooks = adapters.hooks(inner.pipeline());
        let got = model.generate(&check_params(), hooks.pipeline(), &mut |_, _| {})?.latents;
        let d = rel(&got, want)?;
        passed &= d <= TOLERANCE;
        let names: Vec<String> = combo.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).collect();
        details.push(format!("{}: differs by {d:.2e}", names.join(" + ")));
    }
    Ok(outcome("export -> load", passed, details.join("; ")))
}
