//! Writing safetensors files byte-for-byte reproducibly and atomically.
//!
//! The layout is the one the safetensors library writes (so hashes computed by kohya's tools over
//! the same tensors agree): an 8-byte little-endian header length, the JSON header (`__metadata__`
//! first, then the tensors in data order, compact, padded with spaces to a multiple of 8), then
//! the tensor data. Tensors are laid out sorted by name (every tensor of a file has one dtype,
//! which is also the order the library picks). Metadata keys are sorted too, so the same adapter
//! always gives the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};

/// The dtype tensors are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    fn tag(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::BF16 => "BF16",
        }
    }
}

/// The tensor part of a file: the header entries and the data bytes.
#[derive(Debug, Clone)]
pub struct Body {
    entries: Vec<(String, Vec<usize>, [usize; 2])>,
    dtype: StoreDtype,
    pub data: Vec<u8>,
}

/// Lays out the tensors (sorted by name) in `dtype`.
pub fn encode_body(tensors: &BTreeMap<String, Tensor>, dtype: StoreDtype) -> Result<Body> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut data = Vec::new();
    for (name, t) in tensors {
        let start = data.len();
        let values = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            bail!("refusing to write tensor `{name}`: it holds {bad}");
        }
        match dtype {
            StoreDtype::F32 => values.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            StoreDtype::F16 => values.iter().for_each(|v| data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            StoreDtype::BF16 => values.iter().for_each(|v| data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        entries.push((name.clone(), t.dims().to_vec(), [start, data.len()]));
    }
    Ok(Body { entries, dtype, data })
}

/// The JSON header, space-padded to a multiple of 8 bytes.
pub fn encode_header(body: &Body, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    use serde_json::{json, Map, Value};
    // serde_json's Map keeps insertion order only with `preserve_order`; build the text by hand.
    let mut text = String::from("{");
    let mut first = true;
    let mut push = |text: &mut String, key: &str, value: Value| {
        if !first {
            text.push(',');
        }
        first = false;
        text.push_str(&Value::String(key.to_string()).to_string());
        text.push(':');
        text.push_str(&value.to_string());
    };
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        push(&mut text, "__metadata__", Value::Object(m));
    }
    for (name, shape, offsets) in &body.entries {
        push(&mut text, name, json!({"dtype": body.dtype.tag(), "shape": shape, "data_offsets": offsets}));
    }
    text.push('}');
    let mut bytes = text.into_bytes();
    let pad = (8 - bytes.len() % 8) % 8;
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes
}

/// The whole file: header length, header, data.
pub fn encode_file(body: &Body, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let header = encode_header(body, metadata);
    let mut out = Vec::with_capacity(8 + header.len() + body.data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body.data);
    out
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed and synced,
/// then renamed over `path`. A crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |what: &str, e: std::io::Error| candle_core::Error::Msg(format!("{}: cannot {what}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Some(file_name) = path.file_name() else {
        bail!("{}: not a file path", path.display());
    };
    std::fs::create_dir_all(&dir).map_err(|e| err("create its folder", e))?;
    // Unique per process and call, so concurrent writers never share a temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| err("create a temporary file", e))?;
        f.write_all(bytes).map_err(|e| err("write", e))?;
        f.sync_all().map_err(|e| err("sync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| err("rename the temporary file", e))?;
        // The rename is durable once the folder entry is.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Encodes and writes a safetensors file atomically; returns the bytes written.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    dtype: StoreDtype,
) -> Result<Vec<u8>> {
    let body = encode_body(tensors, dtype)?;
    let bytes = encode_file(&body, metadata);
    write_atomic(path, &bytes)?;
    Ok(bytes)
}
