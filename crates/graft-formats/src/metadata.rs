//! Header metadata: kohya's `ss_*` / `modelspec.*` / `sshs_*` keys, and the model hashes that
//! A1111 and its additional-networks extension compute.
//!
//! Hashes (kohya `library/train_util.py`, `precalculate_safetensors_hashes`): kohya serialises the
//! tensors with only the `ss_*` metadata, then
//! - `sshs_model_hash` = sha256 (hex) of everything after the header, i.e. the tensor data alone
//!   (so it does not change when metadata is edited), the same number A1111 computes for the file;
//! - `sshs_legacy_hash` = the first 8 hex digits of sha256 of the bytes 0x100000..0x110000 of that
//!   serialisation (empty past the end of a small file).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::write::{encode_file, Body};

pub const SDXL_BASE_MODEL_VERSION: &str = "sdxl_base_v1-0";
pub const SDXL_LORA_ARCHITECTURE: &str = "stable-diffusion-xl-v1-base/lora";
pub const SAI_MODEL_SPEC_VERSION: &str = "1.0.0";
/// What kohya writes as `modelspec.implementation` for SDXL.
pub const SDXL_IMPLEMENTATION: &str = "https://github.com/Stability-AI/generative-models";

/// What a kohya file says about its training. Everything but `output_name` is optional; the
/// network dim and alpha come from the modules.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaMetadata {
    /// `ss_output_name`: the name A1111 shows and `<lora:name:w>` can use.
    pub output_name: String,
    /// `modelspec.title` (defaults to the output name).
    pub title: Option<String>,
    /// `ss_network_module`.
    pub network_module: String,
    /// `ss_network_args` (a JSON object).
    pub network_args: serde_json::Map<String, serde_json::Value>,
    pub steps: Option<u64>,
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    /// `modelspec.implementation`.
    pub implementation: String,
    /// `modelspec.resolution`, e.g. `1024x1024`.
    pub resolution: Option<String>,
    /// Any further keys (e.g. `ss_training_comment`, `modelspec.date`); they win over the above.
    pub extra: BTreeMap<String, String>,
}

impl KohyaMetadata {
    pub fn new(output_name: impl Into<String>) -> Self {
        Self {
            output_name: output_name.into(),
            title: None,
            network_module: "networks.lora".into(),
            network_args: serde_json::Map::new(),
            steps: None,
            unet_lr: None,
            text_encoder_lr: None,
            implementation: SDXL_IMPLEMENTATION.into(),
            resolution: None,
            extra: BTreeMap::new(),
        }
    }

    /// The metadata for modules of ranks / alphas `dims` (one per module); `Dynamic` when they
    /// differ, as kohya's resize tool writes.
    pub fn to_map(&self, dims: &[(usize, f32)]) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let all_same = |v: Vec<String>| -> String {
            match v.first() {
                Some(f) if v.iter().all(|x| x == f) => f.clone(),
                Some(_) => "Dynamic".into(),
                None => "0".into(),
            }
        };
        m.insert("ss_network_dim".into(), all_same(dims.iter().map(|(r, _)| r.to_string()).collect()));
        m.insert("ss_network_alpha".into(), all_same(dims.iter().map(|(_, a)| py_float(*a as f64)).collect()));
        m.insert("ss_network_module".into(), self.network_module.clone());
        m.insert("ss_network_args".into(), serde_json::Value::Object(self.network_args.clone()).to_string());
        m.insert("ss_base_model_version".into(), SDXL_BASE_MODEL_VERSION.into());
        m.insert("ss_output_name".into(), self.output_name.clone());
        m.insert("ss_v2".into(), "False".into());
        if let Some(s) = self.steps {
            m.insert("ss_steps".into(), s.to_string());
        }
        if let Some(lr) = self.unet_lr {
            m.insert("ss_unet_lr".into(), py_float(lr));
        }
        if let Some(lr) = self.text_encoder_lr {
            m.insert("ss_text_encoder_lr".into(), py_float(lr));
        }
        m.insert("modelspec.sai_model_spec".into(), SAI_MODEL_SPEC_VERSION.into());
        m.insert("modelspec.architecture".into(), SDXL_LORA_ARCHITECTURE.into());
        m.insert("modelspec.implementation".into(), self.implementation.clone());
        m.insert("modelspec.title".into(), self.title.clone().unwrap_or_else(|| self.output_name.clone()));
        if let Some(r) = &self.resolution {
            m.insert("modelspec.resolution".into(), r.clone());
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// (`sshs_model_hash`, `sshs_legacy_hash`) of a body with this metadata, as kohya computes them.
pub fn kohya_hashes(body: &Body, metadata: &BTreeMap<String, String>) -> (String, String) {
    let model_hash = hex(&Sha256::digest(&body.data));
    let ss_only: BTreeMap<String, String> = metadata.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let file = encode_file(body, &ss_only);
    let start = 0x100000.min(file.len());
    let end = (0x100000 + 0x10000).min(file.len());
    let legacy = hex(&Sha256::digest(&file[start..end]))[..8].to_string();
    (model_hash, legacy)
}

/// sha256 (hex) of the data after the header of a safetensors file: A1111's and kohya's
/// "addnet" model hash. `None` when the bytes are not a safetensors layout.
pub fn addnet_hash(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let data = file.get(8usize.checked_add(n)?..)?;
    Some(hex(&Sha256::digest(data)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A float as Python's `str(float)` writes it (`8.0`, `0.0001`, `1e-05`): kohya's metadata values
/// are Python strings.
pub fn py_float(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Shortest round-trip digits, then Python's choice of notation (repr: scientific when the
    // exponent is < -4 or >= 16).
    let sci = format!("{v:e}"); // e.g. "1e-5", "1.25e3"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_strings() {
        assert_eq!(py_float(8.0), "8.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(5e-4), "0.0005");
        assert_eq!(py_float(1.5e-6), "1.5e-06");
        assert_eq!(py_float(32.0), "32.0");
        assert_eq!(py_float(0.3), "0.3");
        assert_eq!(py_float(1e16), "1e+16");
    }
}
