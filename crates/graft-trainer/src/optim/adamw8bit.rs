//! AdamW8bit, bitsandbytes' `bnb.optim.AdamW8bit` (kohya's `AdamW8bit`): AdamW whose two moments
//! are stored as 8-bit codes, block-wise quantized (the reference is bitsandbytes' CPU backend,
//! version pinned in tools/reference/requirements.txt):
//! - the dynamic quantization map (`create_dynamic_map`): 256 values in [-1, 1] whose exponent
//!   shrinks as the fraction grows, signed for `exp_avg` (from -0.99297 to 1), unsigned (0 to 1,
//!   finer) for `exp_avg_sq`;
//! - blocks of 256 values, each with its absolute maximum (f32) as scale; a value is stored as
//!   the index of the map entry nearest to value / absmax (ties to the lower one);
//! - per step: dequantize, one AdamW update in f32 with the moments as they come out of it,
//!   quantize again with each block's new absmax;
//! - parameters with fewer than `min_8bit_size` (4096) weights keep 32-bit moments, as bnb does.
//!
//! The 8-bit state lives in host memory and the update of such a parameter runs on the CPU (the
//! parameter and its gradient make a round trip): 2 bytes + 8 bytes per 256 weights of state.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;

use super::spec::{Args, GroupOverrides};
use super::{Item, ParamState, SlotSpec};

/// Values per quantization block (bnb's blocksize for 8-bit blockwise optimizers).
pub const BLOCK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamW8bitArgs {
    /// Parameters with fewer weights keep 32-bit moments.
    pub min_8bit_size: usize,
}

impl Default for AdamW8bitArgs {
    fn default() -> Self {
        Self { min_8bit_size: 4096 }
    }
}

/// `[optimizer_args]`: `weight_decay`, `betas`, `eps`, `min_8bit_size` (bitsandbytes' names).
pub(super) fn parse_args(a: &mut Args) -> Result<(GroupOverrides, AdamW8bitArgs)> {
    let groups = super::adamw::parse_args(a)?;
    let min_8bit_size = match a.integer("min_8bit_size")? {
        Some(n) if n < 0 => return Err(a.err("min_8bit_size", format!("{n} must be >= 0"))),
        Some(n) => n as usize,
        None => AdamW8bitArgs::default().min_8bit_size,
    };
    Ok((groups, AdamW8bitArgs { min_8bit_size }))
}

/// torch.linspace's float32 values: from the start for the first half, from the end for the rest.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// bitsandbytes' dynamic map (8 bits, 7 exponent bits).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    // 10^(i - 6) for i in 0..7, as Python writes them (then rounded to f32 by torch).
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, scale) in SCALES.iter().enumerate() {
        let items = if signed { (1 << i) + 1 } else { (1 << (i + 1)) + 1 };
        let bounds = linspace(0.1, 1.0, items);
        let scale = *scale as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// The index of the map entry nearest to `x` (the lower one on a tie), as bnb's CPU quantizer
/// finds it: the last entry <= x, then the next one if strictly closer.
fn nearest(map: &[f32; 256], x: f32) -> u8 {
    let i = map.partition_point(|c| *c <= x).saturating_sub(1);
    if i < 255 && (x - map[i + 1]).abs() < (x - map[i]).abs() {
        (i + 1) as u8
    } else {
        i as u8
    }
}

/// Block-wise quantization: codes and one absmax per block of `BLOCK` values.
pub fn quantize(values: &[f32], map: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK));
    for block in values.chunks(BLOCK) {
        let amax = block.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
        absmax.push(amax);
        // An all-zero block has absmax 0: any code dequantizes to 0; take the one of 0.
        codes.extend(block.iter().map(|v| if amax > 0.0 { nearest(map, v / amax) } else { nearest(map, 0.0) }));
    }
    (codes, absmax)
}

pub fn dequantize(codes: &[u8], absmax: &[f32], map: &[f32; 256]) -> Vec<f32> {
    codes.chunks(BLOCK).zip(absmax).flat_map(|(block, s)| block.iter().map(move |c| map[*c as usize] * s)).collect()
}

#[derive(Debug, Clone)]
pub(super) struct AdamW8bit {
    args: AdamW8bitArgs,
    signed: [f32; 256],
    unsigned: [f32; 256],
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

impl AdamW8bit {
    pub fn new(args: AdamW8bitArgs) -> Self {
        Self { args, signed: dynamic_map(true), unsigned: dynamic_map(false) }
    }

    fn is_8bit(&self, var: &Var) -> bool {
        var.elem_count() >= self.args.min_8bit_size
    }

    pub fn slots(&self, var: &Var) -> Vec<SlotSpec> {
        if !self.is_8bit(var) {
            return super::adamw::slots(var);
        }
        let codes = |name| SlotSpec { name, shapes: vec![var.dims().to_vec()], dtype: DType::U8, on_cpu: true };
        let blocks = vec![var.elem_count().div_ceil(BLOCK)];
        let absmax = |name| SlotSpec { name, shapes: vec![blocks.clone()], dtype: DType::F32, on_cpu: true };
        vec![codes("state1"), absmax("absmax1"), codes("state2"), absmax("absmax2")]
    }

    pub fn init(&self, var: &Var) -> Result<ParamState> {
        if !self.is_8bit(var) {
            return super::adamw::init(var);
        }
        let slots = self
            .slots(var)
            .into_iter()
            .map(|s| Ok((s.name, Tensor::zeros(s.shapes[0].as_slice(), s.dtype, &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamState::new(slots))
    }

    pub fn update(&self, it: &mut Item<'_>) -> Result<()> {
        if self.is_8bit(it.var) {
            self.update_8bit(it)
        } else {
            update_32bit(it)
        }
    }

    fn update_8bit(&self, it: &mut Item<'_>) -> Result<()> {
        let cfg = it.cfg;
        let (b1, b2) = cfg.betas;
        let step = it.state.step + 1;
        let g = host_f32(&it.grad)?;
        let mut p = host_f32(it.var.as_tensor())?;
        let codes = |slot: &str| -> Result<Vec<u8>> { Ok(it.state.get(slot)?.flatten_all()?.to_vec1::<u8>()?) };
        let scales = |slot: &str| -> Result<Vec<f32>> { Ok(it.state.get(slot)?.to_vec1::<f32>()?) };
        let mut m = dequantize(&codes("state1")?, &scales("absmax1")?, &self.signed);
        let mut v = dequantize(&codes("state2")?, &scales("absmax2")?, &self.unsigned);

        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let (c1, c2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        let corr1 = 1.0 - b1.powi(step as i32);
        let corr2 = (1.0 - b2.powi(step as i32)).sqrt();
        let (corr2f, eps) = (corr2 as f32, cfg.eps as f32);
        let decay = (it.lr * cfg.weight_decay > 0.0).then_some((1.0 - it.lr * cfg.weight_decay) as f32);
        let step_size = (-it.lr / corr1) as f32;
        for i in 0..p.len() {
            m[i] = m[i] * b1f + g[i] * c1;
            v[i] = v[i] * b2f + c2 * g[i] * g[i];
            let denom = v[i].sqrt() / corr2f + eps;
            if let Some(d) = decay {
                p[i] *= d;
            }
            p[i] += step_size * (m[i] / denom);
        }

        let dims = it.var.dims().to_vec();
        let (q1, a1) = quantize(&m, &self.signed);
        let (q2, a2) = quantize(&v, &self.unsigned);
        let blocks = a1.len();
        it.state.set("state1", Tensor::from_vec(q1, dims.as_slice(), &Device::Cpu)?);
        it.state.set("absmax1", Tensor::from_vec(a1, blocks, &Device::Cpu)?);
        it.state.set("state2", Tensor::from_vec(q2, dims.as_slice(), &Device::Cpu)?);
        it.state.set("absmax2", Tensor::from_vec(a2, blocks, &Device::Cpu)?);
        let p = Tensor::from_vec(p, dims.as_slice(), &Device::Cpu)?.to_dtype(it.var.dtype())?.to_device(it.var.device())?;
        it.var.set(&p)?;
        it.state.step = step;
        Ok(())
    }
}

/// bitsandbytes' 32-bit Adam for small parameters (same math as torch's AdamW, arranged as bnb
/// arranges it: `eps` is scaled by the second bias correction instead of dividing by it).
fn update_32bit(it: &mut Item<'_>) -> Result<()> {
    let cfg = it.cfg;
    let (b1, b2) = cfg.betas;
    let (lr, g) = (it.lr, &it.grad);
    let step = it.state.step + 1;
    let m = it.state.get("exp_avg")?.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
    let v = it.state.get("exp_avg_sq")?.affine(b2, 0.0)?.add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?;
    let corr1 = 1.0 - b1.powi(step as i32);
    let corr2 = (1.0 - b2.powi(step as i32)).sqrt();
    let mut p = it.var.as_tensor().detach();
    if lr * cfg.weight_decay > 0.0 {
        p = p.affine(1.0 - lr * cfg.weight_decay, 0.0)?;
    }
    let update = m.div(&v.sqrt()?.affine(1.0, cfg.eps * corr2)?)?;
    p = p.add(&update.affine(-lr * corr2 / corr1, 0.0)?)?;
    it.var.set(&p)?;
    it.state.set("exp_avg", m);
    it.state.set("exp_avg_sq", v);
    it.state.step = step;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_span_minus_one_to_one() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "signed map strictly increasing");
        assert!(u.windows(2).all(|w| w[0] < w[1]), "unsigned map strictly increasing");
        assert_eq!((s[255], u[0], u[255]), (1.0, 0.0, 1.0));
        assert!((s[0] + 0.99297).abs() < 1e-5, "{}", s[0]);
        assert!(s.contains(&0.0) && u[1] > 0.0 && u[1] < 1e-6);
    }

    #[test]
    fn quantize_round_trip_is_close_and_keeps_block_maxima() {
        let values: Vec<f32> = (0..600).map(|i| ((i as f32) * 0.37).sin() * (1.0 + i as f32 / 100.0)).collect();
        let map = dynamic_map(true);
        let (codes, absmax) = quantize(&values, &map);
        assert_eq!(absmax.len(), 3);
        let back = dequantize(&codes, &absmax, &map);
        for (b, (x, y)) in values.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
            for (a, c) in x.iter().zip(y) {
                // The dynamic map's steps are at most ~1/8 of the block's maximum near it.
                assert!((a - c).abs() <= 0.07 * absmax[b], "{a} vs {c} (absmax {})", absmax[b]);
            }
        }
        let zeros = quantize(&[0.0; 10], &map);
        assert_eq!(dequantize(&zeros.0, &zeros.1, &map), vec![0.0; 10]);
    }
}
