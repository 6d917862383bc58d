//! VarBuilder backends.
//!
//! - [`shape_only`]: builds a model without memory (every tensor a stride-0 view of one zero) and
//!   records what it asked for. Used to list hook points without weights (`graft layers`) and to
//!   check a weight file against what the model needs before loading anything, so that every
//!   missing key and wrong shape is reported at once.
//! - [`TensorSource`]: named tensors of one component, memory-mapped from safetensors files,
//!   possibly under other names (the single-file SGM layout), converted tensor by tensor to the
//!   chosen weight precision ([`WeightDtype`]) as they are built, so no second full copy exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::precision::WeightDtype;

/// The (name, shape) pairs a model requested while it was built.
pub type Requests = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

struct ShapeOnly {
    requests: Requests,
}

impl SimpleBackend for ShapeOnly {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.requests.lock().expect("requests lock").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("shape-only weights cannot provide `{name}` without a shape")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A VarBuilder whose tensors take no memory, and the list of what was requested through it.
pub fn shape_only(device: &Device) -> (VarBuilder<'static>, Requests) {
    let requests: Requests = Arc::default();
    let backend: Box<dyn SimpleBackend> = Box::new(ShapeOnly { requests: requests.clone() });
    (VarBuilder::from_backend(backend, DType::F32, device.clone()), requests)
}

/// How a stored tensor becomes the tensor the model asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    None,
    /// A slice of rows `start..start+len` (open_clip's fused `in_proj` holds q, k, v).
    Rows {
        start: usize,
        len: usize,
    },
    /// Stored transposed (open_clip's `text_projection`).
    Transpose,
    /// A 1x1 conv `[o, i, 1, 1]` used as a linear `[o, i]` (the SGM VAE attention).
    Conv1x1ToLinear,
}

/// Where a model name is stored: which file key, and how to transform it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub key: String,
    pub transform: Transform,
}

/// The tensors of one model component, memory-mapped.
#[derive(Clone)]
pub struct TensorSource {
    files: Arc<MmapedSafetensors>,
    paths: Vec<PathBuf>,
    /// Model name -> stored key. Names not in the map are looked up as they are.
    renames: Arc<HashMap<String, Stored>>,
    /// The file key prefix every lookup gets (the component prefix of a single file).
    description: String,
    /// The precision weights are kept in.
    dtype: WeightDtype,
}

/// True when a file that did not read as safetensors looks like a PyTorch pickle (`.ckpt`, `.pt`,
/// `.pth`, `.bin`, `.pkl`): by its name, or by its first bytes (a pickle's `\x80` protocol mark,
/// or torch.save's zip archive). graft never reads those: unpickling can run arbitrary code.
/// Ask only after a safetensors read failed (a safetensors header length can start the same way).
pub fn looks_like_pickle(path: &Path, head: &[u8]) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    ["ckpt", "pt", "pth", "bin", "pkl", "pickle"].contains(&ext.as_str())
        || head.starts_with(b"PK\x03\x04")
        || (head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]))
}

/// The error for a pickle file given where safetensors are expected.
pub fn pickle_error(path: &Path) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{}: this is a PyTorch pickle file; graft reads safetensors only, because loading a pickle can run \
         arbitrary code: use the .safetensors version of the file, or convert it in a trusted environment",
        path.display()
    ))
}

/// Opens safetensors files, with an error that names the file and says what to do.
pub fn open_safetensors(paths: &[PathBuf]) -> Result<MmapedSafetensors> {
    for p in paths {
        if !p.exists() {
            candle_core::bail!("{}: no such file", p.display());
        }
    }
    // Safety: the files are memory-mapped read-only; graft never writes to a model file it has open.
    unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| {
        for p in paths {
            let mut head = [0u8; 4];
            let n = std::fs::File::open(p).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
            // Safety: as above (read-only mapping), only to tell which file failed.
            if looks_like_pickle(p, &head[..n]) && unsafe { MmapedSafetensors::new(p) }.is_err() {
                return pickle_error(p);
            }
        }
        let names: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
        candle_core::Error::Msg(format!(
            "{}: not a readable safetensors file ({e}); the file is corrupt or truncated: download or export it again",
            names.join(", ")
        ))
    })
}

impl TensorSource {
    pub fn new(paths: Vec<PathBuf>, description: impl Into<String>) -> Result<Self> {
        let files = open_safetensors(&paths)?;
        Ok(Self { files: Arc::new(files), paths, renames: Arc::default(), description: description.into(), dtype: WeightDtype::File })
    }

    /// The same files, with weights loaded in `dtype`.
    pub fn with_dtype(mut self, dtype: WeightDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same files, with model names mapped to stored keys.
    pub fn with_renames(mut self, renames: HashMap<String, Stored>) -> Self {
        self.renames = Arc::new(renames);
        self
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Every key stored in the files.
    pub fn keys(&self) -> Vec<String> {
        self.files.tensors().into_iter().map(|(k, _)| k).collect()
    }

    fn stored(&self, name: &str) -> Stored {
        self.renames.get(name).cloned().unwrap_or_else(|| Stored { key: name.to_string(), transform: Transform::None })
    }

    /// The shape `name` will have once transformed, or `None` if it is not stored.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let stored = self.stored(name);
        let view = self.files.get(&stored.key).ok()?;
        let dims = view.shape().to_vec();
        Some(match stored.transform {
            Transform::None => dims,
            Transform::Rows { len, .. } => {
                let mut d = dims;
                d[0] = len;
                d
            }
            Transform::Transpose => dims.iter().rev().copied().collect(),
            Transform::Conv1x1ToLinear => dims.iter().take(2).copied().collect(),
        })
    }

    /// Loads `name` on `device`, in the precision [`WeightDtype::for_tensor`] gives it.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let stored = self.stored(name);
        let read_error =
            |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("{}: cannot read tensor `{}`: {e}", self.description, stored.key));
        let view = self.files.get(&stored.key).map_err(|e| read_error(&e))?;
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| read_error(&e))?;
        // The copy is made: give the mapped pages back, so the file does not stay resident too.
        release_pages(view.data());
        let t = t.to_dtype(self.dtype.for_tensor(t.dtype(), t.rank(), !device.is_cpu()))?;
        let t = match stored.transform {
            Transform::None => t,
            Transform::Rows { start, len } => t.narrow(0, start, len)?,
            Transform::Transpose => t.t()?,
            Transform::Conv1x1ToLinear => t.flatten_from(1)?,
        };
        t.contiguous()?.to_device(device)
    }

    /// Checks that every requested tensor is stored with the requested shape, and returns one error
    /// listing every missing key and every wrong shape.
    pub fn check(&self, requests: &[(String, Vec<usize>)]) -> Result<()> {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for (name, shape) in requests {
            match self.shape_of(name) {
                None => missing.push(self.stored(name).key),
                Some(s) if &s != shape => wrong.push(format!("{} is {:?}, expected {:?}", self.stored(name).key, s, shape)),
                Some(_) => {}
            }
        }
        if missing.is_empty() && wrong.is_empty() {
            return Ok(());
        }
        let mut msg =
            format!("{} does not fit the model architecture ({} missing keys, {} wrong shapes):", self.description, missing.len(), wrong.len());
        for m in missing.iter().take(20) {
            msg.push_str(&format!("\n  missing: {m}"));
        }
        if missing.len() > 20 {
            msg.push_str(&format!("\n  ... and {} more missing", missing.len() - 20));
        }
        for w in wrong.iter().take(20) {
            msg.push_str(&format!("\n  wrong shape: {w}"));
        }
        if wrong.len() > 20 {
            msg.push_str(&format!("\n  ... and {} more wrong shapes", wrong.len() - 20));
        }
        msg.push_str("\nIs this an SDXL model, and does its config match? Pass the matching diffusers config folder with --model-config.");
        candle_core::bail!("{msg}")
    }

    /// Stored keys that no request used (reported, so nothing is silently ignored).
    pub fn unused(&self, requests: &[(String, Vec<usize>)], key_filter: impl Fn(&str) -> bool) -> Vec<String> {
        let used: std::collections::HashSet<String> = requests.iter().map(|(n, _)| self.stored(n).key).collect();
        let mut unused: Vec<String> = self.keys().into_iter().filter(|k| key_filter(k) && !used.contains(k)).collect();
        unused.sort();
        unused
    }

    /// A VarBuilder over this source.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, DType::F32, device.clone())
    }
}

impl SimpleBackend for TensorSource {
    fn get(&self, s: Shape, name: &str, _h: Init, _dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.load(name, dev)?;
        if t.dims() != s.dims() {
            candle_core::bail!("{}: `{}` has shape {:?}, expected {:?}", self.description, self.stored(name).key, t.dims(), s.dims())
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }
}

/// Tells the kernel that the mapped file pages under `data` are no longer needed (they are read
/// again from the file if touched), so a model's resident memory is its weights, not weights plus
/// file.
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: `page_size` has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = (data.as_ptr() as usize).div_ceil(page) * page;
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: whole pages inside a read-only file mapping that nothing writes; after
            // MADV_DONTNEED a read faults the page back in from the file, so the bytes stay valid.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// True if `path` looks like a diffusers model folder.
pub fn is_diffusers_folder(path: &Path) -> bool {
    path.is_dir() && path.join("model_index.json").is_file()
}
