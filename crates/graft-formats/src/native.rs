//! graft-native files: adapters no other tool's key family can express (a gated attention patch,
//! say). Tensors are stored under `<layer>.<name>` (`unet.mid_block.attentions.0.transformer_blocks.0.attn1.A`),
//! and the header says which strategy plugin reads them:
//! - `graft.strategy`: the plugin id (required),
//! - `graft.version`: the plugin version that wrote the file,
//! - `graft.config`: the plugin's config (JSON),
//! - `graft.format`: the version of this layout (`1`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, Result, Tensor};

use crate::adapter::{AdapterWeights, ModuleWeights};
use crate::keys::KeyMap;
use crate::kohya::Written;
use crate::load::Parsed;
use crate::read::RawFile;
use crate::write::{write_safetensors, StoreDtype};

pub const STRATEGY_KEY: &str = "graft.strategy";
pub const VERSION_KEY: &str = "graft.version";
pub const CONFIG_KEY: &str = "graft.config";
pub const FORMAT_KEY: &str = "graft.format";
pub const FORMAT_VERSION: &str = "1";

/// Which strategy wrote a native file, and with what config.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeInfo {
    pub strategy: String,
    pub version: String,
    pub config: serde_json::Value,
}

impl NativeInfo {
    /// From a file's metadata; `None` when it is not a graft-native file.
    pub fn from_metadata(metadata: &BTreeMap<String, String>, path: &Path) -> Result<Option<Self>> {
        let Some(strategy) = metadata.get(STRATEGY_KEY) else {
            return Ok(None);
        };
        if strategy.trim().is_empty() {
            bail!("{}: header metadata `{STRATEGY_KEY}` is empty", path.display());
        }
        let config = match metadata.get(CONFIG_KEY) {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| candle_core::Error::Msg(format!("{}: header metadata `{CONFIG_KEY}` is not valid JSON: {e}", path.display())))?,
            None => serde_json::Value::Null,
        };
        Ok(Some(Self { strategy: strategy.clone(), version: metadata.get(VERSION_KEY).cloned().unwrap_or_default(), config }))
    }

    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(STRATEGY_KEY.into(), self.strategy.clone());
        m.insert(VERSION_KEY.into(), self.version.clone());
        m.insert(CONFIG_KEY.into(), canonical_json(&self.config));
        m.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
        m
    }
}

/// JSON with object keys sorted at every level, so a config always gives the same bytes.
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// Groups the tensors of a native file by layer (the longest known layer name before a `.`).
pub(crate) fn parse(raw: &RawFile, keys: &KeyMap) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut groups: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in &raw.tensors {
        match keys.split_native_key(key) {
            Some((layer, name)) if !name.is_empty() => {
                groups.entry(layer.to_string()).or_default().insert(name.to_string(), t.clone());
            }
            _ => parsed.unmatched.push(key.clone()),
        }
    }
    parsed.modules = groups
        .into_iter()
        .map(|(layer, tensors)| ModuleWeights { layer, weights: AdapterWeights::Native { tensors }, dora_scale: None })
        .collect();
    Ok(parsed)
}

/// Writes a graft-native file. Entries must be [`AdapterWeights::Native`].
pub fn write_native(path: &Path, info: &NativeInfo, modules: &[ModuleWeights], dtype: StoreDtype) -> Result<Written> {
    if info.strategy.trim().is_empty() {
        bail!("{}: a graft-native file needs a strategy id", path.display());
    }
    let mut tensors = BTreeMap::new();
    for m in modules {
        let AdapterWeights::Native { tensors: ts } = &m.weights else {
            bail!(
                "{}: `{}` is a {} entry; write it to a kohya, PEFT or LyCORIS file, or wrap its tensors as native",
                path.display(),
                m.layer,
                m.kind()
            );
        };
        for (name, t) in ts {
            if name.is_empty() {
                bail!("{}: `{}` has a tensor with an empty name", path.display(), m.layer);
            }
            let key = format!("{}.{name}", m.layer);
            if tensors.insert(key.clone(), t.clone()).is_some() {
                bail!("{}: key `{key}` is written twice", path.display());
            }
        }
    }
    if tensors.is_empty() {
        bail!("{}: nothing to write: no tensors", path.display());
    }
    let metadata = info.to_metadata();
    let bytes = write_safetensors(path, &tensors, &metadata, dtype)?;
    Ok(Written { bytes: bytes.len(), metadata, tensors: tensors.len() })
}
