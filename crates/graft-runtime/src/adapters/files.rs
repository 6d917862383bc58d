//! Adapter files at the hook points: kohya, PEFT / diffusers and LyCORIS files (LoRA, LoHa,
//! LoKr, full `diff`, DoRA) attached to a model, unfused or fused, beside the plugin strategies of
//! an [`AdapterSet`] (graft-native files go there, through the strategy their metadata names).
//!
//! **Unfused.** At a linear hook point with file adapters the output becomes
//! `out + x @ Dᵀ @ Uᵀ + x @ ΔWᵀ + Δb`, where `out` is what the plugin strategies made of the
//! base output (or the base output itself):
//! - every plain LoRA entry attached there contributes its factors to one concatenated pair,
//!   `D = [down_1; down_2; ...]` [R, in] and `U = [m_1·s_1·up_1, m_2·s_2·up_2, ...]` [out, R]
//!   (`m` the user's weight for the component, `s = alpha / r`), so any number of LoRAs costs two
//!   thin matmuls per layer;
//! - every other entry (LoHa, LoKr, full diff, anything with DoRA) is its weight difference at
//!   the user's weight, summed into one `ΔW` [out, in] (DoRA's depends on the base weight: it is
//!   computed against the weight at attach time), and `diff_b` into `Δb`.
//!
//! At a conv hook point (LoCon, LyCORIS Tucker) every entry is its kernel difference, summed into
//! one `ΔW` [out, in, kh, kw], and the output becomes `out + conv(x, ΔW)` with the layer's stride
//! and padding: the same as convolving with `W + ΔW`.
//!
//! This is the A1111 / ComfyUI rule: the base weight plus the sum of every adapter's weighted
//! difference; kohya and PEFT compute a LoRA the same way (`W x + m·(alpha/r)·up(down(x))`).
//!
//! **Fused.** [`FileAdapters::fuse`] pushes the base weights plus `U @ D + ΔW` (and `Δb`) onto
//! the layer's stack of overrides ([`graft_sdxl::overrides`]); [`FileAdapters::unfuse`] pops
//! them, so the base weights are bit-identical afterwards, and so does dropping the
//! `FileAdapters`. Every file adapter has a weight difference, so all of them fuse.
//!
//! **Together with strategies.** [`FileAdapters::hooks`] wraps any [`PipelineHooks`] (usually an
//! [`AdapterSet`]'s): a hook point runs the inner hooks first, then adds the file adapters.
//! When both fuse, fuse the files first and unfuse them last ([`fuse_all`], [`unfuse_all`]);
//! unfuse the strategies before changing file adapters (their weights are put back in order).
//!
//! The adapter tensors stay on the CPU as read; what a hook point computes with is built from
//! them on the model's device whenever an adapter is added or its weights change.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use graft_formats::adapter::AdapterWeights;
use graft_formats::{read_adapter, AdapterFile, AdapterFormat, KeyMap, LoadReport};
use graft_sdxl::hooks::{HookRegistry, Hooks, LayerIndex, LayerInfo, SharedLinear};
use graft_sdxl::overrides::{Holder, OverrideKind};
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::{Component, PipelineHooks, SdxlModel};

use crate::adapters::dispatcher::{AdapterSet, StrategyId};
use crate::adapters::store::ParamKey;
use crate::error::Error;
use crate::plugins::{LoadedPlugin, StrategyInstance};

/// Component slots, in the order of `SdxlModel::registries()`.
const COMPONENTS: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];

fn slot_of(c: Component) -> usize {
    match c {
        Component::Unet => 0,
        Component::TextEncoder => 1,
        Component::TextEncoder2 => 2,
    }
}

/// One adapter file attached to the model.
#[derive(Debug, Clone)]
pub struct FileAdapter {
    /// The name it was asked for by (`<lora:name:w>`) or the file stem.
    pub name: String,
    pub path: PathBuf,
    pub file: AdapterFile,
    pub report: LoadReport,
    /// The user's weight on the text encoders and on the UNet.
    pub te_weight: f64,
    pub unet_weight: f64,
    /// A disabled adapter stays loaded and contributes nothing.
    pub enabled: bool,
}

impl FileAdapter {
    fn weight(&self, c: Component) -> f64 {
        if !self.enabled {
            return 0.0;
        }
        match c {
            Component::Unet => self.unet_weight,
            _ => self.te_weight,
        }
    }

    /// How many layers it attaches to, per component (UNet, text_encoder, text_encoder_2).
    pub fn counts(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for m in &self.file.modules {
            if let Some((c, _)) = graft_formats::keys::split_layer(&m.layer) {
                n[slot_of(c)] += 1;
            }
        }
        n
    }

    /// One line: what attached where.
    pub fn summary(&self) -> String {
        let [u, t1, t2] = self.counts();
        format!(
            "{} ({}): {} layers attached: {u} UNet, {t1} text_encoder, {t2} text_encoder_2",
            self.name,
            self.report.format,
            self.file.modules.len(),
        )
    }
}

/// What the entries at one hook point add, ready to compute with (on the model's device and
/// dtype). The forward is plain 2-D matmuls over the flattened tokens with transposed views of
/// the factors (as fast as pre-transposed copies, and attaching copies nothing).
#[derive(Debug, Clone)]
struct Compiled {
    /// Concatenated LoRA factors: down [R, in], up [out, R] with the weight and alpha / r
    /// folded into up.
    lora: Option<(Tensor, Tensor)>,
    /// Summed weight difference of the other entries [out, in].
    delta: Option<Tensor>,
    /// Summed bias difference [out].
    bias: Option<Tensor>,
}

impl Compiled {
    /// The whole weight difference [out, in] (and bias difference) this hook point adds.
    fn weight_delta(&self) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lora = match &self.lora {
            Some((down, up)) => Some(up.matmul(down)?),
            None => None,
        };
        let delta = match (lora, &self.delta) {
            (Some(a), Some(b)) => Some((a + b)?),
            (Some(a), None) => Some(a),
            (None, Some(b)) => Some(b.clone()),
            (None, None) => None,
        };
        Ok((delta, self.bias.clone()))
    }
}

/// A linear hook point.
#[derive(Debug)]
struct Slot {
    info: LayerInfo,
    weights: SharedLinear,
    /// (adapter, module index in its file).
    entries: Vec<(usize, usize)>,
    compiled: Option<Compiled>,
    /// Whether a fuse of ours is on the layer's stack.
    fused: bool,
}

/// The adapter files attached to one model.
pub struct FileAdapters {
    /// The owner of the fuses this pushes.
    holder: Holder,
    device: Device,
    keys: KeyMap,
    /// Per component, per hook point index: `None` for attention hook points.
    slots: [Vec<Option<Slot>>; 3],
    by_name: HashMap<String, (usize, LayerIndex)>,
    adapters: Vec<FileAdapter>,
}

/// The SGM layout of a loaded model (kohya's UNet module names).
pub fn model_layout(model: &SdxlModel) -> crate::Result<SgmLayout> {
    Ok(SgmLayout::from_configs(&model.config.unet, &model.config.vae, &model.config.text_encoder_2)?)
}

impl FileAdapters {
    /// Nothing attached yet, over `model`'s hook points.
    pub fn new(model: &SdxlModel) -> crate::Result<Self> {
        Ok(Self::from_registries(model.registries(), &model_layout(model)?, &model.device))
    }

    /// Over any registries (UNet, text_encoder, text_encoder_2), e.g. a lone transformer block.
    pub fn from_registries(registries: [&HookRegistry; 3], layout: &SgmLayout, device: &Device) -> Self {
        let mut all = Vec::new();
        let mut by_name = HashMap::new();
        let slots = std::array::from_fn(|c| {
            let reg = registries[c];
            reg.layers()
                .iter()
                .enumerate()
                .map(|(i, info)| {
                    all.push(info.clone());
                    let w = reg.linear_weights(i)?;
                    by_name.insert(info.name.clone(), (c, i));
                    Some(Slot { info: info.clone(), weights: w.clone(), entries: Vec::new(), compiled: None, fused: false })
                })
                .collect()
        });
        Self {
            holder: Holder::new("adapter files"),
            device: device.clone(),
            keys: KeyMap::from_layers(&all, layout),
            slots,
            by_name,
            adapters: Vec::new(),
        }
    }

    /// The layer names of this model in every file format.
    pub fn keys(&self) -> &KeyMap {
        &self.keys
    }

    pub fn adapters(&self) -> &[FileAdapter] {
        &self.adapters
    }

    /// The index of the adapter read from `path`, if it is attached.
    pub fn find(&self, path: &Path) -> Option<usize> {
        self.adapters.iter().position(|a| a.path == path)
    }

    /// Reads an adapter file and attaches it at the given weights. A graft-native file is an
    /// error here: it goes through its strategy ([`add_native`]).
    pub fn load(&mut self, path: &Path, name: &str, te_weight: f64, unet_weight: f64) -> crate::Result<usize> {
        let (file, report) = read_adapter(path, &self.keys).map_err(Error::Read)?;
        self.add(name, path, file, report, te_weight, unet_weight)
    }

    /// Attaches an adapter file already read against [`FileAdapters::keys`].
    pub fn add(
        &mut self,
        name: &str,
        path: &Path,
        file: AdapterFile,
        report: LoadReport,
        te_weight: f64,
        unet_weight: f64,
    ) -> crate::Result<usize> {
        if file.format == AdapterFormat::Native {
            return Err(file_error(
                path,
                None,
                format!(
                    "a graft-native file is applied by its strategy plugin (`{}`), not as a weight file",
                    file.metadata.get("graft.strategy").map(String::as_str).unwrap_or("?")
                ),
            ));
        }
        check_weights(name, te_weight, unet_weight)?;
        let a = self.adapters.len();
        let mut touched = Vec::new();
        for (m, module) in file.modules.iter().enumerate() {
            let layer = Some(module.layer.as_str());
            let Some(&(c, i)) = self.by_name.get(&module.layer) else {
                return Err(file_error(path, layer, format!("layer `{}` is not a linear hook point of this model", module.layer)));
            };
            let Some(slot) = self.slots[c][i].as_ref() else {
                return Err(file_error(path, layer, format!("layer `{}` is an attention module, not a linear or conv layer", module.layer)));
            };
            let (inp, out) = (slot.info.in_features, slot.info.out_features);
            let refused = |cause| Error::AdapterModule { path: path.to_path_buf(), cause };
            module.validate(Some((inp, out))).map_err(refused)?;
            module.validate_kernel(slot.info.conv.map(|k| k.kernel)).map_err(refused)?;
            if slot.info.conv.is_some() && module.dora_scale.is_some() {
                return Err(file_error(path, layer, format!("`{}`: DoRA on a convolution is not supported", module.layer)));
            }
            touched.push((c, i, m));
        }
        let was_fused = self.is_fused();
        self.unfuse();
        for (c, i, m) in touched {
            if let Some(slot) = self.slots[c][i].as_mut() {
                slot.entries.push((a, m));
            }
        }
        self.adapters.push(FileAdapter {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            report,
            te_weight,
            unet_weight,
            enabled: true,
        });
        self.recompile(&[a])?;
        if was_fused {
            self.fuse()?;
        }
        Ok(a)
    }

    /// Changes the weights of adapter `a` (and enables it).
    pub fn set_weights(&mut self, a: usize, te_weight: f64, unet_weight: f64) -> crate::Result<()> {
        let ad = self.adapters.get(a).ok_or(Error::NoFileAdapter(a))?;
        check_weights(&ad.name, te_weight, unet_weight)?;
        if ad.enabled && ad.te_weight == te_weight && ad.unet_weight == unet_weight {
            return Ok(());
        }
        self.change(a, |ad| {
            ad.te_weight = te_weight;
            ad.unet_weight = unet_weight;
            ad.enabled = true;
        })
    }

    /// Enables or disables adapter `a` (a disabled one stays loaded).
    pub fn set_enabled(&mut self, a: usize, enabled: bool) -> crate::Result<()> {
        let ad = self.adapters.get(a).ok_or(Error::NoFileAdapter(a))?;
        if ad.enabled == enabled {
            return Ok(());
        }
        self.change(a, |ad| ad.enabled = enabled)
    }

    fn change(&mut self, a: usize, f: impl FnOnce(&mut FileAdapter)) -> crate::Result<()> {
        let was_fused = self.is_fused();
        self.unfuse();
        f(&mut self.adapters[a]);
        self.recompile(&[a])?;
        if was_fused {
            self.fuse()?;
        }
        Ok(())
    }

    /// Rebuilds the hook points adapters `changed` attach to (the model must be unfused).
    fn recompile(&mut self, changed: &[usize]) -> Result<()> {
        let mut todo = BTreeSet::new();
        for (c, slots) in self.slots.iter().enumerate() {
            for (i, s) in slots.iter().enumerate() {
                if let Some(s) = s {
                    if s.entries.iter().any(|(a, _)| changed.contains(a)) {
                        todo.insert((c, i));
                    }
                }
            }
        }
        for (c, i) in todo {
            let compiled = self.compile(c, i)?;
            if let Some(s) = self.slots[c][i].as_mut() {
                s.compiled = compiled;
            }
        }
        Ok(())
    }

    fn compile(&self, c: usize, i: usize) -> Result<Option<Compiled>> {
        let Some(slot) = &self.slots[c][i] else { return Ok(None) };
        let component = COMPONENTS[c];
        let base = slot.weights.current().weight;
        // Activations are f32 whatever precision the base weight is kept in.
        let dtype = DType::F32;
        let mut downs = Vec::new();
        let mut ups = Vec::new();
        let mut delta: Option<Tensor> = None;
        let mut bias: Option<Tensor> = None;
        let mut base_cpu: Option<Tensor> = None;
        for &(a, m) in &slot.entries {
            let ad = &self.adapters[a];
            let weight = ad.weight(component);
            if weight == 0.0 {
                continue;
            }
            let module = &ad.file.modules[m];
            if slot.info.conv.is_some() {
                // A conv: every entry as its kernel difference, shaped like the base kernel.
                let d = module.delta_weight(weight)?.reshape(base.shape())?;
                delta = Some(match delta {
                    Some(t) => (t + d)?,
                    None => d,
                });
                continue;
            }
            match (&module.weights, &module.dora_scale) {
                (AdapterWeights::Lora { down, up, mid: None, .. }, None) if down.rank() == 2 => {
                    let scale = module.scale() * weight;
                    downs.push(down.to_dtype(DType::F32)?);
                    ups.push((up.to_dtype(DType::F32)? * scale)?);
                }
                _ => {
                    let d = if module.dora_scale.is_some() {
                        if base_cpu.is_none() {
                            base_cpu = Some(base.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
                        }
                        module.delta_for_base(base_cpu.as_ref().expect("set above"), weight)?
                    } else {
                        module.delta_weight(weight)?
                    };
                    delta = Some(match delta {
                        Some(t) => (t + d)?,
                        None => d,
                    });
                    if let Some(db) = module.delta_bias(weight)? {
                        bias = Some(match bias {
                            Some(t) => (t + db)?,
                            None => db,
                        });
                    }
                }
            }
        }
        let put = |t: Tensor| -> Result<Tensor> { t.to_device(&self.device)?.to_dtype(dtype) };
        let lora = match downs.len() {
            0 => None,
            1 => Some((put(downs.remove(0))?, put(ups.remove(0))?)),
            _ => Some((put(Tensor::cat(&downs, 0)?)?, put(Tensor::cat(&ups, 1)?)?)),
        };
        let delta = delta.map(put).transpose()?;
        let bias = bias.map(put).transpose()?;
        if lora.is_none() && delta.is_none() && bias.is_none() {
            return Ok(None);
        }
        Ok(Some(Compiled { lora, delta, bias }))
    }

    /// True when something is attached (and not fused) at hook point `layer` of component `c`.
    fn active(&self, c: usize, layer: LayerIndex) -> bool {
        matches!(self.slots[c].get(layer), Some(Some(s)) if s.compiled.is_some() && !s.fused)
    }

    /// Adds the file adapters' contribution to `out`, the output of hook point `layer`.
    fn apply(&self, c: usize, layer: LayerIndex, input: &Tensor, out: Tensor) -> Result<Tensor> {
        let Some(Some(slot)) = self.slots[c].get(layer) else { return Ok(out) };
        let (Some(k), false) = (&slot.compiled, slot.fused) else { return Ok(out) };
        // Tokens flattened: [.., in] -> [n, in].
        let in_f = input.dim(candle_core::D::Minus1)?;
        // The adapters are f32; bf16 activations (on a GPU) are widened for them.
        let x = input.reshape((input.elem_count() / in_f.max(1), in_f))?.to_dtype(candle_core::DType::F32)?;
        let mut add: Option<Tensor> = None;
        if let Some((down, up)) = &k.lora {
            add = Some(x.matmul(&down.t()?)?.matmul(&up.t()?)?);
        }
        if let Some(d) = &k.delta {
            let y = x.matmul(&d.t()?)?;
            add = Some(match add {
                Some(a) => (a + y)?,
                None => y,
            });
        }
        let mut out = match add {
            Some(a) => {
                let a = a.reshape(out.shape())?.to_dtype(out.dtype())?;
                (out + a)?
            }
            None => out,
        };
        if let Some(b) = &k.bias {
            out = out.broadcast_add(&b.to_dtype(out.dtype())?)?;
        }
        Ok(out)
    }

    /// Adds the file adapters' contribution at conv hook point `layer`: `out + conv(x, ΔW)`.
    fn apply_conv(&self, c: usize, layer: LayerIndex, input: &Tensor, padding: usize, out: Tensor) -> Result<Tensor> {
        let Some(Some(slot)) = self.slots[c].get(layer) else { return Ok(out) };
        let (Some(k), false) = (&slot.compiled, slot.fused) else { return Ok(out) };
        let stride = slot.info.conv.map_or(1, |g| g.stride);
        let mut out = out;
        if let Some(d) = &k.delta {
            let y = input.to_dtype(DType::F32)?.conv2d(d, padding, stride, 1, 1)?.to_dtype(out.dtype())?;
            out = (out + y)?;
        }
        if let Some(b) = &k.bias {
            out = out.broadcast_add(&b.to_dtype(out.dtype())?.reshape((1, (), 1, 1))?)?;
        }
        Ok(out)
    }

    /// True when some hook point is fused.
    pub fn is_fused(&self) -> bool {
        self.slots.iter().flatten().flatten().any(|s| s.fused)
    }

    /// Folds every attached adapter into the base weights; returns how many hook points changed.
    pub fn fuse(&mut self) -> crate::Result<usize> {
        self.fuse_where(|_| true)
    }

    /// As [`FileAdapters::fuse`] for the hook points whose info satisfies `pred` (the others stay
    /// unfused); fusing a hook point twice is a no-op.
    pub fn fuse_where(&mut self, pred: impl Fn(&LayerInfo) -> bool) -> crate::Result<usize> {
        let mut n = 0;
        let owner = self.holder.owner(None, OverrideKind::Fuse);
        for slot in self.slots.iter_mut().flatten().flatten() {
            if slot.fused || !pred(&slot.info) {
                continue;
            }
            let Some(k) = &slot.compiled else { continue };
            let (delta, bias) = k.weight_delta()?;
            let mut w = slot.weights.current();
            if let Some(d) = delta {
                w.weight = w.plus(&d)?;
            }
            if let Some(db) = bias {
                w.bias = Some(match &w.bias {
                    Some(b) => (b + db)?,
                    None => db,
                });
            }
            slot.weights.push(owner.clone(), w)?;
            slot.fused = true;
            n += 1;
        }
        Ok(n)
    }

    /// Pops what [`FileAdapters::fuse`] pushed (the tensors below come back: bit-identical);
    /// returns how many hook points. A hook point where another owner's override is on top of
    /// the fuse stays fused (an error is logged, naming both); dropping `self` takes it out.
    pub fn unfuse(&mut self) -> usize {
        let mut n = 0;
        let owner = self.holder.owner(None, OverrideKind::Fuse);
        for slot in self.slots.iter_mut().flatten().flatten().filter(|s| s.fused) {
            match slot.weights.pop(&owner) {
                Ok(_) => {
                    slot.fused = false;
                    n += 1;
                }
                Err(e) => tracing::error!("unfuse: {e}"),
            }
        }
        n
    }

    /// The hooks of each component: `inner` first, then the file adapters.
    pub fn hooks<'a>(&'a self, inner: PipelineHooks<'a>) -> FileHooks<'a> {
        FileHooks {
            unet: ComponentFileHooks { files: self, c: 0, inner: inner.unet },
            te1: ComponentFileHooks { files: self, c: 1, inner: inner.text_encoder },
            te2: ComponentFileHooks { files: self, c: 2, inner: inner.text_encoder_2 },
        }
    }
}

/// Dropped adapters take their fuses with them.
impl Drop for FileAdapters {
    fn drop(&mut self) {
        for slot in self.slots.iter().flatten().flatten().filter(|s| s.fused) {
            slot.weights.drop_holder(self.holder.id());
        }
    }
}

fn check_weights(name: &str, te: f64, unet: f64) -> crate::Result<()> {
    if !te.is_finite() || !unet.is_finite() {
        return Err(Error::AdapterWeights { name: name.to_string(), te, unet });
    }
    Ok(())
}

fn file_error(path: &Path, layer: Option<&str>, problem: String) -> Error {
    Error::AdapterFile { path: path.to_path_buf(), layer: layer.map(str::to_string), problem }
}

/// The file adapters of one component over its inner hooks.
pub struct ComponentFileHooks<'a> {
    files: &'a FileAdapters,
    c: usize,
    inner: &'a dyn Hooks,
}

impl Hooks for ComponentFileHooks<'_> {
    fn attached(&self, layer: LayerIndex) -> bool {
        self.inner.attached(layer) || self.files.active(self.c, layer)
    }

    fn linear(&self, layer: LayerIndex, input: &Tensor, base_out: Tensor) -> Result<Tensor> {
        let out = if self.inner.attached(layer) { self.inner.linear(layer, input, base_out)? } else { base_out };
        self.files.apply(self.c, layer, input, out)
    }

    fn conv(&self, layer: LayerIndex, input: &Tensor, padding: usize, base_out: Tensor) -> Result<Tensor> {
        let out = if self.inner.attached(layer) { self.inner.conv(layer, input, padding, base_out)? } else { base_out };
        self.files.apply_conv(self.c, layer, input, padding, out)
    }

    fn attention(&self, layer: LayerIndex, hidden: &Tensor, context: Option<&Tensor>, out: Tensor) -> Result<Tensor> {
        if self.inner.attached(layer) {
            self.inner.attention(layer, hidden, context, out)
        } else {
            Ok(out)
        }
    }

    fn random_state(&self) -> Option<graft_sdxl::rng::RngState> {
        self.inner.random_state()
    }

    fn set_random_state(&self, state: graft_sdxl::rng::RngState) {
        self.inner.set_random_state(state)
    }
}

/// The three components' hooks; [`FileHooks::pipeline`] hands them to the pipeline.
pub struct FileHooks<'a> {
    pub unet: ComponentFileHooks<'a>,
    pub te1: ComponentFileHooks<'a>,
    pub te2: ComponentFileHooks<'a>,
}

impl FileHooks<'_> {
    pub fn pipeline(&self) -> PipelineHooks<'_> {
        PipelineHooks { unet: &self.unet, text_encoder: &self.te1, text_encoder_2: &self.te2 }
    }
}

/// Fuses the file adapters, then what the strategies can fuse; returns the hook points changed
/// by each.
pub fn fuse_all(files: &mut FileAdapters, set: &mut AdapterSet) -> crate::Result<(usize, usize)> {
    let f = files.fuse()?;
    let s = set.fuse()?;
    Ok((f, s))
}

/// Undoes [`fuse_all`] in reverse order, so every base weight is the loaded tensor again.
pub fn unfuse_all(files: &mut FileAdapters, set: &mut AdapterSet) {
    set.unfuse();
    files.unfuse();
}

/// What [`add_native`] did with a graft-native file.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeReport {
    /// The strategy's index in the set.
    pub strategy: StrategyId,
    /// Parameters set from the file.
    pub set: usize,
    /// Parameters of the strategy's plan the file has no tensor for (left at their init).
    pub missing: Vec<String>,
    /// Tensors of the file that are no parameter of the plan (`<layer>.<name>`).
    pub unmatched: Vec<String>,
    pub warnings: Vec<String>,
}

impl NativeReport {
    pub fn summary(&self, name: &str) -> String {
        let mut s = format!("{name}: {} parameters set through its strategy", self.set);
        for w in &self.warnings {
            s.push_str(&format!("\n  warning: {w}"));
        }
        if !self.missing.is_empty() {
            s.push_str(&format!("\n  warning: {} parameters of the plan have no tensor in the file (left at their init):", self.missing.len()));
            for k in &self.missing {
                s.push_str(&format!("\n    {k}"));
            }
        }
        if !self.unmatched.is_empty() {
            s.push_str(&format!("\n  warning: {} tensors matched no parameter:", self.unmatched.len()));
            for k in &self.unmatched {
                s.push_str(&format!("\n    {k}"));
            }
        }
        s
    }
}

/// Attaches a graft-native file through its strategy: creates the strategy of `plugin` with the
/// config the file names, adds it to `set` under `name` at the given weights, and sets its
/// parameters from the file's tensors (`<layer>.<param>`). Errors when no tensor is a parameter
/// of the plan.
pub fn add_native(
    set: &mut AdapterSet,
    plugin: &LoadedPlugin,
    name: &str,
    path: &Path,
    file: &AdapterFile,
    te_weight: f64,
    unet_weight: f64,
) -> crate::Result<NativeReport> {
    check_weights(name, te_weight, unet_weight)?;
    let info = graft_formats::NativeInfo::from_metadata(&file.metadata, path)
        .map_err(Error::Read)?
        .ok_or_else(|| file_error(path, None, "not a graft-native file (no `graft.strategy` metadata)".to_string()))?;
    let mut warnings = Vec::new();
    if !info.version.is_empty() && info.version != plugin.manifest.version {
        warnings.push(format!("written by {} {}, read with {} {}", info.strategy, info.version, plugin.manifest.id, plugin.manifest.version));
    }
    let config = if info.config.is_null() { "{}".to_string() } else { info.config.to_string() };
    let in_file = |what: String| move |e: Error| Error::InFile { path: path.to_path_buf(), what, cause: Box::new(e) };
    let instance = StrategyInstance::new(plugin, Some(name), &config).map_err(|e| file_error(path, None, e.to_string()))?;
    let (s, _) = set.add(instance, te_weight, unet_weight).map_err(in_file(format!("strategy `{}`", info.strategy)))?;
    let mut planned: BTreeSet<ParamKey> = set.store().params(Some(name)).into_iter().map(|(k, _)| k).collect();
    let mut n = 0;
    let mut unmatched = Vec::new();
    for module in &file.modules {
        let AdapterWeights::Native { tensors } = &module.weights else {
            return Err(file_error(path, Some(&module.layer), format!("`{}` is not a graft-native entry", module.layer)));
        };
        for (param, t) in tensors {
            let key = ParamKey::new(name, &module.layer, param);
            if planned.remove(&key) {
                set.store().set(&key, t).map_err(in_file(format!("`{}.{param}`", module.layer)))?;
                n += 1;
            } else {
                unmatched.push(format!("{}.{param}", module.layer));
            }
        }
    }
    if n == 0 {
        return Err(file_error(
            path,
            None,
            format!(
                "no tensor of this graft-native file is a parameter of strategy `{}` with the file's config \
                 (e.g. {}); was it written by another version of the plugin?",
                info.strategy,
                unmatched.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let missing = planned.into_iter().map(|k| format!("{}.{}", k.layer, k.name)).collect();
    Ok(NativeReport { strategy: s, set: n, missing, unmatched, warnings })
}
