//! LyCORIS tensors under kohya module names: LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
//! `hada_w2_b`), LoKr (`lokr_w1` or `lokr_w1_a` + `lokr_w1_b`, `lokr_w2` or `lokr_w2_a` +
//! `lokr_w2_b`), full weight differences (`diff`, `diff_b`), each with an optional `alpha` and
//! `dora_scale`. The math is in [`crate::adapter`].
//!
//! The Tucker forms (`hada_t1`, `hada_t2`, `lokr_t2`, LoCon `lora_mid`) only exist for
//! convolutions and are refused with a message: graft's layers are linear.

use std::path::Path;

use candle_core::{bail, Result};

use crate::adapter::{AdapterWeights, LokrFactor, ModuleWeights};
use crate::kohya::{write_family, Group, Written};
use crate::metadata::KohyaMetadata;
use crate::write::StoreDtype;

/// The LyCORIS entry of one module group; `None` when the group holds no complete set.
pub(crate) fn parse_group(group: &mut Group, layer: &str) -> Result<Option<AdapterWeights>> {
    for tucker in ["hada_t1", "hada_t2", "lokr_t1", "lokr_t2"] {
        if group.has(tucker) {
            bail!(
                "{}: `{}` is a Tucker-decomposed LyCORIS tensor (for convolutions); layer `{layer}` is linear, \
                 so this file cannot be applied",
                group.path.display(),
                group.key(tucker)
            );
        }
    }
    if ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"].iter().all(|s| group.has(s)) {
        let w1_a = group.take_matrix("hada_w1_a")?;
        let w1_b = group.take_matrix("hada_w1_b")?;
        let w2_a = group.take_matrix("hada_w2_a")?;
        let w2_b = group.take_matrix("hada_w2_b")?;
        let alpha = group.take_alpha()?;
        if let (Some(w1_a), Some(w1_b), Some(w2_a), Some(w2_b)) = (w1_a, w1_b, w2_a, w2_b) {
            return Ok(Some(AdapterWeights::LoHa { w1_a, w1_b, w2_a, w2_b, alpha }));
        }
        return Ok(None);
    }
    let has_factor = |g: &Group, n: &str| g.has(n) || (g.has(&format!("{n}_a")) && g.has(&format!("{n}_b")));
    if has_factor(group, "lokr_w1") && has_factor(group, "lokr_w2") {
        let w1 = take_factor(group, "lokr_w1")?;
        let w2 = take_factor(group, "lokr_w2")?;
        let alpha = group.take_alpha()?;
        if let (Some(w1), Some(w2)) = (w1, w2) {
            return Ok(Some(AdapterWeights::LoKr { w1, w2, alpha }));
        }
        return Ok(None);
    }
    if group.has("diff") {
        let diff = group.take_matrix("diff")?;
        let diff_b = group.take("diff_b");
        return Ok(diff.map(|diff| AdapterWeights::Full { diff, diff_b }));
    }
    Ok(None)
}

fn take_factor(group: &mut Group, name: &str) -> Result<Option<LokrFactor>> {
    if let Some(w) = group.take_matrix(name)? {
        return Ok(Some(LokrFactor::Full(w)));
    }
    let a = group.take_matrix(&format!("{name}_a"))?;
    let b = group.take_matrix(&format!("{name}_b"))?;
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(LokrFactor::LowRank { a, b }),
        _ => None,
    })
}

/// Writes any linear entries (LoRA, LoHa, LoKr, full, with DoRA) under kohya module names with
/// LyCORIS suffixes, with kohya's metadata (`ss_network_module` = `lycoris.kohya` unless the
/// metadata says otherwise). A1111 and ComfyUI load these files.
pub fn write_lycoris(
    path: &Path,
    modules: &[ModuleWeights],
    layout: &graft_sdxl::sgm::SgmLayout,
    meta: &KohyaMetadata,
    dtype: StoreDtype,
) -> Result<Written> {
    let mut meta = meta.clone();
    if meta.network_module == "networks.lora" {
        meta.network_module = "lycoris.kohya".into();
    }
    if !meta.network_args.contains_key("algo") {
        let algo = if modules.iter().all(|m| matches!(m.weights, AdapterWeights::Full { .. })) {
            Some("full")
        } else if modules.iter().all(|m| matches!(m.weights, AdapterWeights::LoHa { .. })) {
            Some("loha")
        } else if modules.iter().all(|m| matches!(m.weights, AdapterWeights::LoKr { .. })) {
            Some("lokr")
        } else if modules.iter().all(|m| matches!(m.weights, AdapterWeights::Lora { .. })) {
            Some("locon")
        } else {
            None
        };
        if let Some(a) = algo {
            meta.network_args.insert("algo".into(), a.into());
        }
    }
    if modules.iter().any(|m| m.dora_scale.is_some()) && !meta.network_args.contains_key("dora_wd") {
        meta.network_args.insert("dora_wd".into(), "True".into());
    }
    write_family(path, modules, layout, &meta, dtype)
}

/// Writes full weight differences (`<kohya name>.diff`, optional `.diff_b`): the LyCORIS "full"
/// file A1111 and ComfyUI apply as `W += m * diff`.
pub fn write_diff(
    path: &Path,
    modules: &[ModuleWeights],
    layout: &graft_sdxl::sgm::SgmLayout,
    meta: &KohyaMetadata,
    dtype: StoreDtype,
) -> Result<Written> {
    for m in modules {
        if !matches!(m.weights, AdapterWeights::Full { .. }) || m.dora_scale.is_some() {
            bail!("{}: `{}` is a {} entry; a diff file holds full weight differences only", path.display(), m.layer, m.kind());
        }
    }
    write_lycoris(path, modules, layout, meta, dtype)
}
