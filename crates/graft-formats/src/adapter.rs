//! The neutral in-memory form of an adapter file: one entry per graft layer, whatever file format
//! it came from or goes to, and the weight difference each entry stands for.
//!
//! Math (kohya, PEFT, LyCORIS, A1111 and ComfyUI agree; `m` is the user's multiplier):
//! - LoRA: `dW = m * alpha / r * up @ down`, down [r, in], up [out, r]; alpha missing or 0 means r.
//! - LoCon (LoRA on a conv [out, in, kh, kw]): down [r, in, kh, kw], up [out, r] (stored
//!   [out, r, 1, 1]): `dW = m * alpha / r * reshape(up @ reshape(down, [r, in*kh*kw]))`.
//!   With LyCORIS' Tucker decomposition: down [r, in] (stored [r, in, 1, 1]), mid [r, r, kh, kw],
//!   up [out, r]: `dW[o, i] = m * alpha / r * Σ_ab up[o, a] * mid[a, b] * down[b, i]` (the
//!   composition up ∘ mid ∘ down of the three convolutions).
//! - LoHa: `dW = m * alpha / r * (w1a @ w1b) * (w2a @ w2b)` (element-wise product), r = rows of w1b.
//! - LoKr: `dW = m * scale * kron(w1, w2)`, each factor full or `a @ b`; scale = alpha / r when a
//!   factor is split (r = columns of its `a`), and 1 when both are full (LyCORIS stores a dummy
//!   alpha then).
//! - Full: `dW = m * diff` (and `db = m * diff_b`).
//! - DoRA (`dora_scale`, on any of the above): `W_d = (W + dW_1) * s / ||W + dW_1||` with the norm
//!   per output row when `s` is [out, 1] (current LyCORIS, PEFT's magnitude vector [out]) or per
//!   input column when `s` is [1, in] (older LyCORIS); the result moves linearly with the
//!   multiplier: `W' = W + m * (W_d - W)` (A1111, ComfyUI).

use std::collections::BTreeMap;

use candle_core::{bail, DType, Result, Tensor, D};

/// Which family of keys a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterFormat {
    /// kohya sd-scripts: `lora_unet_*`, `lora_te1_*`, `lora_te2_*` with `lora_down`, `lora_up`, `alpha`.
    Kohya,
    /// PEFT / diffusers: `unet.<module>.lora_A.weight`, alpha in the header metadata.
    Peft,
    /// LyCORIS: kohya key names with LoHa, LoKr, full `diff` or DoRA tensors.
    Lycoris,
    /// graft-native: any tensors under `<layer>.<name>`, metadata `graft.strategy`.
    Native,
}

impl AdapterFormat {
    pub fn name(self) -> &'static str {
        match self {
            AdapterFormat::Kohya => "kohya",
            AdapterFormat::Peft => "peft",
            AdapterFormat::Lycoris => "lycoris",
            AdapterFormat::Native => "graft-native",
        }
    }
}

impl std::fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One factor of a LoKr product: a full matrix or a low-rank pair `a @ b`.
#[derive(Debug, Clone)]
pub enum LokrFactor {
    Full(Tensor),
    /// a [rows, r], b [r, cols]
    LowRank {
        a: Tensor,
        b: Tensor,
    },
}

impl LokrFactor {
    pub fn matrix(&self) -> Result<Tensor> {
        match self {
            LokrFactor::Full(w) => Ok(w.clone()),
            LokrFactor::LowRank { a, b } => a.matmul(b),
        }
    }

    /// The rank of a split factor.
    pub fn rank(&self) -> Option<usize> {
        match self {
            LokrFactor::Full(_) => None,
            LokrFactor::LowRank { a, .. } => a.dims().get(1).copied(),
        }
    }

    /// (rows, cols) of the matrix this factor stands for.
    pub fn shape(&self) -> Result<(usize, usize)> {
        match self {
            LokrFactor::Full(w) => w.dims2(),
            LokrFactor::LowRank { a, b } => Ok((a.dims2()?.0, b.dims2()?.1)),
        }
    }
}

/// The tensors of one adapted layer.
#[derive(Debug, Clone)]
pub enum AdapterWeights {
    /// down [r, in], up [out, r]; on a conv layer (LoCon) down [r, in, kh, kw], or with a
    /// Tucker `mid` [r, r, kh, kw] down [r, in].
    Lora {
        down: Tensor,
        up: Tensor,
        /// LyCORIS Tucker core of a conv LoCon (`lora_mid.weight`).
        mid: Option<Tensor>,
        alpha: Option<f32>,
    },
    /// w1_a, w2_a [out, r]; w1_b, w2_b [r, in].
    LoHa { w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, alpha: Option<f32> },
    /// kron(w1, w2) is [out, in].
    LoKr { w1: LokrFactor, w2: LokrFactor, alpha: Option<f32> },
    /// A full weight difference [out, in] and optionally a bias difference [out].
    Full { diff: Tensor, diff_b: Option<Tensor> },
    /// Tensors of a graft-native file, by parameter name; their meaning is the strategy's.
    Native { tensors: BTreeMap<String, Tensor> },
}

/// What kind of adapter an entry is (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    Lora,
    /// LoRA factors of a k x k convolution (kohya's LoCon).
    LoCon,
    /// LyCORIS' Tucker LoCon (`lora_mid`).
    LoConTucker,
    LoHa,
    LoKr,
    Full,
    Native,
}

impl ModuleKind {
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Lora => "lora",
            ModuleKind::LoCon => "locon",
            ModuleKind::LoConTucker => "locon-tucker",
            ModuleKind::LoHa => "loha",
            ModuleKind::LoKr => "lokr",
            ModuleKind::Full => "full",
            ModuleKind::Native => "native",
        }
    }
}

impl std::fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One adapted layer: its graft name (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`),
/// its tensors and an optional DoRA magnitude.
#[derive(Debug, Clone)]
pub struct ModuleWeights {
    pub layer: String,
    pub weights: AdapterWeights,
    /// DoRA magnitude: [out, 1] or [out] (per output row) or [1, in] (per input column).
    pub dora_scale: Option<Tensor>,
}

/// An adapter file in memory.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    pub format: AdapterFormat,
    /// The safetensors header metadata (all strings).
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<ModuleWeights>,
}

impl AdapterFile {
    pub fn module(&self, layer: &str) -> Option<&ModuleWeights> {
        self.modules.iter().find(|m| m.layer == layer)
    }
}

/// `alpha / r`, where a missing or zero alpha means r (scale 1).
pub fn lora_scale(alpha: Option<f32>, rank: usize) -> f64 {
    match alpha {
        Some(a) if a != 0.0 && rank > 0 => a as f64 / rank as f64,
        _ => 1.0,
    }
}

impl ModuleWeights {
    pub fn lora(layer: impl Into<String>, down: Tensor, up: Tensor, alpha: Option<f32>) -> Self {
        Self { layer: layer.into(), weights: AdapterWeights::Lora { down, up, mid: None, alpha }, dora_scale: None }
    }

    pub fn full(layer: impl Into<String>, diff: Tensor, diff_b: Option<Tensor>) -> Self {
        Self { layer: layer.into(), weights: AdapterWeights::Full { diff, diff_b }, dora_scale: None }
    }

    pub fn kind(&self) -> ModuleKind {
        match &self.weights {
            AdapterWeights::Lora { mid: Some(_), .. } => ModuleKind::LoConTucker,
            AdapterWeights::Lora { down, .. } if down.rank() == 4 => ModuleKind::LoCon,
            AdapterWeights::Lora { .. } => ModuleKind::Lora,
            AdapterWeights::LoHa { .. } => ModuleKind::LoHa,
            AdapterWeights::LoKr { .. } => ModuleKind::LoKr,
            AdapterWeights::Full { .. } => ModuleKind::Full,
            AdapterWeights::Native { .. } => ModuleKind::Native,
        }
    }

    /// The rank of a low-rank entry (LoRA, LoHa, split LoKr); `None` for full and native entries.
    pub fn rank(&self) -> Option<usize> {
        match &self.weights {
            AdapterWeights::Lora { down, .. } => down.dims().first().copied(),
            AdapterWeights::LoHa { w1_b, .. } => w1_b.dims().first().copied(),
            AdapterWeights::LoKr { w1, w2, .. } => w1.rank().or(w2.rank()),
            AdapterWeights::Full { .. } | AdapterWeights::Native { .. } => None,
        }
    }

    /// The alpha stored with the entry, if any.
    pub fn alpha(&self) -> Option<f32> {
        match &self.weights {
            AdapterWeights::Lora { alpha, .. } | AdapterWeights::LoHa { alpha, .. } | AdapterWeights::LoKr { alpha, .. } => *alpha,
            AdapterWeights::Full { .. } | AdapterWeights::Native { .. } => None,
        }
    }

    /// The factor the product of the entry's matrices is multiplied by (before the multiplier).
    pub fn scale(&self) -> f64 {
        match &self.weights {
            AdapterWeights::Lora { alpha, .. } | AdapterWeights::LoHa { alpha, .. } => lora_scale(*alpha, self.rank().unwrap_or(0)),
            AdapterWeights::LoKr { alpha, .. } => match self.rank() {
                Some(r) => lora_scale(*alpha, r),
                None => 1.0,
            },
            AdapterWeights::Full { .. } | AdapterWeights::Native { .. } => 1.0,
        }
    }

    /// The kernel size (kh, kw) of a conv entry (LoCon: a 4-d `down` or a Tucker `mid`); none
    /// for an entry of a linear layer (or of a 1x1 conv stored as matrices).
    pub fn kernel(&self) -> Option<(usize, usize)> {
        match &self.weights {
            AdapterWeights::Lora { mid: Some(m), .. } => m.dims4().ok().map(|(_, _, h, w)| (h, w)),
            AdapterWeights::Lora { down, .. } => down.dims4().ok().map(|(_, _, h, w)| (h, w)),
            AdapterWeights::Full { diff, .. } => diff.dims4().ok().map(|(_, _, h, w)| (h, w)),
            _ => None,
        }
    }

    /// True for a conv entry with a kernel larger than 1x1 or a Tucker core (LoCon).
    pub fn is_conv(&self) -> bool {
        self.kernel().is_some_and(|k| k != (1, 1)) || matches!(self.weights, AdapterWeights::Lora { mid: Some(_), .. })
    }

    /// (out, in) of the layer's weight, from the tensors (in / out channels for a conv entry).
    pub fn weight_shape(&self) -> Result<(usize, usize)> {
        match &self.weights {
            AdapterWeights::Lora { down, up, .. } => {
                let (out, inp) = (up.dims().first(), down.dims().get(1));
                match (out, inp) {
                    (Some(o), Some(i)) => Ok((*o, *i)),
                    _ => bail!("{}: LoRA tensors up {:?} / down {:?} have too few dimensions", self.layer, up.dims(), down.dims()),
                }
            }
            AdapterWeights::LoHa { w1_a, w1_b, .. } => Ok((w1_a.dims2()?.0, w1_b.dims2()?.1)),
            AdapterWeights::LoKr { w1, w2, .. } => {
                let (a, b) = w1.shape()?;
                let (c, d) = w2.shape()?;
                Ok((a * c, b * d))
            }
            // [out, in] or a conv's [out, in, kh, kw].
            AdapterWeights::Full { diff, .. } => match diff.dims() {
                [o, i] | [o, i, _, _] => Ok((*o, *i)),
                d => bail!("{}: `diff` must be [out, in] or [out, in, kh, kw], got shape {d:?}", self.layer),
            },
            AdapterWeights::Native { .. } => {
                bail!("{}: a graft-native entry has no weight shape of its own", self.layer)
            }
        }
    }

    /// Checks that a conv entry's kernel fits the layer's (`None`: the layer is linear).
    pub fn validate_kernel(&self, layer_kernel: Option<(usize, usize)>) -> Result<()> {
        let mine = self.kernel();
        match (mine, layer_kernel) {
            (None, None) | (None, Some((1, 1))) => Ok(()),
            (Some(k), Some(l)) if k == l => Ok(()),
            (Some(k), None) => bail!("{}: the adapter is a {}x{} conv (LoCon) entry but the layer is a linear", self.layer, k.0, k.1),
            (None, Some(l)) => bail!("{}: the adapter is for a linear (or 1x1) weight but the layer is a {}x{} conv", self.layer, l.0, l.1),
            (Some(k), Some(l)) => bail!("{}: the adapter's kernel is {}x{} but the layer's is {}x{}", self.layer, k.0, k.1, l.0, l.1),
        }
    }

    /// Checks that the tensors fit together (and the layer, when its (in, out) is known).
    pub fn validate(&self, layer_in_out: Option<(usize, usize)>) -> Result<()> {
        let name = &self.layer;
        let two = |what: &str, t: &Tensor| -> Result<(usize, usize)> {
            t.dims2().map_err(|_| candle_core::Error::Msg(format!("{name}: `{what}` must be a matrix, got shape {:?}", t.dims())))
        };
        match &self.weights {
            AdapterWeights::Lora { down, up, mid, .. } => {
                // down [r, in] or [r, in, kh, kw] (LoCon); with a Tucker mid, down is [r, in].
                let r = match (down.dims(), mid) {
                    ([r, _], _) => *r,
                    ([r, _, _, _], None) => *r,
                    (d, Some(_)) => bail!("{name}: a Tucker LoCon's lora_down must be [r, in] or [r, in, 1, 1], got shape {d:?}"),
                    (d, None) => bail!("{name}: lora_down must be [r, in] (linear) or [r, in, kh, kw] (conv), got shape {d:?}"),
                };
                let (_, r2) = two("up", up).map_err(|_| {
                    candle_core::Error::Msg(format!("{name}: lora_up must be [out, r] or [out, r, 1, 1], got shape {:?}", up.dims()))
                })?;
                if r != r2 {
                    bail!("{name}: LoRA down has rank {r} but up has rank {r2} (down {:?}, up {:?})", down.dims(), up.dims());
                }
                if let Some(m) = mid {
                    match m.dims() {
                        [a, b, _, _] if *a == r && *b == r => {}
                        d => bail!("{name}: lora_mid must be [r, r, kh, kw] with r = {r} (the rank of down and up), got shape {d:?}"),
                    }
                }
            }
            AdapterWeights::LoHa { w1_a, w1_b, w2_a, w2_b, .. } => {
                let (o1, r1) = two("hada_w1_a", w1_a)?;
                let (r1b, i1) = two("hada_w1_b", w1_b)?;
                let (o2, r2) = two("hada_w2_a", w2_a)?;
                let (r2b, i2) = two("hada_w2_b", w2_b)?;
                if r1 != r1b || r2 != r2b || o1 != o2 || i1 != i2 {
                    bail!(
                        "{name}: LoHa shapes do not fit: w1_a {:?}, w1_b {:?}, w2_a {:?}, w2_b {:?}",
                        w1_a.dims(),
                        w1_b.dims(),
                        w2_a.dims(),
                        w2_b.dims()
                    );
                }
            }
            AdapterWeights::LoKr { w1, w2, .. } => {
                for (what, f) in [("lokr_w1", w1), ("lokr_w2", w2)] {
                    match f {
                        LokrFactor::Full(w) => {
                            two(what, w)?;
                        }
                        LokrFactor::LowRank { a, b } => {
                            let (_, r) = two(&format!("{what}_a"), a)?;
                            let (rb, _) = two(&format!("{what}_b"), b)?;
                            if r != rb {
                                bail!("{name}: {what}_a {:?} and {what}_b {:?} do not fit", a.dims(), b.dims());
                            }
                        }
                    }
                }
            }
            AdapterWeights::Full { diff, diff_b } => {
                let o = match diff.dims() {
                    [o, _] | [o, _, _, _] => *o,
                    d => bail!("{name}: `diff` must be [out, in] or [out, in, kh, kw], got shape {d:?}"),
                };
                if let Some(b) = diff_b {
                    if b.dims() != [o] {
                        bail!("{name}: diff_b has shape {:?}, expected [{o}]", b.dims());
                    }
                }
            }
            AdapterWeights::Native { .. } => return Ok(()),
        }
        let (out, inp) = self.weight_shape()?;
        if let Some((lin, lout)) = layer_in_out {
            if (lin, lout) != (inp, out) {
                bail!(
                    "{name}: the adapter is for a [{out}, {inp}] weight but the layer is [{lout}, {lin}] \
                     (was the adapter made for another base model?)"
                );
            }
        }
        if let Some(s) = &self.dora_scale {
            let ok = s.dims() == [out] || s.dims() == [out, 1] || s.dims() == [1, inp];
            if !ok {
                bail!("{name}: dora_scale has shape {:?}; expected [{out}, 1] (per output row) or [1, {inp}] (per input column)", s.dims());
            }
        }
        Ok(())
    }

    /// The weight difference `dW` [out, in] at `multiplier`, in f32 ([out, in, kh, kw] for a
    /// LoCon entry; reshape to the layer's weight for a 1x1 conv). Not for DoRA entries (their
    /// difference depends on the base weight: use [`ModuleWeights::delta_for_base`]) nor native ones.
    pub fn delta_weight(&self, multiplier: f64) -> Result<Tensor> {
        if self.dora_scale.is_some() {
            bail!("{}: a DoRA entry's weight difference depends on the base weight: use delta_for_base", self.layer);
        }
        self.raw_delta(multiplier)
    }

    /// The bias difference at `multiplier` (full `diff_b` entries only).
    pub fn delta_bias(&self, multiplier: f64) -> Result<Option<Tensor>> {
        match &self.weights {
            AdapterWeights::Full { diff_b: Some(b), .. } => Ok(Some((f32(b)? * multiplier)?)),
            _ => Ok(None),
        }
    }

    /// The weight difference against the base weight [out, in]: the same as
    /// [`ModuleWeights::delta_weight`] without DoRA, and `W' - W` with it.
    pub fn delta_for_base(&self, base: &Tensor, multiplier: f64) -> Result<Tensor> {
        let Some(scale) = &self.dora_scale else {
            // A 1x1 conv entry stored as matrices: shaped like its base kernel.
            let d = self.raw_delta(multiplier)?;
            if d.dims() != base.dims() && d.elem_count() == base.elem_count() {
                return d.reshape(base.shape());
            }
            return Ok(d);
        };
        let base = f32(base)?;
        let merged = (&base + self.raw_delta(1.0)?)?;
        let (out, inp) = merged.dims2()?;
        let s = f32(scale)?;
        // Per output row ([out] or [out, 1]) unless the magnitude is laid out along the input.
        let decomposed = if s.dims() == [1, inp] && !(out == 1 && inp == 1) {
            let norm = merged.sqr()?.sum_keepdim(0)?.sqrt()?;
            merged.broadcast_mul(&s.broadcast_div(&norm)?)?
        } else {
            let s = s.reshape((out, 1))?;
            let norm = merged.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            merged.broadcast_mul(&s.broadcast_div(&norm)?)?
        };
        (decomposed - &base)? * multiplier
    }

    /// The merged weight `W'` for a base weight `W` [out, in].
    pub fn merged_weight(&self, base: &Tensor, multiplier: f64) -> Result<Tensor> {
        f32(base)? + self.delta_for_base(base, multiplier)?
    }

    fn raw_delta(&self, multiplier: f64) -> Result<Tensor> {
        let scale = self.scale() * multiplier;
        let product = match &self.weights {
            AdapterWeights::Lora { down, up, mid: None, .. } if down.rank() == 4 => {
                let (r, inp, kh, kw) = down.dims4()?;
                let out = up.dims2()?.0;
                f32(up)?.matmul(&f32(down)?.reshape((r, inp * kh * kw))?)?.reshape((out, inp, kh, kw))?
            }
            AdapterWeights::Lora { down, up, mid: Some(mid), .. } => tucker(&f32(up)?, &f32(mid)?, &f32(down)?)?,
            AdapterWeights::Lora { down, up, .. } => f32(up)?.matmul(&f32(down)?)?,
            AdapterWeights::LoHa { w1_a, w1_b, w2_a, w2_b, .. } => {
                let p1 = f32(w1_a)?.matmul(&f32(w1_b)?)?;
                let p2 = f32(w2_a)?.matmul(&f32(w2_b)?)?;
                (p1 * p2)?
            }
            AdapterWeights::LoKr { w1, w2, .. } => kron(&f32(&w1.matrix()?)?, &f32(&w2.matrix()?)?)?,
            AdapterWeights::Full { diff, .. } => f32(diff)?,
            AdapterWeights::Native { .. } => {
                bail!("{}: a graft-native entry has no weight difference of its own: its strategy plugin computes it", self.layer)
            }
        };
        product * scale
    }
}

/// `dW[o, i, h, w] = Σ_ab up[o, a] * mid[a, b, h, w] * down[b, i]`: up [out, r], mid
/// [r, r, kh, kw], down [r, in] -> [out, in, kh, kw] (LyCORIS' `rebuild_tucker`).
pub fn tucker(up: &Tensor, mid: &Tensor, down: &Tensor) -> Result<Tensor> {
    let (out, r) = up.dims2()?;
    let (_, _, kh, kw) = mid.dims4()?;
    let inp = down.dims2()?.1;
    // [out, r*kh*kw] = up @ mid(a; b, h, w) -> [out, kh*kw, r] @ down -> [out, kh*kw, in].
    let t = up.matmul(&mid.reshape((r, r * kh * kw))?)?.reshape((out, r, kh * kw))?.transpose(1, 2)?.contiguous()?;
    let t = t.broadcast_matmul(down)?;
    t.transpose(1, 2)?.contiguous()?.reshape((out, inp, kh, kw))
}

/// Kronecker product of two matrices: [a, b] x [c, d] -> [a*c, b*d].
pub fn kron(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (a, b) = x.dims2()?;
    let (c, d) = y.dims2()?;
    x.reshape((a, 1, b, 1))?.broadcast_mul(&y.reshape((1, c, 1, d))?)?.reshape((a * c, b * d))
}

fn f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}
