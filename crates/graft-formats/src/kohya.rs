//! kohya sd-scripts files (and LyCORIS files, which use the same key names).
//!
//! Keys: `<module>.<tensor>` with `<module>` = `lora_unet_<path>` / `lora_te1_<path>` /
//! `lora_te2_<path>` / `lora_te_<path>` (dots of the module path as `_`) and `<tensor>` one of
//! `lora_down.weight` [r, in], `lora_up.weight` [out, r], `alpha` (0-d), `dora_scale`, or the
//! LyCORIS tensors (`hada_*`, `lokr_*`, `diff`, `diff_b`, see [`crate::lycoris`]).
//! graft writes SGM module names for the UNet, as kohya does for SDXL.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, Result, Tensor};

use crate::adapter::{AdapterWeights, ModuleWeights};
use crate::keys::{to_kohya, KeyMap};
use crate::load::Parsed;
use crate::metadata::{kohya_hashes, KohyaMetadata};
use crate::read::{as_matrix, scalar, RawFile};
use crate::write::{encode_body, encode_file, write_atomic, StoreDtype};

/// Key prefixes of the kohya family.
pub const PREFIXES: [&str; 4] = ["lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"];

pub fn is_kohya_key(key: &str) -> bool {
    PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The tensors of one kohya module name, by suffix; taking a suffix removes it, and what is left
/// at the end was not understood.
pub(crate) struct Group<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    tensors: BTreeMap<&'a str, (&'a str, &'a Tensor)>,
}

impl<'a> Group<'a> {
    pub fn has(&self, suffix: &str) -> bool {
        self.tensors.contains_key(suffix)
    }

    pub fn take(&mut self, suffix: &str) -> Option<Tensor> {
        self.tensors.remove(suffix).map(|(_, t)| t.clone())
    }

    pub fn take_matrix(&mut self, suffix: &str) -> Result<Option<Tensor>> {
        self.take(suffix).map(|t| as_matrix(&t)).transpose()
    }

    pub fn take_alpha(&mut self) -> Result<Option<f32>> {
        match self.tensors.remove("alpha") {
            Some((key, t)) => Ok(Some(scalar(t, key, self.path)?)),
            None => Ok(None),
        }
    }

    /// The full key of a suffix still present (for messages).
    pub fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    fn leftover(self) -> Vec<String> {
        self.tensors.into_values().map(|(k, _)| k.to_string()).collect()
    }
}

/// Reads the kohya / LyCORIS keys of a file. Keys outside the family or naming no known layer
/// are returned as unmatched.
pub(crate) fn parse(raw: &RawFile, keys: &KeyMap) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut groups: BTreeMap<&str, BTreeMap<&str, (&str, &Tensor)>> = BTreeMap::new();
    for (key, t) in &raw.tensors {
        match key.split_once('.') {
            Some((name, suffix)) if is_kohya_key(key) => {
                groups.entry(name).or_default().insert(suffix, (key.as_str(), t));
            }
            _ => parsed.unmatched.push(key.clone()),
        }
    }
    for (name, tensors) in groups {
        let Some(layer) = keys.from_kohya(name) else {
            parsed.unmatched.extend(tensors.values().map(|(k, _)| k.to_string()));
            continue;
        };
        let mut group = Group { name, path: &raw.path, tensors };
        // Conv layers take LoCon (LoRA factors, Tucker) and full differences (a full fine-tune's
        // export): LoHa / LoKr entries of a convolution are skipped.
        let is_lora = group.has("lora_down.weight") || group.has("lora_up.weight");
        let is_conv_layer = keys.layer(layer).is_some_and(|l| l.kind == Some(graft_sdxl::LayerKind::Conv));
        if is_conv_layer && !is_lora && !group.has("diff") {
            parsed.warnings.push(format!("{name}: LyCORIS LoHa / LoKr entries of a convolution are not supported; skipped"));
            parsed.unmatched.extend(group.leftover());
            continue;
        }
        let weights = if is_lora { lora(&mut group)? } else { crate::lycoris::parse_group(&mut group, layer)? };
        let Some(weights) = weights else {
            parsed.warnings.push(format!(
                "{name}: no complete set of adapter tensors (have: {}); skipped",
                group.tensors.keys().copied().collect::<Vec<_>>().join(", ")
            ));
            parsed.unmatched.extend(group.leftover());
            continue;
        };
        let dora_scale = group.take("dora_scale");
        if is_conv_layer && dora_scale.is_some() {
            parsed.warnings.push(format!("{name}: DoRA on a convolution is not supported; skipped"));
            parsed.unmatched.push(group.key("dora_scale"));
            parsed.unmatched.extend(group.leftover());
            continue;
        }
        let module = ModuleWeights { layer: layer.to_string(), weights, dora_scale };
        let entry = keys.layer(layer);
        let in_out = entry.and_then(|l| l.in_out);
        module.validate(in_out).map_err(|e| candle_core::Error::Msg(format!("{}: module `{name}`: {e}", raw.path.display())))?;
        // Layers known only by name (no kind) take any kernel.
        if let Some(l) = entry.filter(|l| l.kind.is_some()) {
            module.validate_kernel(l.kernel).map_err(|e| candle_core::Error::Msg(format!("{}: module `{name}`: {e}", raw.path.display())))?;
        }
        parsed.unmatched.extend(group.leftover());
        parsed.modules.push(module);
    }
    Ok(parsed)
}

/// LoRA, LoCon ([r, in, kh, kw] down) and LyCORIS Tucker LoCon (`lora_mid.weight`) tensors;
/// 1x1 kernels are read as matrices.
fn lora(group: &mut Group) -> Result<Option<AdapterWeights>> {
    if !(group.has("lora_down.weight") && group.has("lora_up.weight")) {
        return Ok(None);
    }
    let down = group.take_matrix("lora_down.weight")?;
    let up = group.take_matrix("lora_up.weight")?;
    let (Some(down), Some(up)) = (down, up) else {
        return Ok(None);
    };
    let mid = group.take("lora_mid.weight");
    if let Some(m) = &mid {
        if m.rank() != 4 {
            bail!("{}: `{}` must be a [r, r, kh, kw] kernel, got shape {:?}", group.path.display(), group.key("lora_mid.weight"), m.dims());
        }
    }
    let alpha = group.take_alpha()?;
    Ok(Some(AdapterWeights::Lora { down, up, mid, alpha }))
}

/// The tensors of one module under kohya / LyCORIS suffixes (`<name>.lora_down.weight`, ...).
pub(crate) fn module_tensors(m: &ModuleWeights, layout: &graft_sdxl::sgm::SgmLayout, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let name = to_kohya(&m.layer, layout)?;
    let mut put = |suffix: &str, t: Tensor| {
        out.insert(format!("{name}.{suffix}"), t);
    };
    let alpha_tensor = |a: f32| Tensor::new(a, &candle_core::Device::Cpu);
    match &m.weights {
        AdapterWeights::Lora { down, up, mid, alpha } => {
            let r = down.dims().first().copied().unwrap_or(0);
            // A conv entry (LoCon) stores its factors as kernels, as kohya and LyCORIS do:
            // up [out, r, 1, 1], a Tucker down [r, in, 1, 1].
            let conv = m.is_conv() || crate::keys::is_unet_conv_name(&m.layer);
            let kernel = |t: &Tensor| -> Result<Tensor> {
                match t.dims() {
                    [a, b] if conv => t.reshape((*a, *b, 1, 1)),
                    _ => Ok(t.clone()),
                }
            };
            put("lora_down.weight", kernel(down)?);
            put("lora_up.weight", kernel(up)?);
            if let Some(mid) = mid {
                put("lora_mid.weight", mid.clone());
            }
            // kohya always writes alpha; a missing alpha means alpha = rank.
            put("alpha", alpha_tensor(effective_alpha(*alpha, r))?);
        }
        AdapterWeights::LoHa { w1_a, w1_b, w2_a, w2_b, alpha } => {
            let r = w1_b.dims().first().copied().unwrap_or(0);
            put("hada_w1_a", w1_a.clone());
            put("hada_w1_b", w1_b.clone());
            put("hada_w2_a", w2_a.clone());
            put("hada_w2_b", w2_b.clone());
            put("alpha", alpha_tensor(effective_alpha(*alpha, r))?);
        }
        AdapterWeights::LoKr { w1, w2, alpha } => {
            use crate::adapter::LokrFactor;
            for (n, f) in [("lokr_w1", w1), ("lokr_w2", w2)] {
                match f {
                    LokrFactor::Full(w) => put(n, w.clone()),
                    LokrFactor::LowRank { a, b } => {
                        put(&format!("{n}_a"), a.clone());
                        put(&format!("{n}_b"), b.clone());
                    }
                }
            }
            if let Some(r) = m.rank() {
                put("alpha", alpha_tensor(effective_alpha(*alpha, r))?);
            }
        }
        AdapterWeights::Full { diff, diff_b } => {
            put("diff", diff.clone());
            if let Some(b) = diff_b {
                put("diff_b", b.clone());
            }
        }
        AdapterWeights::Native { .. } => {
            bail!("{}: a graft-native entry cannot be written under kohya / LyCORIS keys", m.layer)
        }
    }
    if let Some(s) = &m.dora_scale {
        put("dora_scale", s.clone());
    }
    Ok(())
}

fn effective_alpha(alpha: Option<f32>, rank: usize) -> f32 {
    match alpha {
        Some(a) if a != 0.0 => a,
        _ => rank as f32,
    }
}

/// What a writer produced.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: usize,
    pub metadata: BTreeMap<String, String>,
    pub tensors: usize,
}

/// Writes a kohya LoRA file (SGM names for the UNet, `lora_te1_` / `lora_te2_`, `.alpha` tensors,
/// kohya's metadata and hashes). Only plain LoRA entries: anything else is a LyCORIS file
/// ([`crate::lycoris::write_lycoris`]); diffusers and A1111 load this one.
pub fn write_kohya(
    path: &Path,
    modules: &[ModuleWeights],
    layout: &graft_sdxl::sgm::SgmLayout,
    meta: &KohyaMetadata,
    dtype: StoreDtype,
) -> Result<Written> {
    for m in modules {
        if !matches!(m.weights, AdapterWeights::Lora { mid: None, .. }) || m.dora_scale.is_some() {
            bail!(
                "{}: cannot write `{}` to a kohya LoRA file: it is a {}{} entry (write a LyCORIS file instead)",
                path.display(),
                m.layer,
                m.kind(),
                if m.dora_scale.is_some() { " + DoRA" } else { "" }
            );
        }
    }
    write_family(path, modules, layout, meta, dtype)
}

/// The common writer of kohya-family files: tensors, metadata with ranks, hashes, atomic write.
pub(crate) fn write_family(
    path: &Path,
    modules: &[ModuleWeights],
    layout: &graft_sdxl::sgm::SgmLayout,
    meta: &KohyaMetadata,
    dtype: StoreDtype,
) -> Result<Written> {
    if modules.is_empty() {
        bail!("{}: nothing to write: no adapter modules", path.display());
    }
    let mut tensors = BTreeMap::new();
    let mut dims = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for m in modules {
        if !seen.insert(m.layer.as_str()) {
            bail!("{}: layer `{}` appears twice", path.display(), m.layer);
        }
        module_tensors(m, layout, &mut tensors)?;
    }
    // ss_network_dim / alpha describe the linear modules (kohya puts conv_dim / conv_alpha in
    // ss_network_args); a conv-only file describes its conv modules.
    let is_conv = |m: &ModuleWeights| m.is_conv() || crate::keys::is_unet_conv_name(&m.layer);
    let any_linear = modules.iter().any(|m| !is_conv(m));
    for m in modules.iter().filter(|m| !any_linear || !is_conv(m)) {
        if let Some(r) = m.rank() {
            dims.push((r, effective_alpha(m.alpha(), r)));
        }
    }
    let body = encode_body(&tensors, dtype).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let mut metadata = meta.to_map(&dims);
    let (model_hash, legacy_hash) = kohya_hashes(&body, &metadata);
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = encode_file(&body, &metadata);
    write_atomic(path, &bytes)?;
    Ok(Written { bytes: bytes.len(), metadata, tensors: tensors.len() })
}
