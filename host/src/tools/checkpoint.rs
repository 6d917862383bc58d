//! Reading an SDXL checkpoint (diffusers folder or single SGM file) tensor by tensor and writing a
//! changed copy in either layout, streamed: one tensor in memory at a time, unchanged tensors
//! copied byte for byte from the memory map.
//!
//! Every stored tensor is seen as one or more *parts* in diffusers terms (component, name): a
//! single-file key maps through [`SgmLayout::from_sgm`] (OpenCLIP's fused `in_proj` holds the
//! q, k and v parts), a diffusers key is its own part. The caller's `change` function sees each
//! linear part by graft layer name and may return a new tensor for it; the parts are then put
//! back into the target layout ([`Transform::to_sgm`], [`fuse_rows`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use graft_formats::StoreDtype;
use graft_sdxl::sgm::{fuse_rows, SgmComponent, SgmLayout, Transform};
use graft_sdxl::varbuilder::open_safetensors;
use safetensors::{Dtype, View};

/// One diffusers-level tensor of the source.
#[derive(Debug, Clone)]
struct Part {
    component: SgmComponent,
    /// The diffusers name relative to the component folder, as the target diffusers file gets it.
    name: String,
    /// The graft layer of a linear `weight` / `bias`, and whether it is the bias.
    layer: Option<(String, bool)>,
    file: usize,
    key: String,
    transform: Transform,
}

/// A checkpoint opened for reading.
pub struct CheckpointSource {
    pub path: PathBuf,
    pub single: bool,
    files: Vec<MmapedSafetensors>,
    parts: Vec<Part>,
    /// Single-file keys outside the name map (position ids, logit scale, EMA, ...): kept in a
    /// single-file target, dropped from a diffusers one.
    extras: Vec<String>,
    layout: SgmLayout,
    pub metadata: BTreeMap<String, String>,
}

/// The graft layer name of a linear `weight` / `bias` part (`None` for other tensors).
fn layer_of(component: SgmComponent, name: &str) -> Option<(String, bool)> {
    let (module, bias) = if let Some(m) = name.strip_suffix(".weight") {
        (m, false)
    } else if let Some(m) = name.strip_suffix(".bias") {
        (m, true)
    } else {
        return None;
    };
    let layer = match component {
        SgmComponent::Unet => format!("unet.{module}"),
        SgmComponent::TextEncoder | SgmComponent::TextEncoder2 => {
            let prefix = if component == SgmComponent::TextEncoder { "text_encoder" } else { "text_encoder_2" };
            // transformers 5 files lack the `text_model.` level that graft's names have.
            match module.strip_prefix("text_model.") {
                Some(rest) => format!("{prefix}.text_model.{rest}"),
                None => format!("{prefix}.text_model.{module}"),
            }
        }
        SgmComponent::Vae => return None,
    };
    Some((layer, bias))
}

/// The weight files of a diffusers component folder (full precision first, then `.fp16` /
/// `.bf16` variants, sharded through their index).
fn component_files(dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors"), format!("{stem}.bf16.safetensors")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&index)?).with_context(|| format!("{}: invalid index", index.display()))?;
            let mut shards: Vec<String> =
                json["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
            shards.sort();
            shards.dedup();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
    }
    bail!("{}: no {stem}.safetensors (or .fp16 / .bf16 variant) found", dir.display())
}

fn weight_stem(c: SgmComponent) -> &'static str {
    match c {
        SgmComponent::Unet | SgmComponent::Vae => "diffusion_pytorch_model",
        SgmComponent::TextEncoder | SgmComponent::TextEncoder2 => "model",
    }
}

impl CheckpointSource {
    /// Opens a diffusers folder or a single-file checkpoint whose UNet / VAE / text encoder 2
    /// follow `layout`.
    pub fn open(path: &Path, layout: &SgmLayout) -> anyhow::Result<Self> {
        if path.is_dir() {
            Self::open_folder(path, layout)
        } else if path.is_file() {
            Self::open_single(path, layout)
        } else {
            bail!("{}: no such file or folder (expected an SDXL diffusers folder or .safetensors checkpoint)", path.display())
        }
    }

    fn open_folder(dir: &Path, layout: &SgmLayout) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        let mut parts = Vec::new();
        for c in SgmComponent::ALL {
            let paths = component_files(&dir.join(c.diffusers_folder()), weight_stem(c))?;
            let st = open_safetensors(&paths)?;
            let mut keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
            keys.sort();
            for key in keys {
                parts.push(Part {
                    component: c,
                    layer: layer_of(c, &key),
                    name: key.clone(),
                    file: files.len(),
                    key,
                    transform: Transform::None,
                });
            }
            files.push(st);
        }
        Ok(Self { path: dir.to_path_buf(), single: false, files, parts, extras: Vec::new(), layout: layout.clone(), metadata: BTreeMap::new() })
    }

    fn open_single(file: &Path, layout: &SgmLayout) -> anyhow::Result<Self> {
        let st = open_safetensors(&[file.to_path_buf()])?;
        let metadata = crate::generate::lora_dir::read_header_metadata(file)?;
        let mut keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
        keys.sort();
        if graft_sdxl::sgm::detect(&keys).is_none() {
            bail!("{}: not an SDXL single-file checkpoint (no model.diffusion_model.* keys)", file.display());
        }
        let mut parts = Vec::new();
        let mut extras = Vec::new();
        for key in keys {
            match layout.from_sgm(&key) {
                Some((c, names)) => {
                    for name in names {
                        let Some(k) = layout.to_sgm(c, &name) else {
                            bail!("{}: `{key}` maps to `{name}`, which maps back to no key", file.display());
                        };
                        parts.push(Part { component: c, layer: layer_of(c, &name), name, file: 0, key: key.clone(), transform: k.transform });
                    }
                }
                None => extras.push(key),
            }
        }
        Ok(Self { path: file.to_path_buf(), single: true, files: vec![st], parts, extras, layout: layout.clone(), metadata })
    }

    /// The graft layers whose weights the checkpoint holds.
    pub fn layers(&self) -> BTreeSet<String> {
        self.parts.iter().filter_map(|p| p.layer.as_ref()).filter(|(_, b)| !b).map(|(l, _)| l.clone()).collect()
    }

    fn view(&self, file: usize, key: &str) -> anyhow::Result<safetensors::tensor::TensorView<'_>> {
        Ok(self.files[file].get(key)?)
    }

    /// A part as the diffusers tensor (f32).
    fn load_part(&self, p: &Part) -> anyhow::Result<Tensor> {
        let stored = self.files[p.file].load(&p.key, &Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(p.transform.to_diffusers(&stored)?)
    }
}

/// Where a merged checkpoint goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// One `.safetensors` file in the original (SGM) layout.
    Single(PathBuf),
    /// A diffusers folder; configs, tokenizers and scheduler are copied from `configs` (a
    /// diffusers folder).
    Diffusers { dir: PathBuf, configs: PathBuf },
}

/// One tensor to write: its key, the parts it is made of, and the stored tensor it equals when
/// nothing changes (copied byte for byte then).
struct Out {
    key: String,
    parts: Vec<usize>,
    raw: Option<(usize, String)>,
    /// `Transform` to the target layout: `None` for diffusers targets.
    to_sgm: Option<Transform>,
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// Parts (diffusers tensors) the change function replaced.
    pub changed: usize,
    /// Single-file keys a diffusers target has no place for.
    pub dropped: Vec<String>,
}

/// What a merge does to the linear parts.
pub trait Change {
    /// Does it change the weight (or, `bias`, the bias) of `layer`? Nothing is loaded otherwise.
    fn touches(&self, layer: &str, bias: bool) -> bool;
    /// The new tensor for the part, from the stored one (f32, diffusers layout).
    fn apply(&self, layer: &str, bias: bool, base: &Tensor) -> anyhow::Result<Tensor>;
}

/// Writes the source with `change` applied, in the target layout; `dtype` converts every float
/// tensor (default: each keeps its stored dtype).
pub fn write(
    src: &CheckpointSource,
    target: &Target,
    change: &dyn Change,
    dtype: Option<StoreDtype>,
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<Written> {
    let mut written = Written::default();
    match target {
        Target::Single(path) => {
            let mut outs: BTreeMap<String, Out> = BTreeMap::new();
            for (i, p) in src.parts.iter().enumerate() {
                let Some(k) = src.layout.to_sgm(p.component, &p.name) else {
                    bail!("`{}` of {} has no single-file key", p.name, p.component.diffusers_folder());
                };
                let e = outs.entry(k.name.clone()).or_insert_with(|| Out {
                    key: k.name.clone(),
                    parts: Vec::new(),
                    raw: None,
                    to_sgm: Some(k.transform.clone()),
                });
                e.parts.push(i);
            }
            for o in outs.values_mut() {
                // Fused rows go in the order the layout lists them (q, k, v).
                if o.parts.len() > 1 {
                    let order = src.layout.from_sgm(&o.key).map(|(_, n)| n).unwrap_or_default();
                    o.parts.sort_by_key(|&i| order.iter().position(|n| *n == src.parts[i].name).unwrap_or(usize::MAX));
                }
                if src.single {
                    o.raw = Some((0, o.key.clone()));
                } else if o.parts.len() == 1 && matches!(o.to_sgm, Some(Transform::None)) {
                    let p = &src.parts[o.parts[0]];
                    o.raw = Some((p.file, p.key.clone()));
                }
            }
            if src.single {
                for k in &src.extras {
                    outs.insert(k.clone(), Out { key: k.clone(), parts: Vec::new(), raw: Some((0, k.clone())), to_sgm: None });
                }
            }
            let outs: Vec<Out> = outs.into_values().collect();
            let n = write_file(src, &outs, path, change, dtype, metadata, &mut written)?;
            written.tensors += n;
            written.files.push(path.clone());
        }
        Target::Diffusers { dir, configs } => {
            if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
                bail!("{}: the output folder exists and is not empty; give a new folder", dir.display());
            }
            copy_configs(configs, dir)?;
            for c in SgmComponent::ALL {
                let outs: Vec<Out> = src
                    .parts
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.component == c)
                    .map(|(i, p)| Out {
                        key: p.name.clone(),
                        parts: vec![i],
                        raw: matches!(p.transform, Transform::None).then(|| (p.file, p.key.clone())),
                        to_sgm: None,
                    })
                    .collect();
                let mut outs = outs;
                outs.sort_by(|a, b| a.key.cmp(&b.key));
                let path = dir.join(c.diffusers_folder()).join(format!("{}.safetensors", weight_stem(c)));
                let mut meta = BTreeMap::new();
                meta.insert("format".to_string(), "pt".to_string());
                let n = write_file(src, &outs, &path, change, dtype, &meta, &mut written)?;
                written.tensors += n;
                written.files.push(path);
            }
            written.dropped = src.extras.clone();
        }
    }
    Ok(written)
}

/// Copies the non-weight files of a diffusers folder (model_index.json, configs, tokenizers,
/// scheduler).
fn copy_configs(from: &Path, to: &Path) -> anyhow::Result<()> {
    if !from.join("model_index.json").is_file() {
        bail!(
            "{}: not a diffusers folder (no model_index.json); a diffusers output needs one to copy configs, \
             tokenizers and scheduler from (--model-config)",
            from.display()
        );
    }
    fn walk(from: &Path, to: &Path, depth: usize) -> anyhow::Result<()> {
        std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && depth == 0 {
                walk(&p, &to.join(&name), 1)?;
            } else if p.is_file() && !name.ends_with(".safetensors") && !name.ends_with(".bin") && !name.ends_with(".index.json") {
                std::fs::copy(&p, to.join(&name)).with_context(|| format!("cannot copy {}", p.display()))?;
            }
        }
        Ok(())
    }
    walk(from, to, 0)
}

fn store_dtype(d: StoreDtype) -> Dtype {
    match d {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::F16 => Dtype::F16,
        StoreDtype::BF16 => Dtype::BF16,
    }
}

fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

fn diffusers_shape(stored: &[usize], t: &Transform) -> Vec<usize> {
    match (t, stored) {
        (Transform::Rows { len, .. }, [_, rest @ ..]) => std::iter::once(*len).chain(rest.iter().copied()).collect(),
        (Transform::Transpose, [a, b]) => vec![*b, *a],
        (Transform::Conv1x1ToLinear, [o, i, 1, 1]) => vec![*o, *i],
        _ => stored.to_vec(),
    }
}

/// The shape and dtype an output gets (without loading anything).
fn shape_dtype(src: &CheckpointSource, o: &Out, dtype: Option<StoreDtype>) -> anyhow::Result<(Vec<usize>, Dtype)> {
    let (shape, stored) = match (&o.raw, o.parts.first()) {
        (Some((f, k)), _) => {
            let v = src.view(*f, k)?;
            (v.shape().to_vec(), v.dtype())
        }
        (None, Some(&i)) => {
            let part_shape = |i: usize| -> anyhow::Result<Vec<usize>> {
                let p = &src.parts[i];
                Ok(diffusers_shape(src.view(p.file, &p.key)?.shape(), &p.transform))
            };
            let p = &src.parts[i];
            let dt = src.view(p.file, &p.key)?.dtype();
            let shape = match &o.to_sgm {
                Some(_) if o.parts.len() > 1 => {
                    let mut s = part_shape(o.parts[0])?;
                    s[0] = o.parts.iter().map(|&i| part_shape(i).map(|s| s[0])).sum::<anyhow::Result<usize>>()?;
                    s
                }
                Some(Transform::Transpose) => part_shape(i)?.into_iter().rev().collect(),
                Some(Transform::Conv1x1ToLinear) => {
                    let s = part_shape(i)?;
                    vec![s[0], s[1], 1, 1]
                }
                _ => part_shape(i)?,
            };
            (shape, dt)
        }
        (None, None) => bail!("`{}` has nothing to write", o.key),
    };
    let out = match dtype {
        Some(d) if is_float(stored) => store_dtype(d),
        _ => stored,
    };
    Ok((shape, out))
}

/// The parts of an output as diffusers tensors when `change` replaces any of them; `None` when
/// all stay as stored.
fn changed_parts(src: &CheckpointSource, o: &Out, change: &dyn Change) -> anyhow::Result<Option<Vec<Tensor>>> {
    let mut loaded = Vec::with_capacity(o.parts.len());
    let mut any = false;
    for &i in &o.parts {
        let p = &src.parts[i];
        match &p.layer {
            Some((layer, bias)) if change.touches(layer, *bias) => {
                let base = src.load_part(p)?;
                let new = change.apply(layer, *bias, &base)?;
                if new.dims() != base.dims() {
                    bail!("{layer}: the changed tensor has shape {:?}, the stored one {:?}", new.dims(), base.dims());
                }
                any = true;
                loaded.push(Some(new));
            }
            _ => loaded.push(None),
        }
    }
    if !any {
        return Ok(None);
    }
    let parts = o
        .parts
        .iter()
        .zip(loaded)
        .map(|(&i, t)| match t {
            Some(t) => Ok(t),
            None => src.load_part(&src.parts[i]),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(parts))
}

/// Builds an output tensor from its (changed) parts in the target layout.
fn assemble(o: &Out, parts: Vec<Tensor>, shape: &[usize]) -> anyhow::Result<Tensor> {
    let t = match (&o.to_sgm, parts.len()) {
        (Some(_), n) if n > 1 => fuse_rows(&parts)?,
        (Some(t), _) => t.to_sgm(&parts[0])?,
        (None, _) => parts.into_iter().next().context("no part")?,
    };
    // A stored tensor keeps its stored shape (e.g. a VAE projection stored as a matrix).
    Ok(t.reshape(shape)?)
}

fn write_file(
    src: &CheckpointSource,
    outs: &[Out],
    path: &Path,
    change: &dyn Change,
    dtype: Option<StoreDtype>,
    metadata: &BTreeMap<String, String>,
    written: &mut Written,
) -> anyhow::Result<usize> {
    // First pass: shapes and dtypes (changed tensors are computed once, in the second pass).
    let mut entries = Vec::with_capacity(outs.len());
    let mut offset = 0usize;
    for o in outs {
        let (shape, dt) = shape_dtype(src, o, dtype)?;
        let size = shape.iter().product::<usize>() * dt.bitsize() / 8;
        entries.push((o.key.clone(), dt, shape, [offset, offset + size]));
        offset += size;
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut text = String::from("{");
    let mut first = true;
    if let Some(m) = header.get("__metadata__") {
        text.push_str(&format!("\"__metadata__\":{m}"));
        first = false;
    }
    for (k, dt, shape, offs) in &entries {
        if !first {
            text.push(',');
        }
        first = false;
        let v = serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": offs});
        text.push_str(&format!("{}:{v}", serde_json::Value::String(k.clone())));
    }
    text.push('}');
    let mut head = text.into_bytes();
    head.extend(std::iter::repeat_n(b' ', (8 - head.len() % 8) % 8));

    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp =
        dir.join(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp)?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for (o, (key, dt, shape, offs)) in outs.iter().zip(&entries) {
            let changed = changed_parts(src, o, change)?;
            let bytes: Cow<[u8]> = match changed {
                Some(parts) => {
                    written.changed += o.parts.len();
                    let t = assemble(o, parts, shape)?;
                    let t = t.to_dtype(candle_dtype(*dt).context("float dtype")?)?;
                    Cow::Owned(View::data(&t).into_owned())
                }
                None => {
                    let (f_idx, k) = match &o.raw {
                        Some(r) => r.clone(),
                        None => {
                            // A layout change without a changed part: build it from the parts.
                            let parts = o.parts.iter().map(|&i| src.load_part(&src.parts[i])).collect::<anyhow::Result<Vec<_>>>()?;
                            let t = assemble(o, parts, shape)?.to_dtype(candle_dtype(*dt).context("float dtype")?)?;
                            let data = View::data(&t).into_owned();
                            f.write_all(&data)?;
                            continue;
                        }
                    };
                    let v = src.view(f_idx, &k)?;
                    if v.dtype() == *dt {
                        Cow::Owned(v.data().to_vec())
                    } else {
                        let t = src.files[f_idx].load(&k, &Device::Cpu)?.to_dtype(candle_dtype(*dt).context("float dtype")?)?;
                        Cow::Owned(View::data(&t).into_owned())
                    }
                }
            };
            if bytes.len() != offs[1] - offs[0] {
                bail!("`{key}`: {} bytes to write, the header says {}", bytes.len(), offs[1] - offs[0]);
            }
            f.write_all(&bytes)?;
        }
        let file = f.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))?;
    Ok(outs.len())
}
