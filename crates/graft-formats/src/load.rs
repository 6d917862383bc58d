//! Reading any adapter file: format detection, and a report that accounts for every key.

use std::path::{Path, PathBuf};

use candle_core::{bail, Result};

use crate::adapter::{AdapterFile, AdapterFormat, AdapterWeights, ModuleKind, ModuleWeights};
use crate::keys::KeyMap;
use crate::native::NativeInfo;
use crate::read::{read_file, RawFile};
use crate::{kohya, native, peft};

/// What a format parser found.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub modules: Vec<ModuleWeights>,
    pub unmatched: Vec<String>,
    pub warnings: Vec<String>,
}

/// One layer an adapter file attaches to.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    pub layer: String,
    pub kind: ModuleKind,
    /// Low-rank entries only.
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub dora: bool,
}

/// Where every key of a file went.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub file: PathBuf,
    pub format: AdapterFormat,
    /// Sorted by layer name.
    pub attached: Vec<Attached>,
    /// Keys that matched no layer (or no complete adapter), by name.
    pub unmatched_keys: Vec<String>,
    /// Other things the user should know (missing alpha metadata, skipped partial modules).
    pub warnings: Vec<String>,
    /// The strategy of a graft-native file.
    pub native: Option<NativeInfo>,
}

impl LoadReport {
    /// A short human summary: format, counts per kind, ranks, and every unmatched key.
    pub fn summary(&self) -> String {
        use std::collections::BTreeMap;
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
        for a in &self.attached {
            *kinds.entry(a.kind.name()).or_default() += 1;
            if let Some(r) = a.rank {
                *ranks.entry(r).or_default() += 1;
            }
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let mut s = format!("{}: {} file, {} layers ({})", self.file.display(), self.format, self.attached.len(), kinds.join(", "));
        if !ranks.is_empty() {
            let r: Vec<String> = ranks.keys().map(|r| r.to_string()).collect();
            s.push_str(&format!(", rank {}", r.join("/")));
        }
        if let Some(n) = &self.native {
            s.push_str(&format!(", strategy {} {}", n.strategy, n.version));
        }
        for w in &self.warnings {
            s.push_str(&format!("\n  warning: {w}"));
        }
        if !self.unmatched_keys.is_empty() {
            s.push_str(&format!("\n  warning: {} keys matched no layer:", self.unmatched_keys.len()));
            for k in &self.unmatched_keys {
                s.push_str(&format!("\n    {k}"));
            }
        }
        s
    }
}

/// Which format a file is in, from its metadata and keys; `None` when no key family fits.
pub fn detect(raw: &RawFile) -> Option<AdapterFormat> {
    if raw.metadata.contains_key(native::STRATEGY_KEY) {
        return Some(AdapterFormat::Native);
    }
    let kohya = raw.keys().filter(|k| kohya::is_kohya_key(k)).count();
    let peft = raw.keys().filter(|k| peft::is_peft_key(k)).count();
    if kohya == 0 && peft == 0 {
        return None;
    }
    if kohya >= peft {
        let lycoris = raw.keys().any(|k| {
            k.split_once('.').is_some_and(|(_, s)| {
                s.starts_with("hada_") || s.starts_with("lokr_") || s == "diff" || s == "dora_scale" || s == "lora_mid.weight"
            })
        });
        Some(if lycoris { AdapterFormat::Lycoris } else { AdapterFormat::Kohya })
    } else {
        Some(AdapterFormat::Peft)
    }
}

/// Reads an adapter file of any supported format against the layers of a model.
///
/// Errors (each naming the file): unreadable, truncated or corrupt file; unknown key family; a
/// tensor that does not fit its layer; nothing matched at all. Keys that match no layer are
/// listed in the report, not silently dropped.
pub fn read_adapter(path: &Path, keys: &KeyMap) -> Result<(AdapterFile, LoadReport)> {
    let raw = read_file(path)?;
    read_raw(&raw, keys)
}

/// As [`read_adapter`] for a file already read.
pub fn read_raw(raw: &RawFile, keys: &KeyMap) -> Result<(AdapterFile, LoadReport)> {
    let path = &raw.path;
    if raw.tensors.is_empty() {
        bail!("{}: the file holds no tensors", path.display());
    }
    let Some(format) = detect(raw) else {
        let sample: Vec<&str> = raw.keys().take(3).collect();
        bail!(
            "{}: not a known adapter format (kohya `lora_unet_...`, PEFT `unet....lora_A.weight`, LyCORIS, \
             or graft-native with `{}` metadata); first keys: {}",
            path.display(),
            native::STRATEGY_KEY,
            sample.join(", ")
        );
    };
    let native = NativeInfo::from_metadata(&raw.metadata, path)?;
    let mut parsed = match format {
        AdapterFormat::Kohya | AdapterFormat::Lycoris => kohya::parse(raw, keys)?,
        AdapterFormat::Peft => peft::parse(raw, keys)?,
        AdapterFormat::Native => native::parse(raw, keys)?,
    };
    if parsed.modules.is_empty() {
        let sample: Vec<&str> = parsed.unmatched.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{}: no key of this {format} file matched a layer of the model ({} keys, e.g. {}); \
             is it an adapter for another model (SD 1.x, SD 2, Flux)?",
            path.display(),
            raw.tensors.len(),
            sample.join(", ")
        );
    }
    parsed.modules.sort_by(|a, b| a.layer.cmp(&b.layer));
    parsed.unmatched.sort();
    let attached = parsed
        .modules
        .iter()
        .map(|m| Attached { layer: m.layer.clone(), kind: m.kind(), rank: m.rank(), alpha: m.alpha(), dora: m.dora_scale.is_some() })
        .collect();
    let format = match format {
        // A kohya-family file with anything but plain LoRA is a LyCORIS file.
        AdapterFormat::Kohya | AdapterFormat::Lycoris => {
            let plain = parsed.modules.iter().all(|m| matches!(m.weights, AdapterWeights::Lora { mid: None, .. }) && m.dora_scale.is_none());
            if plain {
                AdapterFormat::Kohya
            } else {
                AdapterFormat::Lycoris
            }
        }
        f => f,
    };
    let report = LoadReport { file: path.clone(), format, attached, unmatched_keys: parsed.unmatched, warnings: parsed.warnings, native };
    let file = AdapterFile { format, metadata: raw.metadata.clone(), modules: parsed.modules };
    Ok((file, report))
}
