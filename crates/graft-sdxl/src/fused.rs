//! Fused CPU kernels with their own backward, for speed and memory.
//!
//! - [`attention`]: scaled dot-product attention that never holds the whole [heads, n, m] score
//!   matrix (see `cpu_attention.rs`: head by head, chunks of query rows, probabilities recomputed
//!   in the backward as flash attention does). The composed form keeps five score-sized tensors
//!   per attention for backward.
//! - [`frozen_linear`]: `x @ w^T + b` for a frozen (untracked) weight whose input needs a
//!   gradient. candle's matmul backward computes (and keeps until the end of backward) the
//!   weight's gradient whether or not the weight is trained, and the bias add keeps a gradient
//!   of the output's size for the bias; this op's backward computes the input's gradient only.
//!
//! - [`layer_norm`]: LayerNorm over the last dimension in one pass over each row, with a
//!   backward for the input only (the weight and bias are frozen): the composed form keeps five
//!   input-sized tensors and computes (and keeps) full-size gradients for the weight and bias.
//!
//! - [`geglu`]: diffusers' GEGLU, `value * gelu(gate)` over the two halves of the last dimension,
//!   in one pass; its backward writes both halves' gradients in one more. The composed form
//!   copies both halves, and its backward builds a dozen input-sized temporaries (candle's erf
//!   gelu gradient and two zero-padded narrow gradients).
//! - [`group_norm`]: the same for GroupNorm over [b, c, ...] (statistics per sample and group).
//! - [`conv2d`]: a 2-d convolution (groups 1, dilation 1) as im2col and one matmul per image
//!   against the kernel as stored ([c_out, c_in * kh * kw], no copy), the bias added inside; its
//!   backward gives the input's gradient only (matmul, then col2im). candle's CPU conv copies and
//!   reorders the whole kernel on every call, and its backward also computes the kernel's
//!   gradient and keeps an output-sized gradient for the bias.
//!
//! All are exact reformulations: same math, results within float rounding of the composed ops.
//!
//! The frozen linear and conv take a weight kept in bf16 or fp16 ([`crate::precision`]): their
//! products then run through [`matmul_any`].

use candle_core::backend::BackendStorage;
use rayon::prelude::*;

use crate::matmul::{matmul_any, Operand, Parallelism, View};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

/// Elements per tile of conv columns (16 MB of f32).
const CHUNK_ELEMENTS: usize = 1 << 22;

/// True when [`attention`] runs for these inputs: f32 on the CPU.
pub fn supports_attention(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32
}

/// Multi-head softmax attention: q [b, n, h*d], k and v [b, m, h*d] -> [b, n, h*d], with scale
/// 1/sqrt(d); `causal` masks key positions after the query's. f32 on the CPU (see
/// [`supports_attention`]). The heads are split inside, so the graph keeps only q, k, v and the
/// output.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, bf16: Option<graft_gemm::Kernel>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)? / heads.max(1);
    let op = FusedAttention { heads, scale: 1.0 / (d as f64).sqrt(), causal, bf16 };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Debug, Clone, Copy)]
struct FusedAttention {
    heads: usize,
    scale: f64,
    causal: bool,
    /// Products on this bf16 kernel (see [`crate::cpu_attention`]).
    bf16: Option<graft_gemm::Kernel>,
}

impl FusedAttention {
    /// The attention's dimensions from q's and k's layouts.
    fn dims(&self, q: &[usize], k: &[usize]) -> Result<crate::cpu_attention::Dims> {
        let ([b, n, width], [kb, m, kw]) = (q, k) else {
            candle_core::bail!("attention: expected [b, n, heads * d] inputs, got {q:?} and {k:?}")
        };
        if b != kb || width != kw || self.heads == 0 || width % self.heads != 0 || *width == 0 || *n == 0 || *m == 0 {
            candle_core::bail!("attention: q {q:?} and k {k:?} do not fit {} heads", self.heads)
        }
        Ok(crate::cpu_attention::Dims { b: *b, n: *n, m: *m, heads: self.heads, d: width / self.heads, bf16: self.bf16 })
    }
}

/// The f32 elements a contiguous CPU tensor's storage and layout view, without a copy.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let (Storage::Cpu(s), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("fused op: expected a contiguous CPU tensor")
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// The elements of a contiguous CPU storage.
fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("fused op: input is not contiguous") };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Runs `f` on a frozen CPU weight seen as a [rows, cols] gemm operand. A bf16 weight stays in
/// bf16 where the CPU has a bf16 kernel; an fp16 weight (whose products in bf16 would lose three
/// bits of it) and a bf16 weight on a CPU without one are widened to f32 once for the call.
fn with_weight<R>(w: &Tensor, rows: usize, cols: usize, f: impl FnOnce(Operand) -> R) -> Result<R> {
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(s), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("fused op: expected a contiguous CPU weight")
    };
    if end - start != rows * cols {
        candle_core::bail!("fused op: weight {:?} is not [{rows}, {cols}]", layout.dims())
    }
    use half::slice::HalfFloatSliceExt;
    let widened = match s {
        CpuStorage::BF16(v) if crate::precision::bf16_kernel().is_some() => {
            return Ok(f(Operand::Bf16(View::dense(&v[start..end], rows, cols))))
        }
        CpuStorage::BF16(v) => v[start..end].to_f32_vec(),
        CpuStorage::F16(v) => v[start..end].to_f32_vec(),
        _ => Vec::new(),
    };
    Ok(match s {
        CpuStorage::F32(v) => f(Operand::F32(View::dense(&v[start..end], rows, cols))),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => f(Operand::F32(View::dense(&widened, rows, cols))),
        other => candle_core::bail!("fused op: weights in {:?} are not supported", other.dtype()),
    })
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "graft-fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.dims(), l2.dims())?;
        if l3.dims() != l2.dims() {
            candle_core::bail!("attention: k {:?} and v {:?} differ", l2.dims(), l3.dims())
        }
        let (q, k, v) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let out = crate::cpu_attention::forward(q, k, v, dims, self.scale as f32, self.causal);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let needs = crate::cpu_attention::Needs { q: q.track_op(), k: k.track_op(), v: v.track_op() };
        let dims = self.dims(q.dims(), k.dims())?;
        let (out, grad) = (out.contiguous()?, grad.contiguous()?);
        let (qs, ks, vs, os, gs) =
            (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout(), out.storage_and_layout(), grad.storage_and_layout());
        let (dq, dk, dv) = crate::cpu_attention::backward(
            f32_slice(&qs.0, qs.1)?,
            f32_slice(&ks.0, ks.1)?,
            f32_slice(&vs.0, vs.1)?,
            f32_slice(&os.0, os.1)?,
            f32_slice(&gs.0, gs.1)?,
            dims,
            self.scale as f32,
            self.causal,
            needs,
        );
        let tensor = |g: Option<Vec<f32>>, like: &Tensor| g.map(|g| Tensor::from_vec(g, like.shape(), like.device())).transpose();
        Ok((tensor(dq, q)?, tensor(dk, k)?, tensor(dv, v)?))
    }
}

/// `x @ w^T + b` (x [.., in], w [out, in], b [out]) whose backward gives x's gradient only: for
/// a weight that is not trained (`!w.track_op()`).
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear { w: w.clone(), b: b.cloned() })
}

struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
}

/// `x @ w^T (+ b)` on storages: x [m, k] (contiguous at its offset), w [n, k], b [n].
fn linear_storage<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout, b: Option<(&S, &Layout)>) -> Result<(S, Shape)> {
    let k = xl.dims().last().copied().unwrap_or(1);
    let m = xl.shape().elem_count() / k.max(1);
    let n = wl.dims()[0];
    let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let y = x.matmul(w, (1, m, n, k), &x2, &wl.transpose(0, 1)?)?;
    let y = match b {
        Some((bs, bl)) => y.binary_impl::<candle_core::op::Add>(bs, &Layout::contiguous((m, n)), &bl.broadcast_as((m, n))?)?,
        None => y,
    };
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((y, Shape::from(dims)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "graft-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // A half weight under f32 activations: the mixed product. Half activations (the GPU's
        // path, run on the CPU in tests) take candle's product like f32 ones.
        if is_half(self.w.dtype()) && s.dtype() == DType::F32 {
            return self.cpu_fwd_half(s, l);
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen linear: weight not on the CPU") };
        match &self.b {
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let Storage::Cpu(bias) = &*bs else { candle_core::bail!("frozen linear: bias not on the CPU") };
                linear_storage(s, l, w, wl, Some((bias, bl)))
            }
            None => linear_storage(s, l, w, wl, None),
        }
    }

    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen linear: weight not on the GPU") };
        match &self.b {
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let Storage::Cuda(bias) = &*bs else { candle_core::bail!("frozen linear: bias not on the GPU") };
                linear_storage(s, l, w, wl, Some((bias, bl)))
            }
            None => linear_storage(s, l, w, wl, None),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.w.dims2()?;
        let m = grad.elem_count() / n.max(1);
        if !is_half(self.w.dtype()) || !x.device().is_cpu() || x.dtype() != DType::F32 {
            let w = self.w.to_dtype(grad.dtype())?;
            return Ok(Some(grad.reshape((m, n))?.matmul(&w)?.reshape(x.shape())?));
        }
        // dx [m, k] = grad [m, n] @ w [n, k]
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let g = View::dense(f32_slice(&gs, gl)?, m, n);
        let mut dx = vec![0f32; m * k];
        with_weight(&self.w, n, k, |w| matmul_any(&mut dx, k, Operand::F32(g), w, false, par()))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl FrozenLinear {
    /// The forward with a half-precision weight: `x [m, k] @ w [n, k]^T`, on top of the bias.
    fn cpu_fwd_half(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l)?;
        let (n, k) = self.w.dims2()?;
        if l.dims().last() != Some(&k) {
            candle_core::bail!("linear: input {:?} does not end in the weight's {k} inputs", l.dims())
        }
        let m = x.len() / k.max(1);
        let mut out = vec![0f32; m * n];
        if let Some(b) = &self.b {
            let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            out.chunks_exact_mut(n.max(1)).for_each(|row| row.copy_from_slice(&b));
        }
        let xv = Operand::F32(View::dense(x, m, k));
        with_weight(&self.w, n, k, |w| matmul_any(&mut out, n, xv, w.t(), self.b.is_some(), par()))?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// Every thread of the pool.
fn par() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// True when [`layer_norm`] runs: f32 on the CPU, weight and bias frozen.
pub fn supports_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !w.track_op() && !b.track_op()
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`, the input's
/// gradient only (see [`supports_layer_norm`]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let op = FrozenLayerNorm { w: w.to_dtype(DType::F32)?.to_vec1()?, b: b.to_dtype(DType::F32)?.to_vec1()?, eps };
    x.contiguous()?.apply_op1(op)
}

struct FrozenLayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f64,
}

impl CustomOp1 for FrozenLayerNorm {
    fn name(&self) -> &'static str {
        "graft-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l)?;
        let dim = self.w.len();
        if l.dims().last() != Some(&dim) {
            candle_core::bail!("layer norm: input {:?} does not end in {dim}", l.dims())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, row)| crate::simd::layer_norm_row(row, o, &self.w, &self.b, self.eps));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dim = self.w.len();
        let grad = grad.contiguous()?;
        let ((x_storage, x_layout), (g_storage, g_layout)) = (x.storage_and_layout(), grad.storage_and_layout());
        let (xs, gs) = (f32_slice(&x_storage, x_layout)?, f32_slice(&g_storage, g_layout)?);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(dim)
            .zip(xs.par_chunks(dim).zip(gs.par_chunks(dim)))
            .for_each(|(dx, (row, gr))| crate::simd::layer_norm_row_grad(row, gr, dx, &self.w, self.eps));
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// True when [`geglu`] runs: f32 on the CPU.
pub fn supports_geglu(h: &Tensor) -> bool {
    h.device().is_cpu() && h.dtype() == DType::F32
}

/// `value * gelu(gate)` (exact erf gelu) of h [.., 2 * inner], value the first half of the last
/// dimension and gate the second: [.., inner].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.dim(D::Minus1)? % 2 != 0 {
        candle_core::bail!("geglu: odd last dimension {:?}", h.dims())
    }
    h.contiguous()?.apply_op1(Geglu)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "graft-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = cpu_slice(s, l)?;
        let mut dims = l.dims().to_vec();
        let inner = dims[dims.len() - 1] / 2;
        *dims.last_mut().expect("rank >= 1") = inner;
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(inner * 8).zip(h.par_chunks(2 * inner * 8)).for_each(|(o, h)| crate::simd::geglu_rows(h, o, inner));
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inner = h.dim(D::Minus1)? / 2;
        let grad = grad.contiguous()?;
        let ((h_storage, h_layout), (g_storage, g_layout)) = (h.storage_and_layout(), grad.storage_and_layout());
        let (hs, gs) = (f32_slice(&h_storage, h_layout)?, f32_slice(&g_storage, g_layout)?);
        let mut dh = vec![0f32; hs.len()];
        let rows = 2 * inner * 8;
        dh.par_chunks_mut(rows)
            .zip(hs.par_chunks(rows).zip(gs.par_chunks(inner * 8)))
            .for_each(|(d, (h, g))| crate::simd::geglu_grad_rows(h, g, d, inner));
        Ok(Some(Tensor::from_vec(dh, h.shape(), h.device())?))
    }
}

/// True when [`group_norm`] runs: f32 on the CPU, weight and bias frozen.
pub fn supports_group_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    supports_layer_norm(x, w, b) && x.rank() >= 3
}

/// GroupNorm of x [b, c, ...] with `groups` groups: per sample and group
/// `(x - mean) / sqrt(var + eps)`, then `* w[c] + b[c]`, then SiLU when `silu` (the resnets'
/// norm + activation in one pass); the input's gradient only.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 || w.elem_count() != c || b.elem_count() != c {
        candle_core::bail!("group norm: {c} channels, {groups} groups, weight {:?}, bias {:?}", w.dims(), b.dims())
    }
    let op = FrozenGroupNorm { w: w.to_dtype(DType::F32)?.to_vec1()?, b: b.to_dtype(DType::F32)?.to_vec1()?, groups, eps, silu };
    x.contiguous()?.apply_op1(op)
}

struct FrozenGroupNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl FrozenGroupNorm {
    /// Elements of one (sample, group), and the channel range of the `i`-th (sample, group).
    fn group(&self, dims: &[usize], i: usize) -> (usize, std::ops::Range<usize>) {
        let spatial: usize = dims[2..].iter().product();
        let per = dims[1] / self.groups;
        let c0 = (i % self.groups) * per;
        (per * spatial, c0..c0 + per)
    }
}

impl CustomOp1 for FrozenGroupNorm {
    fn name(&self) -> &'static str {
        "graft-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l)?;
        let (size, _) = self.group(l.dims(), 0);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(size.max(1)).zip(x.par_chunks(size.max(1))).enumerate().for_each(|(i, (o, xs))| {
            let (_, cs) = self.group(l.dims(), i);
            crate::simd::group_norm_group(xs, o, &self.w[cs.clone()], &self.b[cs], self.eps, self.silu);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let ((x_storage, x_layout), (g_storage, g_layout)) = (x.storage_and_layout(), grad.storage_and_layout());
        let (xs, gs) = (f32_slice(&x_storage, x_layout)?, f32_slice(&g_storage, g_layout)?);
        let (size, _) = self.group(x.dims(), 0);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(size.max(1)).zip(xs.par_chunks(size.max(1)).zip(gs.par_chunks(size.max(1)))).enumerate().for_each(
            |(i, (d, (xs, gs)))| {
                let (_, cs) = self.group(x.dims(), i);
                crate::simd::group_norm_group_grad(xs, gs, d, &self.w[cs.clone()], &self.b[cs], self.eps, self.silu);
            },
        );
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// True when [`conv2d`] runs: f32 on the CPU, kernel and bias frozen.
pub fn supports_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !w.track_op() && !b.is_some_and(|b| b.track_op())
}

/// `x` [b, c_in, h, w] convolved with `w` [c_out, c_in, kh, kw] (plus `b` [c_out]), zero
/// padding on every side, groups 1, dilation 1 (see [`supports_conv2d`]).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let geo = ConvGeometry::of(x, w, padding, stride)?;
    let c_out = w.dim(0)?;
    let op = FrozenConv2d { w2: w.contiguous()?.reshape((c_out, geo.c_in * geo.kh * geo.kw))?, b: b.cloned(), geo };
    x.contiguous()?.apply_op1(op)
}

#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeometry {
    /// The geometry of `x` [b, c_in, h, w] under kernel `w` [c_out, c_in, kh, kw], checked.
    fn of(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Self> {
        let (_, c_in, kh, kw) = w.dims4()?;
        let (_, xc, h, wd) = x.dims4()?;
        if xc != c_in {
            candle_core::bail!("conv2d: input has {xc} channels, the kernel expects {c_in}")
        }
        if h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
            candle_core::bail!("conv2d: input {h}x{wd} is smaller than the kernel {kh}x{kw}")
        }
        Ok(Self { c_in, h, w: wd, kh, kw, stride, padding })
    }

    fn out_hw(&self) -> (usize, usize) {
        ((self.h + 2 * self.padding - self.kh) / self.stride + 1, (self.w + 2 * self.padding - self.kw) / self.stride + 1)
    }

    /// The input pixel under output position `o` and kernel offset `k` along a side of `len`.
    fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k).checked_sub(self.padding).filter(|&i| i < len)
    }

    /// Output positions `p0..p1` of one image [c_in, h, w] as columns [c_in * kh * kw, p1 - p0].
    fn im2col(&self, x: &[f32], p0: usize, p1: usize) -> Vec<f32> {
        let len = p1 - p0;
        let mut cols = vec![0f32; self.c_in * self.kh * self.kw * len];
        cols.par_chunks_mut(len).enumerate().for_each(|(r, row)| {
            let (c, ky, kx) = (r / (self.kh * self.kw), (r / self.kw) % self.kh, r % self.kw);
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            let (lo, hi) = self.valid_columns(kx);
            self.each_row_span(p0, p1, ky, |iy, ox0, at, n| {
                let src = &plane[iy * self.w..(iy + 1) * self.w];
                let (a, b) = (ox0.max(lo), (ox0 + n).min(hi));
                if a >= b {
                    return;
                }
                let dst = &mut row[at + a - ox0..at + b - ox0];
                let first = a * self.stride + kx - self.padding;
                if self.stride == 1 {
                    dst.copy_from_slice(&src[first..first + (b - a)]);
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = src[first + j * self.stride];
                    }
                }
            });
        });
        cols
    }

    /// The output columns `lo..hi` whose input column (for kernel column `kx`) is inside the
    /// image: `0 <= ox * stride + kx - padding < w`.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let (_, ow) = self.out_hw();
        let lo = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let hi = if self.w + self.padding > kx { (self.w + self.padding - kx - 1) / self.stride + 1 } else { 0 };
        (lo.min(ow), hi.min(ow))
    }

    /// Splits output positions `p0..p1` into spans within one output row and calls
    /// `f(input row, first output column, offset in p0..p1, length)` for each span whose input
    /// row (for kernel row `ky`) is inside the image.
    fn each_row_span(&self, p0: usize, p1: usize, ky: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (_, ow) = self.out_hw();
        let mut p = p0;
        while p < p1 {
            let (oy, ox0) = (p / ow, p % ow);
            let n = (ow - ox0).min(p1 - p);
            if let Some(iy) = self.source(oy, ky, self.h) {
                f(iy, ox0, p - p0, n);
            }
            p += n;
        }
    }

    /// Adds columns [c_in * kh * kw, p1 - p0] of output positions `p0..p1` back into one image
    /// [c_in, h, w].
    fn col2im_add(&self, cols: &[f32], p0: usize, p1: usize, x: &mut [f32]) {
        let len = p1 - p0;
        x.par_chunks_mut(self.h * self.w).enumerate().for_each(|(c, plane)| {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &cols[((c * self.kh + ky) * self.kw + kx) * len..][..len];
                    let (lo, hi) = self.valid_columns(kx);
                    self.each_row_span(p0, p1, ky, |iy, ox0, at, n| {
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        let (a, b) = (ox0.max(lo), (ox0 + n).min(hi));
                        if a >= b {
                            return;
                        }
                        let first = a * self.stride + kx - self.padding;
                        for (j, &v) in row[at + a - ox0..at + b - ox0].iter().enumerate() {
                            dst[first + j * self.stride] += v;
                        }
                    });
                }
            }
        });
    }

    /// Output positions per tile: the columns of a tile take at most 16 MB.
    fn tile(&self) -> usize {
        let (oh, ow) = self.out_hw();
        (CHUNK_ELEMENTS / (self.c_in * self.kh * self.kw).max(1)).clamp(64, (oh * ow).max(64))
    }

    /// Output positions `p0..p0 + len` of one image as a [c_in * kh * kw, len] operand: the
    /// image itself for a 1x1 kernel, else its columns, built in `cols`.
    fn columns<'a>(&self, img: &'a [f32], p0: usize, len: usize, cols: &'a mut Vec<f32>) -> View<'a> {
        let (oh, ow) = self.out_hw();
        let k = self.c_in * self.kh * self.kw;
        if self.is_pointwise() {
            return View { data: &img[p0..], rows: k, cols: len, rs: oh * ow, cs: 1 };
        }
        *cols = self.im2col(img, p0, p0 + len);
        View::dense(cols, k, len)
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}

struct FrozenConv2d {
    /// The kernel as [c_out, c_in * kh * kw].
    w2: Tensor,
    b: Option<Tensor>,
    geo: ConvGeometry,
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "graft-frozen-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l)?;
        let (c_out, k) = self.w2.dims2()?;
        let bias = self.b.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        let (out, shape) = with_weight(&self.w2, c_out, k, |kernel| conv_forward(&self.geo, x, kernel, c_out, bias.as_deref()))?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (c_out, k) = self.w2.dims2()?;
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let grads = f32_slice(&g_storage, g_layout)?;
        let dx = with_weight(&self.w2, c_out, k, |kernel| conv_input_grad(&self.geo, grads, kernel, c_out, k, x.elem_count()))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Per image and tile of output positions: columns (or the image itself for a 1x1 kernel)
/// times the kernel [c_out, k], written by gemm straight into the output, on top of the bias.
fn conv_forward(g: &ConvGeometry, x: &[f32], kernel: Operand, c_out: usize, bias: Option<&[f32]>) -> (Vec<f32>, Shape) {
    let (oh, ow) = g.out_hw();
    let (image, p, tile) = (g.c_in * g.h * g.w, oh * ow, g.tile());
    let batch = x.len() / image.max(1);
    let mut out = vec![0f32; batch * c_out * p];
    if let Some(b) = bias {
        for (row, &v) in out.chunks_exact_mut(p.max(1)).zip(b.iter().cycle()) {
            row.fill(v);
        }
    }
    for (img, out) in x.chunks_exact(image.max(1)).zip(out.chunks_exact_mut((c_out * p).max(1))) {
        for p0 in (0..p).step_by(tile) {
            let len = tile.min(p - p0);
            let mut cols = Vec::new();
            let columns = g.columns(img, p0, len, &mut cols);
            matmul_any(&mut out[p0..], p, kernel, Operand::F32(columns), bias.is_some(), par());
        }
    }
    (out, Shape::from((batch, c_out, oh, ow)))
}

/// Per image and tile: kernelᵀ times the output's gradient, summed back into the image
/// (col2im); for a 1x1 kernel written straight into the input's gradient.
fn conv_input_grad(g: &ConvGeometry, grads: &[f32], kernel: Operand, c_out: usize, k: usize, x_len: usize) -> Vec<f32> {
    let (oh, ow) = g.out_hw();
    let (image, p, tile) = (g.c_in * g.h * g.w, oh * ow, g.tile());
    let mut dx = vec![0f32; x_len];
    let mut cols = vec![0f32; k * tile.min(p)];
    let kernel_t = kernel.t();
    for (dx, gi) in dx.chunks_exact_mut(image.max(1)).zip(grads.chunks_exact((c_out * p).max(1))) {
        for p0 in (0..p).step_by(tile) {
            let len = tile.min(p - p0);
            let gv = Operand::F32(View { data: &gi[p0..], rows: c_out, cols: len, rs: p, cs: 1 });
            if g.is_pointwise() {
                matmul_any(&mut dx[p0..], p, kernel_t, gv, false, par());
            } else {
                matmul_any(&mut cols, len, kernel_t, gv, false, par());
                g.col2im_add(&cols[..k * len], p0, p0 + len, dx);
            }
        }
    }
    dx
}

/// `x` [b, c_in, h, w] convolved with a kernel that is trained, `w` [c_out, c_in, kh, kw] f32
/// (an unfrozen base weight, a VAE in training), plus `b`: [`conv2d`]'s im2col products, and a
/// backward that also gives the kernel's gradient (the output's gradient times the columns,
/// summed over images and tiles). candle's own conv backward runs a direct convolution whose
/// kernel is the whole image, many times slower on the CPU.
pub fn trained_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let geo = ConvGeometry::of(x, w, padding, stride)?;
    let y = x.contiguous()?.apply_op2(&w.contiguous()?, TrainedConv2d { geo })?;
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// True when [`trained_conv2d`] runs: f32 input and kernel on the CPU.
pub fn supports_trained_conv2d(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32
}

struct TrainedConv2d {
    geo: ConvGeometry,
}

impl candle_core::CustomOp2 for TrainedConv2d {
    fn name(&self) -> &'static str {
        "graft-trained-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        let c_out = l2.dims()[0];
        let k = w.len() / c_out.max(1);
        let (out, shape) = conv_forward(&self.geo, x, Operand::F32(View::dense(w, c_out, k)), c_out, None);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geo;
        let (oh, ow) = g.out_hw();
        let (image, p, tile) = (g.c_in * g.h * g.w, oh * ow, g.tile());
        let c_out = w.dim(0)?;
        let k = g.c_in * g.kh * g.kw;
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let grads = f32_slice(&g_storage, g_layout)?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let xs = f32_slice(&x_storage, x_layout)?;
        let (w_storage, w_layout) = w.storage_and_layout();
        let ws = f32_slice(&w_storage, w_layout)?;
        let dx = conv_input_grad(&g, grads, Operand::F32(View::dense(ws, c_out, k)), c_out, k, x.elem_count());
        // dW [c_out, k] = sum over images and tiles of dY [c_out, len] times columnsᵀ [len, k].
        let mut dw = vec![0f32; c_out * k];
        for (img, gi) in xs.chunks_exact(image.max(1)).zip(grads.chunks_exact((c_out * p).max(1))) {
            for p0 in (0..p).step_by(tile) {
                let len = tile.min(p - p0);
                let mut cols = Vec::new();
                let columns = g.columns(img, p0, len, &mut cols);
                let gv = View { data: &gi[p0..], rows: c_out, cols: len, rs: p, cs: 1 };
                matmul_any(&mut dw, k, Operand::F32(gv), Operand::F32(columns.t()), true, par());
            }
        }
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::GraftRng;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Asserts that `fused` and `reference`, both computed from `x`, agree within `tol` in value
    /// and in x's gradient under the upstream gradient `up`; the fused side gives `frozen` none.
    fn assert_same(fused: Tensor, reference: Tensor, x: &Var, up: &Tensor, tol: f32, frozen: &[&Tensor]) {
        assert!(max_diff(&fused, &reference) < tol, "forward {}", max_diff(&fused, &reference));
        let g1 = (fused * up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * up).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, r) = (g1.get(x).unwrap(), g2.get(x).unwrap());
        assert!(max_diff(a, r) < tol, "grad {}", max_diff(a, r));
        assert!(frozen.iter().all(|t| g1.get(t).is_none()), "a frozen tensor got a gradient");
    }

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
        crate::nn::composed_attention(q, k, v, heads, causal).unwrap()
    }

    fn check(b: usize, n: usize, m: usize, d: usize, heads: usize, causal: bool) {
        check_with(b, n, m, d, heads, causal, None, 1e-5)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_with(b: usize, n: usize, m: usize, d: usize, heads: usize, causal: bool, bf16: Option<graft_gemm::Kernel>, tol: f32) {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(3);
        let q = Var::from_tensor(&rng.randn((b, n, d), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&rng.randn((b, m, d), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&rng.randn((b, m, d), &dev).unwrap()).unwrap();
        let w = rng.randn((b, n, d), &dev).unwrap();
        let fused = attention(&q, &k, &v, heads, causal, bf16).unwrap();
        let reference = composed(&q, &k, &v, heads, causal);
        assert!(max_diff(&fused, &reference) < tol, "forward {}", max_diff(&fused, &reference));
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (g1.get(var).unwrap(), g2.get(var).unwrap());
            assert!(max_diff(a, r) < tol, "grad {name}: {}", max_diff(a, r));
        }
    }

    #[test]
    fn bf16_attention_stays_near_f32() {
        // Products in bf16 (8 bits of mantissa) with f32 accumulation: within 3e-2 of the f32
        // composed attention on unit-variance inputs, values and gradients; causal, several
        // chunks, keys over one K block.
        let Some(kernel) = crate::precision::bf16_kernel() else {
            eprintln!("note: no bf16 kernel on this CPU, skipped");
            return;
        };
        check_with(2, 7, 5, 12, 3, false, Some(kernel), 3e-2);
        check_with(3, 6, 6, 8, 2, true, Some(kernel), 3e-2);
        check_with(1, 2100, 2100, 64, 1, false, Some(kernel), 3e-2);
        // It is the bf16 path: its deviation from f32 is above f32's 1e-5.
        let q = GraftRng::new(3).randn((1, 64, 64), &Device::Cpu).unwrap();
        let d = max_diff(&attention(&q, &q, &q, 1, false, Some(kernel)).unwrap(), &composed(&q, &q, &q, 1, false));
        assert!(d > 1e-5, "bf16 attention matched f32 to {d}");
    }

    #[test]
    fn attention_matches_composed() {
        check(2, 7, 5, 4, 1, false);
        check(2, 7, 5, 12, 3, false);
        check(3, 6, 6, 8, 2, true);
    }

    #[test]
    fn attention_chunks_match_composed() {
        // 2 * 2 heads * 2100 keys: chunks of 499 query rows, so five chunks.
        check(2, 2100, 2100, 8, 2, false);
    }

    #[test]
    fn only_tracked_inputs_get_gradients() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(4);
        let q = Var::from_tensor(&rng.randn((1, 4, 8), &dev).unwrap()).unwrap();
        let k = rng.randn((1, 3, 8), &dev).unwrap();
        let v = rng.randn((1, 3, 8), &dev).unwrap();
        let g = attention(&q, &k, &v, 2, false, None).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&q).is_some());
        assert!(g.get(&k).is_none() && g.get(&v).is_none());
    }

    #[test]
    fn frozen_linear_matches_and_skips_the_weight() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(5);
        let x = Var::from_tensor(&rng.randn((2, 3, 6), &dev).unwrap()).unwrap();
        let w = rng.randn((4, 6), &dev).unwrap();
        let b = rng.randn(4, &dev).unwrap();
        let up = rng.randn((2, 3, 4), &dev).unwrap();
        let y = frozen_linear(&x, &w, Some(&b)).unwrap();
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        assert!(max_diff(&y, &reference) < 1e-6);
        let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6);
        assert!(g1.get(&w).is_none() && g1.get(&b).is_none());
        // Narrowed (offset) input, no bias.
        let xn = x.narrow(1, 1, 2).unwrap();
        let y = frozen_linear(&xn, &w, None).unwrap();
        let reference = xn.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &reference) < 1e-6);
    }

    /// A weight kept in bf16 or fp16: the linear and the conv give the f32 result of the weight as
    /// stored (fp16 exactly; bf16 within the rounding of the activations to bf16 where a bf16 unit
    /// runs the product), and the input's gradient likewise.
    #[test]
    fn half_precision_weights() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(8);
        let x = Var::from_tensor(&rng.randn((2, 33, 70), &dev).unwrap()).unwrap();
        let img = Var::from_tensor(&rng.randn((1, 6, 9, 7), &dev).unwrap()).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let tol = if dtype == DType::F16 || crate::precision::bf16_kernel().is_none() { 1e-5 } else { 2e-2 };
            let w = rng.randn((17, 70), &dev).unwrap().to_dtype(dtype).unwrap();
            let b = rng.randn(17, &dev).unwrap();
            let wide = w.to_dtype(DType::F32).unwrap();
            let up = rng.randn((2, 33, 17), &dev).unwrap();
            let reference = x.broadcast_matmul(&wide.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_same(frozen_linear(&x, &w, Some(&b)).unwrap(), reference, &x, &up, tol * scale, &[&w, &b]);

            let kernel = rng.randn((5, 6, 3, 3), &dev).unwrap().to_dtype(dtype).unwrap();
            let reference = img.conv2d(&kernel.to_dtype(DType::F32).unwrap(), 1, 1, 1, 1).unwrap();
            let up = rng.randn(reference.shape(), &dev).unwrap();
            let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_same(conv2d(&img, &kernel, None, 1, 1).unwrap(), reference, &img, &up, tol * scale, &[&kernel]);
        }
    }

    #[test]
    fn layer_norm_matches_composed() {
        use candle_core::Module;
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(6);
        let x = Var::from_tensor(&(rng.randn((2, 5, 12), &dev).unwrap() * 3.0).unwrap().affine(1.0, 0.5).unwrap()).unwrap();
        let w = (rng.randn(12, &dev).unwrap() * 0.1).unwrap().affine(1.0, 1.0).unwrap();
        let b = (rng.randn(12, &dev).unwrap() * 0.1).unwrap();
        let up = rng.randn((2, 5, 12), &dev).unwrap();
        let composed = crate::nn::LayerNorm { weight: w.clone(), bias: b.clone(), eps: 1e-5 };
        // Through a linear view so that the composed path is taken (the weight "tracks").
        let wv = Var::from_tensor(&w).unwrap();
        let reference = crate::nn::LayerNorm { weight: wv.as_tensor().clone(), bias: b.clone(), eps: 1e-5 }.forward(&x).unwrap();
        assert_same(composed.forward(&x).unwrap(), reference, &x, &up, 1e-5, &[&w, &b]);
    }

    /// A trained kernel: the value and the gradients of input, kernel and bias match candle's
    /// conv (strided, padded, 1x1 and a tile boundary).
    #[test]
    fn trained_conv2d_matches_candle() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(11);
        for (b, cin, cout, h, k, pad, stride) in [(2, 3, 5, 9, 3, 1, 1), (1, 4, 6, 10, 3, 1, 2), (2, 5, 3, 7, 1, 0, 1), (1, 2, 4, 70, 3, 1, 1)] {
            let x = Var::from_tensor(&rng.randn((b, cin, h, h), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&rng.randn((cout, cin, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&rng.randn(cout, &dev).unwrap()).unwrap();
            let y = trained_conv2d(&x, &w, Some(&bias), pad, stride).unwrap();
            let r = x.conv2d(&w, pad, stride, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            assert!(max_diff(&y, &r) < 1e-4, "forward {}", max_diff(&y, &r));
            let up = rng.randn(r.shape(), &dev).unwrap();
            let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (r * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w), ("b", &bias)] {
                let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let scale = e.abs().unwrap().max_keepdim(0).unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
                assert!(max_diff(a, e) < 1e-4 * scale, "grad {name} ({b}, {cin}, {cout}, {h}, {k}, {pad}, {stride}): {}", max_diff(a, e));
            }
        }
    }

    #[test]
    fn conv2d_matches_candle() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(7);
        for (cin, cout, k, stride, pad, h, w) in
            [(3, 4, 3, 1, 1, 7, 6), (4, 5, 3, 2, 1, 8, 10), (5, 3, 1, 1, 0, 4, 5), (2, 3, 3, 2, 0, 9, 7), (512, 4, 3, 1, 1, 32, 32)]
        {
            let x = Var::from_tensor(&rng.randn((2, cin, h, w), &dev).unwrap()).unwrap();
            let kernel = rng.randn((cout, cin, k, k), &dev).unwrap();
            let b = rng.randn(cout, &dev).unwrap();
            let y = conv2d(&x, &kernel, Some(&b), pad, stride).unwrap();
            let reference = x.conv2d(&kernel, pad, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            assert_eq!(y.dims(), reference.dims());
            // Relative to the output's scale: 4608-term sums of unit normals are ~70.
            let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(max_diff(&y, &reference) < 1e-5 * scale, "forward {}", max_diff(&y, &reference));
            let up = rng.randn(y.shape(), &dev).unwrap();
            let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, r) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            let scale = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(max_diff(a, r) < 1e-5 * scale, "grad {}", max_diff(a, r));
            assert!(g1.get(&kernel).is_none());
        }
    }

    #[test]
    fn geglu_matches_candle() {
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(9);
        let h = Var::from_tensor(&(rng.randn((2, 3, 10), &dev).unwrap() * 2.0).unwrap()).unwrap();
        let up = rng.randn((2, 3, 5), &dev).unwrap();
        let reference = (h.narrow(2, 0, 5).unwrap() * h.narrow(2, 5, 5).unwrap().gelu_erf().unwrap()).unwrap();
        assert_same(geglu(&h).unwrap(), reference, &h, &up, 1e-5, &[]);
    }

    #[test]
    fn group_norm_matches_candle() {
        use candle_core::Module;
        let dev = Device::Cpu;
        let mut rng = GraftRng::new(8);
        let x = Var::from_tensor(&(rng.randn((2, 6, 3, 5), &dev).unwrap() * 2.0).unwrap().affine(1.0, 0.3).unwrap()).unwrap();
        let w = (rng.randn(6, &dev).unwrap() * 0.1).unwrap().affine(1.0, 1.0).unwrap();
        let b = (rng.randn(6, &dev).unwrap() * 0.1).unwrap();
        let up = rng.randn((2, 6, 3, 5), &dev).unwrap();
        for silu in [false, true] {
            let fused = group_norm(&x, &w, &b, 3, 1e-5, silu).unwrap();
            let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 6, 3, 1e-5).unwrap().forward(&x).unwrap();
            let reference = if silu { reference.silu().unwrap() } else { reference };
            assert_same(fused, reference, &x, &up, 1e-5, &[&w, &b]);
        }
    }
}
