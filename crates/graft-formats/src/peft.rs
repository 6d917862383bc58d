//! PEFT / diffusers files.
//!
//! Keys: `<component>.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] with
//! `<component>` = `unet`, `text_encoder`, `text_encoder_2` (no prefix: the UNet, as diffusers
//! reads `save_attn_procs` files). Older diffusers spellings: `.lora.down.weight` /
//! `.lora.up.weight`, `.lora_linear_layer.down.weight` / `.up.weight`, and the attention-processor
//! form `<attn>.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0` in the UNet,
//! `out_proj` in a text encoder; `to_q_lora` is `q_proj` there). DoRA: `.lora_magnitude_vector` [out].
//!
//! **alpha is not a tensor**: diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=...)`
//! stores the PEFT config as JSON under the header key `lora_adapter_metadata`, its keys prefixed
//! by component (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`,
//! `unet.target_modules`, ...); PEFT's own `save_lora_adapter` writes them without a prefix.
//! Text-encoder module paths may lack `text_model.` (diffusers with transformers 5 writes
//! `text_encoder.encoder.layers.N...`); graft writes it, as real SDXL files and ComfyUI have it and
//! diffusers strips it where needed.
//! `alpha_pattern` keys are regular expressions matched as PEFT does:
//! `re.match(rf"(.*\.)?({key})$", module)`, the first matching key (in sorted order) wins.
//! Without metadata diffusers uses alpha = r (scale 1); a `.alpha` tensor (some tools write one)
//! wins over everything.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, Result, Tensor};
use graft_sdxl::Component;
use serde_json::{Map, Value};

use crate::adapter::{AdapterWeights, ModuleWeights};
use crate::keys::{split_layer, KeyMap};
use crate::kohya::Written;
use crate::load::Parsed;
use crate::read::{as_matrix, scalar, RawFile};
use crate::write::{encode_body, encode_file, write_atomic, StoreDtype};

/// The header key diffusers keeps the PEFT config under.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

const PEFT_DEFAULT_ALPHA: f64 = 8.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Down,
    Up,
    Alpha,
    Magnitude,
}

/// Does this key look like a PEFT / diffusers LoRA key?
pub fn is_peft_key(key: &str) -> bool {
    split_key(key).is_some()
}

/// (module path with the component prefix still on, role) of a key.
fn split_key(key: &str) -> Option<(String, Role)> {
    const SUFFIXES: [(&str, Role); 10] = [
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
        (".lora_magnitude_vector.weight", Role::Magnitude),
        (".lora_magnitude_vector", Role::Magnitude),
        (".lora_A.default.weight", Role::Down),
        (".lora_B.default.weight", Role::Up),
    ];
    for (suffix, role) in SUFFIXES {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module.to_string(), role));
        }
    }
    // Attention-processor spelling: `<attn>[.processor].to_q_lora.down.weight`.
    for (dir, role) in [("down", Role::Down), ("up", Role::Up)] {
        let Some(head) = key.strip_suffix(&format!("_lora.{dir}.weight")) else {
            continue;
        };
        let (parent, proj) = head.rsplit_once('.')?;
        if !["to_q", "to_k", "to_v", "to_out"].contains(&proj) {
            return None;
        }
        let parent = parent.strip_suffix(".processor").unwrap_or(parent);
        // The component decides the module name; mark the processor form for `resolve`.
        return Some((format!("{parent}.<{proj}>"), role));
    }
    None
}

/// Key -> (graft layer name, role), when the key names a known layer.
fn resolve(key: &str, keys: &KeyMap) -> Option<(String, Role)> {
    if let Some(module) = key.strip_suffix(".alpha") {
        return layer_of(module, keys).map(|l| (l, Role::Alpha));
    }
    let (module, role) = split_key(key)?;
    let module = if let Some(start) = module.find(".<") {
        let parent = &module[..start];
        let proj = module[start + 2..].trim_end_matches('>');
        let text = parent.starts_with("text_encoder") || parent.starts_with("text_model");
        let leaf = match (text, proj) {
            (false, "to_out") => "to_out.0",
            (false, p) => p,
            (true, "to_q") => "q_proj",
            (true, "to_k") => "k_proj",
            (true, "to_v") => "v_proj",
            (true, _) => "out_proj",
        };
        format!("{parent}.{leaf}")
    } else {
        module
    };
    layer_of(&module, keys).map(|l| (l, role))
}

/// A module path with or without a component prefix -> the graft layer name, if known.
fn layer_of(module: &str, keys: &KeyMap) -> Option<String> {
    if let Some((component, path)) = split_layer(module) {
        if let Some(l) = keys.linear(module) {
            return Some(l.name.clone());
        }
        // transformers 5 has no `text_model` level in CLIPTextModel, so diffusers + transformers 5
        // writes `text_encoder.encoder.layers.N...`.
        if component != Component::Unet && !path.starts_with("text_model.") {
            let name = format!("{}.text_model.{path}", component.prefix());
            return keys.linear(&name).map(|l| l.name.clone());
        }
        return None;
    }
    let unet = format!("unet.{module}");
    keys.linear(&unet).map(|l| l.name.clone())
}

/// The PEFT config values of one component.
#[derive(Debug, Clone, Default)]
struct ComponentConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl ComponentConfig {
    fn alpha_for(&self, module: &str, path: &Path) -> Result<f64> {
        for (pattern, alpha) in &self.alpha_pattern {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: {ADAPTER_METADATA_KEY}: alpha_pattern key `{pattern}` is not a valid pattern: {e}",
                    path.display()
                ))
            })?;
            if re.is_match(module) {
                return Ok(*alpha);
            }
        }
        Ok(self.lora_alpha.unwrap_or(PEFT_DEFAULT_ALPHA))
    }
}

/// The per-component configs in the header; `None` without `lora_adapter_metadata`.
fn configs(raw: &RawFile) -> Result<Option<BTreeMap<&'static str, ComponentConfig>>> {
    let Some(text) = raw.metadata.get(ADAPTER_METADATA_KEY) else {
        return Ok(None);
    };
    let bad = |what: String| candle_core::Error::Msg(format!("{}: header metadata `{ADAPTER_METADATA_KEY}` {what}", raw.path.display()));
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("is not a JSON object".into()));
    };
    let prefixed = map.keys().any(|k| ["unet.", "text_encoder.", "text_encoder_2."].iter().any(|p| k.starts_with(p)));
    let mut out = BTreeMap::new();
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let get = |field: &str| -> Option<&Value> {
            if prefixed {
                map.get(&format!("{}.{field}", c.prefix()))
            } else {
                map.get(field)
            }
        };
        let present = map.keys().any(|k| k.strip_prefix(c.prefix()).is_some_and(|r| r.starts_with('.')));
        if prefixed && !present {
            continue;
        }
        let number = |field: &str| -> Result<Option<f64>> {
            match get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("field `{field}` is {v}, not a number"))),
            }
        };
        let mut cfg = ComponentConfig { lora_alpha: number("lora_alpha")?, ..Default::default() };
        if let Some(Value::Object(p)) = get("alpha_pattern") {
            for (k, v) in p {
                let a = v.as_f64().ok_or_else(|| bad(format!("alpha_pattern `{k}` is {v}, not a number")))?;
                cfg.alpha_pattern.push((k.clone(), a));
            }
        }
        cfg.use_rslora = matches!(get("use_rslora"), Some(Value::Bool(true)));
        out.insert(c.prefix(), cfg);
    }
    Ok(Some(out))
}

/// Reads the PEFT / diffusers keys of a file.
pub(crate) fn parse(raw: &RawFile, keys: &KeyMap) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    let configs = configs(raw)?;
    let mut groups: BTreeMap<String, BTreeMap<Role, (String, Tensor)>> = BTreeMap::new();
    for (key, t) in &raw.tensors {
        match resolve(key, keys) {
            Some((layer, role)) => {
                let slot = groups.entry(layer).or_default();
                if let Some((other, _)) = slot.insert(role, (key.clone(), t.clone())) {
                    bail!("{}: keys `{other}` and `{key}` are the same tensor of one layer", raw.path.display());
                }
            }
            None => parsed.unmatched.push(key.clone()),
        }
    }
    let mut alpha_tensors = false;
    for (layer, mut g) in groups {
        let (Some((_, down)), Some((_, up))) = (g.remove(&Role::Down), g.remove(&Role::Up)) else {
            parsed.warnings.push(format!("{layer}: needs both lora_A (down) and lora_B (up); skipped"));
            parsed.unmatched.extend(g.into_values().map(|(k, _)| k));
            continue;
        };
        let (down, up) = (as_matrix(&down)?, as_matrix(&up)?);
        let rank = down.dims().first().copied().unwrap_or(0);
        let (component, module) = split_layer(&layer).unwrap_or((Component::Unet, layer.as_str()));
        let cfg = configs.as_ref().and_then(|c| c.get(component.prefix()));
        let alpha = match (g.remove(&Role::Alpha), cfg) {
            (Some((key, t)), _) => {
                alpha_tensors = true;
                Some(scalar(&t, &key, &raw.path)? as f64)
            }
            (None, Some(cfg)) => {
                let a = cfg.alpha_for(module, &raw.path)?;
                // rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r.
                Some(if cfg.use_rslora { a * (rank as f64).sqrt() } else { a })
            }
            (None, None) => None,
        };
        let dora_scale = g.remove(&Role::Magnitude).map(|(_, t)| t);
        let module = ModuleWeights {
            layer: layer.clone(),
            weights: AdapterWeights::Lora { down, up, mid: None, alpha: alpha.map(|a| a as f32) },
            dora_scale,
        };
        let entry = keys.layer(&layer);
        let in_out = entry.and_then(|l| l.in_out);
        module.validate(in_out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", raw.path.display())))?;
        if let Some(l) = entry.filter(|l| l.kind.is_some()) {
            module.validate_kernel(l.kernel).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", raw.path.display())))?;
        }
        parsed.modules.push(module);
    }
    if configs.is_none() && !alpha_tensors && !parsed.modules.is_empty() {
        parsed.warnings.push(format!("no `{ADAPTER_METADATA_KEY}` in the header: alpha = rank (scale 1), as diffusers assumes"));
    }
    Ok(parsed)
}

/// Writes a PEFT / diffusers LoRA file: `<component>.<module>.lora_A.weight` /
/// `.lora_B.weight`, and `lora_adapter_metadata` (per component `r`, `lora_alpha`,
/// `rank_pattern`, `alpha_pattern`, `target_modules`) as diffusers' `save_lora_weights` writes
/// it, so that `pipe.load_lora_weights` scales each module by its own alpha / r.
pub fn write_peft(path: &Path, modules: &[ModuleWeights], dtype: StoreDtype) -> Result<Written> {
    if modules.is_empty() {
        bail!("{}: nothing to write: no adapter modules", path.display());
    }
    let mut tensors = BTreeMap::new();
    // component prefix -> module path -> (rank, alpha)
    let mut per_component: BTreeMap<&str, BTreeMap<String, (usize, f64)>> = BTreeMap::new();
    for m in modules {
        let AdapterWeights::Lora { down, up, alpha, .. } = &m.weights else {
            bail!("{}: cannot write `{}` to a PEFT file: it is a {} entry, PEFT files hold plain LoRA", path.display(), m.layer, m.kind());
        };
        if m.is_conv() || crate::keys::is_unet_conv_name(&m.layer) {
            bail!("{}: `{}` is a conv (LoCon) entry; graft writes those to kohya / LyCORIS files only", path.display(), m.layer);
        }
        if m.dora_scale.is_some() {
            bail!("{}: `{}` has a DoRA magnitude; graft writes DoRA to LyCORIS files only", path.display(), m.layer);
        }
        let Some((component, module)) = split_layer(&m.layer) else {
            bail!("{}: `{}` is not a graft layer name", path.display(), m.layer);
        };
        let rank = down.dims().first().copied().unwrap_or(0);
        let alpha = match alpha {
            Some(a) if *a != 0.0 => *a as f64,
            _ => rank as f64,
        };
        // In the config, text-encoder paths go without `text_model.`: PEFT matches targets and
        // patterns by suffix, so `encoder.layers.0.self_attn.q_proj` finds the module both in
        // transformers 4 (`text_model.encoder...`) and in transformers 5's CLIPTextModel (`encoder...`).
        let config_path = match component {
            Component::Unet => module,
            _ => module.strip_prefix("text_model.").unwrap_or(module),
        };
        let slot = per_component.entry(component.prefix()).or_default();
        if slot.insert(config_path.to_string(), (rank, alpha)).is_some() {
            bail!("{}: layer `{}` appears twice", path.display(), m.layer);
        }
        tensors.insert(format!("{}.lora_A.weight", m.layer), down.clone());
        tensors.insert(format!("{}.lora_B.weight", m.layer), up.clone());
    }
    let mut config = Map::new();
    for (prefix, mods) in &per_component {
        let r = most_common(mods.values().map(|(r, _)| *r as f64));
        let a = most_common(mods.values().map(|(_, a)| *a));
        let pattern = |pick: &dyn Fn(&(usize, f64)) -> f64, common: f64| -> Value {
            let mut m = Map::new();
            for (module, v) in mods {
                if pick(v) != common {
                    m.insert(module.clone(), number(pick(v)));
                }
            }
            Value::Object(m)
        };
        let entries = [
            ("alpha_pattern", pattern(&|v| v.1, a)),
            ("lora_alpha", number(a)),
            ("r", number(r)),
            ("rank_pattern", pattern(&|v| v.0 as f64, r)),
            ("target_modules", Value::Array(mods.keys().map(|k| Value::String(k.clone())).collect())),
        ];
        for (field, v) in entries {
            config.insert(format!("{prefix}.{field}"), v);
        }
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert(ADAPTER_METADATA_KEY.to_string(), python_json(&Value::Object(config)));
    let body = encode_body(&tensors, dtype).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let bytes = encode_file(&body, &metadata);
    write_atomic(path, &bytes)?;
    Ok(Written { bytes: bytes.len(), metadata, tensors: tensors.len() })
}

/// The most frequent value; ties go to the smallest.
fn most_common(values: impl Iterator<Item = f64>) -> f64 {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    counts.first().map(|(v, _)| *v).unwrap_or(0.0)
}

/// Integers as JSON integers (PEFT configs hold `r: 4`, `lora_alpha: 8`), others as floats.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// `json.dumps(value, indent=2, sort_keys=True)` as Python writes it.
fn python_json(value: &Value) -> String {
    // serde_json's pretty printer uses the same two-space indent and `": "`; keys come sorted
    // from the map (built in sorted order).
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into())
}
