//! Reading a safetensors file into f32 tensors and its header metadata, with errors that name the
//! file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{bail, Device, Result, Tensor};
use safetensors::{Dtype, SafeTensors};

/// A safetensors file in memory: every tensor converted to f32 (on the CPU), sorted by key.
#[derive(Debug, Clone)]
pub struct RawFile {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl RawFile {
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }
}

/// Reads a whole safetensors file. F16, BF16, F32 and F64 tensors become f32; any other dtype is
/// an error naming the key. A missing, truncated or corrupt file is an error naming the file.
pub fn read_file(path: &Path) -> Result<RawFile> {
    let bytes = std::fs::read(path).map_err(|e| candle_core::Error::Msg(format!("{}: cannot read the adapter file: {e}", path.display())))?;
    read_bytes(&bytes, path)
}

/// As [`read_file`] on bytes already read; `path` names them in errors.
pub fn read_bytes(bytes: &[u8], path: &Path) -> Result<RawFile> {
    let bad = |e: &dyn std::fmt::Display| {
        candle_core::Error::Msg(format!(
            "{}: not a valid safetensors file ({e}); is it truncated or corrupt? Download or export it again",
            path.display()
        ))
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        if graft_sdxl::varbuilder::looks_like_pickle(path, &bytes[..bytes.len().min(4)]) {
            graft_sdxl::varbuilder::pickle_error(path)
        } else {
            bad(&e)
        }
    })?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(&e))?;
    let metadata: BTreeMap<String, String> =
        header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data()).map_err(|what| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has dtype {what}; adapter tensors must be float (F16, BF16, F32 or F64)",
                path.display()
            ))
        })?;
        let shape = view.shape().to_vec();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
        tensors.insert(name, t);
    }
    Ok(RawFile { path: path.to_path_buf(), metadata, tensors })
}

fn to_f32(dtype: Dtype, data: &[u8]) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
        other => return Err(format!("{other:?}")),
    })
}

/// The value of a scalar tensor (shape [] or [1]), e.g. a kohya `.alpha`.
pub fn scalar(t: &Tensor, key: &str, path: &Path) -> Result<f32> {
    if t.elem_count() != 1 {
        bail!("{}: `{key}` should hold one number, got shape {:?}", path.display(), t.dims());
    }
    let v = t.flatten_all()?.to_vec1::<f32>()?[0];
    if !v.is_finite() {
        bail!("{}: `{key}` is {v}, not a finite number", path.display());
    }
    Ok(v)
}

/// Drops trailing 1x1 kernel dimensions ([r, in, 1, 1] -> [r, in]): some tools store linear LoRA
/// factors that way.
pub fn as_matrix(t: &Tensor) -> Result<Tensor> {
    match t.dims() {
        [a, b, 1, 1] => t.reshape((*a, *b)),
        _ => Ok(t.clone()),
    }
}
