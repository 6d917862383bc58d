//! The host side of the plugin ops table: `graft_abi::HostOps` over candle tensors.
//!
//! One [`CandleOps`] serves one plugin call (a `forward` at one layer, a `delta_weight`, an
//! `export`): it maps the call's [`TensorId`] handles to candle tensors, creates and looks up
//! parameters of the current (strategy, layer) in the [`ParamStore`], and records every op in
//! candle's graph, so autograd, device and dtype stay the host's.
//!
//! No op panics: an unknown handle, a handle from an earlier call, a shape error, even a panic
//! inside candle, comes back to the plugin as an error value.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RVec};
use candle_core::{DType, Tensor};
use graft_abi::{GResult, GraftError, HostOps, HostOpsMut, HostOpsV1Ext, HostOps_TO, Init, LogLevel, TensorId};
use graft_sdxl::hooks::LinearWeights;
use graft_sdxl::rng::GraftRng;

use super::store::{InitKind, ParamKey, ParamStore};

/// Each call gets a fresh number, kept in the upper half of its handles, so a handle kept from
/// an earlier call is recognised instead of silently naming another tensor.
static NEXT_CALL: AtomicU32 = AtomicU32::new(1);

/// The ops table of one plugin call.
pub struct CandleOps<'a> {
    store: &'a ParamStore,
    rng: &'a mut GraftRng,
    strategy: &'a str,
    layer: &'a str,
    base: Option<LinearWeights>,
    training: bool,
    call: u32,
    tensors: Vec<Tensor>,
    created: Vec<ParamKey>,
}

impl<'a> CandleOps<'a> {
    /// Ops for a call of `strategy` at `layer`. `base` is the layer's base weight [out, in] and
    /// bias (none for attention hook points); `rng` feeds dropout; dropout is the identity
    /// unless `training`.
    pub fn new(
        store: &'a ParamStore,
        rng: &'a mut GraftRng,
        strategy: &'a str,
        layer: &'a str,
        base: Option<LinearWeights>,
        training: bool,
    ) -> Self {
        Self {
            store,
            rng,
            strategy,
            layer,
            base,
            training,
            call: NEXT_CALL.fetch_add(1, Ordering::Relaxed),
            tensors: Vec::new(),
            created: Vec::new(),
        }
    }

    /// Puts a host tensor in the table and returns its handle.
    pub fn insert(&mut self, t: Tensor) -> TensorId {
        self.tensors.push(t);
        TensorId(((self.call as u64) << 32) | (self.tensors.len() as u64 - 1))
    }

    /// The tensor behind a handle of this call.
    pub fn tensor(&self, id: TensorId) -> Result<Tensor, GraftError> {
        let call = (id.0 >> 32) as u32;
        let index = (id.0 & 0xffff_ffff) as usize;
        if call != self.call {
            return Err(GraftError::op(if id.0 == u64::MAX || call == 0 || call > self.call {
                format!("unknown tensor handle {}", id.0)
            } else {
                format!("tensor handle {} comes from an earlier call (handles are valid only during the call that made them)", id.0)
            }));
        }
        self.tensors
            .get(index)
            .cloned()
            .ok_or_else(|| GraftError::op(format!("unknown tensor handle {} (this call has {} tensors)", id.0, self.tensors.len())))
    }

    /// Parameters this call created (not declared in the plan).
    pub fn created_params(&self) -> &[ParamKey] {
        &self.created
    }

    fn key(&self, name: &str) -> ParamKey {
        ParamKey::new(self.strategy, self.layer, name)
    }

    /// Runs one op body: candle errors and panics become error values, the result is stored.
    fn op(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<Tensor, GraftError>) -> GResult<TensorId> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(Ok(t)) => RResult::ROk(self.insert(t)),
            Ok(Err(mut e)) => {
                e.message = format!("{name}: {}", e.message).into();
                RResult::RErr(e)
            }
            Err(payload) => RResult::RErr(GraftError::op(format!("{name}: host op panicked: {}", panic_text(payload.as_ref())))),
        }
    }

    fn unary(&mut self, name: &str, x: TensorId, f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>) -> GResult<TensorId> {
        self.op(name, |ops| {
            let x = ops.tensor(x)?;
            f(&x).map_err(|e| candle(e, &[&x]))
        })
    }

    fn binary(
        &mut self,
        name: &str,
        a: TensorId,
        b: TensorId,
        f: impl FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> GResult<TensorId> {
        self.op(name, |ops| {
            let (a, b) = (ops.tensor(a)?, ops.tensor(b)?);
            f(&a, &b).map_err(|e| candle(e, &[&a, &b]))
        })
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// A candle error with the shapes of the operands, first line only (no backtrace).
fn candle(e: candle_core::Error, operands: &[&Tensor]) -> GraftError {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").to_string();
    let shapes: Vec<String> = operands.iter().map(|t| format!("{:?}", t.dims())).collect();
    GraftError::op(format!("{first} (operand shapes {})", shapes.join(", ")))
}

fn err(message: impl Into<String>) -> GraftError {
    GraftError::op(message)
}

/// A dimension index, negative counted from the end.
fn resolve_dim(dim: i64, rank: usize) -> Result<usize, GraftError> {
    let r = rank as i64;
    let d = if dim < 0 { dim + r } else { dim };
    if d < 0 || d >= r {
        return Err(err(format!("dimension {dim} out of range for a rank-{rank} tensor")));
    }
    Ok(d as usize)
}

fn resolve_dims(dims: RSlice<'_, i64>, rank: usize) -> Result<Vec<usize>, GraftError> {
    if dims.is_empty() {
        return Ok((0..rank).collect());
    }
    let mut out = dims.iter().map(|&d| resolve_dim(d, rank)).collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn shape_usize(shape: RSlice<'_, u64>) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

/// A differentiable softmax (candle_nn's has no backward in 0.11).
fn softmax(x: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

/// `x W^T + b` for x [.., in], W [out, in].
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("linear needs an input of rank >= 1, got a scalar");
    };
    if last != in_f {
        candle_core::bail!("linear: input has {last} features, weight [out {out_f}, in {in_f}] expects {in_f}");
    }
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_f);
    let y = y.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `a` where `cond != 0`, else `b`, all broadcast to one shape.
fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let shape = cond.shape().broadcast_shape_binary_op(a.shape(), "where_cond")?;
    let shape = shape.broadcast_shape_binary_op(b.shape(), "where_cond")?;
    let mask = cond.ne(0.0)?.broadcast_as(&shape)?;
    mask.where_cond(&a.broadcast_as(&shape)?, &b.broadcast_as(&shape)?)
}

/// The inverse of each matrix in the last two dimensions: Gauss-Jordan with partial pivoting
/// in f64 on the CPU (the matrices adapters invert are small), with the backward
/// `dA = -A^-T G A^-T` in candle ops, so it runs on any device.
fn inverse(x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let n = match dims {
        [.., r, c] if r == c => *c,
        _ => candle_core::bail!("inverse needs square matrices in the last two dimensions, got {dims:?}"),
    };
    let values = x.detach().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(values.len());
    for (m, a) in values.chunks(n * n.max(1)).enumerate() {
        out.extend(invert(a, n).ok_or_else(|| candle_core::Error::Msg(format!("matrix {m} of {dims:?} is singular")))?);
    }
    let inv = Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?.to_dtype(x.dtype())?.to_device(x.device())?;
    graft_sdxl::precomputed::with_backward1(
        "inverse",
        x,
        inv,
        Box::new(|_, inv, grad| {
            let inv_t = inv.transpose(inv.rank() - 2, inv.rank() - 1)?;
            Ok(Some(inv_t.broadcast_matmul(grad)?.broadcast_matmul(&inv_t)?.neg()?))
        }),
    )
}

/// One n x n matrix (row-major) inverted; none when singular.
fn invert(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    let scale = a.iter().fold(0f64, |s, v| s.max(v.abs()));
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| m[i * n + col].abs().total_cmp(&m[j * n + col].abs()))?;
        if m[pivot * n + col].abs() <= scale * 1e-12 || !m[pivot * n + col].is_finite() {
            return None;
        }
        for k in 0..n {
            m.swap(col * n + k, pivot * n + k);
            inv.swap(col * n + k, pivot * n + k);
        }
        let p = m[col * n + col];
        for k in 0..n {
            m[col * n + k] /= p;
            inv[col * n + k] /= p;
        }
        for row in (0..n).filter(|&r| r != col) {
            let f = m[row * n + col];
            if f != 0.0 {
                for k in 0..n {
                    m[row * n + k] -= f * m[col * n + k];
                    inv[row * n + k] -= f * inv[col * n + k];
                }
            }
        }
    }
    Some(inv)
}

fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        candle_core::bail!("matmul needs operands of rank >= 2, got {:?} and {:?}", a.dims(), b.dims());
    }
    match a.broadcast_matmul(b) {
        Ok(t) => Ok(t),
        // Some strided layouts are not supported by the kernels: retry on contiguous copies.
        Err(_) => a.contiguous()?.broadcast_matmul(&b.contiguous()?),
    }
}

impl HostOps for CandleOps<'_> {
    fn param(&mut self, name: RStr<'_>, shape: RSlice<'_, u64>, init: Init) -> GResult<TensorId> {
        self.op("param", |ops| {
            let key = ops.key(name.as_str());
            if init.kind == graft_abi::InitKind::FROM_LAYER {
                return Err(err(format!("{key}: a parameter initialised from the layer must be declared in the plan")));
            }
            let init = InitKind::try_from(init).map_err(|e| err(format!("{key}: {e}")))?;
            let (p, created) = ops.store.get_or_create(&key, &shape_usize(shape), init, "default", true).map_err(|e| err(e.to_string()))?;
            if created {
                ops.created.push(key);
            }
            Ok(p.tensor())
        })
    }

    fn get_param(&mut self, name: RStr<'_>) -> GResult<TensorId> {
        self.op("get_param", |ops| {
            let key = ops.key(name.as_str());
            match ops.store.get(&key) {
                Some(p) => Ok(p.tensor()),
                None => Err(err(format!(
                    "no parameter `{}` on layer `{}` for strategy `{}` (declare it in the plan, or create it with param)",
                    key.name, key.layer, key.strategy
                ))),
            }
        })
    }

    fn base_weight(&mut self) -> GResult<TensorId> {
        self.op("base_weight", |ops| {
            let w = ops
                .base
                .as_ref()
                .map(|b| b.weight.clone())
                .ok_or_else(|| err(format!("layer `{}` has no base weight here (an attention hook point?)", ops.layer)))?;
            // Plugins compute in f32: a weight kept in half precision is widened when asked for.
            w.to_dtype(candle_core::DType::F32).map_err(|e| err(format!("layer `{}`: {e}", ops.layer)))
        })
    }

    fn constant(&mut self, shape: RSlice<'_, u64>, value: f64) -> GResult<TensorId> {
        self.op("constant", |ops| {
            let shape = shape_usize(shape);
            Tensor::ones(shape.as_slice(), ops.store.dtype(), ops.store.device())
                .and_then(|t| t.affine(value, 0.0))
                .map_err(|e| err(format!("shape {shape:?}: {e}")))
        })
    }

    fn matmul(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("matmul", a, b, matmul)
    }

    fn linear(&mut self, x: TensorId, weight: TensorId, bias: ROption<TensorId>) -> GResult<TensorId> {
        self.op("linear", |ops| {
            let (x, w) = (ops.tensor(x)?, ops.tensor(weight)?);
            let b = match bias.into_option() {
                Some(b) => Some(ops.tensor(b)?),
                None => None,
            };
            linear(&x, &w, b.as_ref()).map_err(|e| candle(e, &[&x, &w]))
        })
    }

    fn add(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("add", a, b, |a, b| a.broadcast_add(b))
    }

    fn sub(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("sub", a, b, |a, b| a.broadcast_sub(b))
    }

    fn mul(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("mul", a, b, |a, b| a.broadcast_mul(b))
    }

    fn div(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("div", a, b, |a, b| a.broadcast_div(b))
    }

    fn affine(&mut self, x: TensorId, mul: f64, add: f64) -> GResult<TensorId> {
        self.unary("affine", x, |x| x.affine(mul, add))
    }

    fn scale(&mut self, x: TensorId, s: f64) -> GResult<TensorId> {
        self.unary("scale", x, |x| x.affine(s, 0.0))
    }

    fn sigmoid(&mut self, x: TensorId) -> GResult<TensorId> {
        // 1 / (1 + e^-x), written out so it has a backward.
        self.unary("sigmoid", x, |x| x.neg()?.exp()?.affine(1.0, 1.0)?.recip())
    }

    fn tanh(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("tanh", x, |x| x.tanh())
    }

    fn silu(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("silu", x, |x| x.silu())
    }

    fn gelu(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("gelu", x, |x| x.gelu_erf())
    }

    fn relu(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("relu", x, |x| x.relu())
    }

    fn exp(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("exp", x, |x| x.exp())
    }

    fn sqrt(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("sqrt", x, |x| x.sqrt())
    }

    fn softmax(&mut self, x: TensorId, dim: i64) -> GResult<TensorId> {
        self.op("softmax", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dim(dim, x.rank())?;
            softmax(&x, d).map_err(|e| candle(e, &[&x]))
        })
    }

    fn reshape(&mut self, x: TensorId, shape: RSlice<'_, i64>) -> GResult<TensorId> {
        self.op("reshape", |ops| {
            let x = ops.tensor(x)?;
            let n = x.elem_count();
            let known: i64 = shape.iter().filter(|&&d| d >= 0).product();
            let inferred = shape.iter().filter(|&&d| d == -1).count();
            if shape.iter().any(|&d| d < -1) || inferred > 1 {
                return Err(err(format!("invalid shape {:?}: dimensions are >= 0, at most one may be -1", shape.as_slice())));
            }
            let fill = if inferred == 1 {
                if known == 0 || n as i64 % known != 0 {
                    return Err(err(format!("cannot reshape {:?} ({n} elements) to {:?}", x.dims(), shape.as_slice())));
                }
                n as i64 / known
            } else {
                0
            };
            let dims: Vec<usize> = shape.iter().map(|&d| if d == -1 { fill as usize } else { d as usize }).collect();
            if dims.iter().product::<usize>() != n {
                return Err(err(format!("cannot reshape {:?} ({n} elements) to {dims:?}", x.dims())));
            }
            x.reshape(dims).map_err(|e| candle(e, &[&x]))
        })
    }

    fn transpose(&mut self, x: TensorId, dim0: i64, dim1: i64) -> GResult<TensorId> {
        self.op("transpose", |ops| {
            let x = ops.tensor(x)?;
            let (a, b) = (resolve_dim(dim0, x.rank())?, resolve_dim(dim1, x.rank())?);
            x.transpose(a, b).map_err(|e| candle(e, &[&x]))
        })
    }

    fn narrow(&mut self, x: TensorId, dim: i64, start: u64, len: u64) -> GResult<TensorId> {
        self.op("narrow", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dim(dim, x.rank())?;
            x.narrow(d, start as usize, len as usize).map_err(|e| candle(e, &[&x]))
        })
    }

    fn concat(&mut self, xs: RSlice<'_, TensorId>, dim: i64) -> GResult<TensorId> {
        self.op("concat", |ops| {
            let ts = xs.iter().map(|&id| ops.tensor(id)).collect::<Result<Vec<_>, _>>()?;
            let Some(first) = ts.first() else {
                return Err(err("nothing to concatenate"));
            };
            let d = resolve_dim(dim, first.rank())?;
            let refs: Vec<&Tensor> = ts.iter().collect();
            Tensor::cat(&ts, d).map_err(|e| candle(e, &refs))
        })
    }

    fn sum(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId> {
        self.op("sum", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dims(dims, x.rank())?;
            let r = if keepdim { x.sum_keepdim(d) } else { x.sum(d) };
            r.map_err(|e| candle(e, &[&x]))
        })
    }

    fn mean(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId> {
        self.op("mean", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dims(dims, x.rank())?;
            let r = if keepdim { x.mean_keepdim(d) } else { x.mean(d) };
            r.map_err(|e| candle(e, &[&x]))
        })
    }

    fn norm(&mut self, x: TensorId, dims: RSlice<'_, i64>, keepdim: bool) -> GResult<TensorId> {
        self.op("norm", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dims(dims, x.rank())?;
            let sq = x.sqr().map_err(|e| candle(e, &[&x]))?;
            let s = if keepdim { sq.sum_keepdim(d) } else { sq.sum(d) };
            s.and_then(|s| s.sqrt()).map_err(|e| candle(e, &[&x]))
        })
    }

    fn dropout(&mut self, x: TensorId, p: f64) -> GResult<TensorId> {
        self.op("dropout", |ops| {
            let x = ops.tensor(x)?;
            if !(0.0..1.0).contains(&p) {
                return Err(err(format!("probability must be in [0, 1), got {p}")));
            }
            if !ops.training || p == 0.0 {
                return Ok(x);
            }
            let keep = ops
                .rng
                .rand(x.dims(), x.device())
                .and_then(|u| u.ge(p))
                .and_then(|m| m.to_dtype(x.dtype()))
                .and_then(|m| m.affine(1.0 / (1.0 - p), 0.0))
                .map_err(|e| candle(e, &[&x]))?;
            x.mul(&keep).map_err(|e| candle(e, &[&x]))
        })
    }

    fn detach(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("detach", x, |x| Ok(x.detach()))
    }

    fn shape(&mut self, x: TensorId) -> GResult<RVec<u64>> {
        match self.tensor(x) {
            Ok(t) => RResult::ROk(t.dims().iter().map(|&d| d as u64).collect()),
            Err(mut e) => {
                e.message = format!("shape: {}", e.message).into();
                RResult::RErr(e)
            }
        }
    }

    fn to_scalar(&mut self, x: TensorId) -> GResult<f64> {
        let run = || -> Result<f64, GraftError> {
            let t = self.tensor(x)?;
            if t.elem_count() != 1 {
                return Err(err(format!("to_scalar needs a one-element tensor, got shape {:?}", t.dims())));
            }
            let v = t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1::<f64>()).map_err(|e| candle(e, &[&t]))?;
            Ok(v[0])
        };
        match run() {
            Ok(v) => RResult::ROk(v),
            Err(mut e) => {
                e.message = format!("to_scalar: {}", e.message).into();
                RResult::RErr(e)
            }
        }
    }

    fn log(&mut self, level: LogLevel, message: RStr<'_>) {
        let (s, l, m) = (self.strategy, self.layer, message.as_str());
        match level {
            LogLevel::ERROR => tracing::error!(strategy = s, layer = l, "{m}"),
            LogLevel::WARN => tracing::warn!(strategy = s, layer = l, "{m}"),
            LogLevel::DEBUG => tracing::debug!(strategy = s, layer = l, "{m}"),
            _ => tracing::info!(strategy = s, layer = l, "{m}"),
        }
    }
}

/// The ops of the `graft.ops` extension, for the call in progress (see [`HOST_OPS_V1`]).
impl CandleOps<'_> {
    fn base_bias(&mut self) -> GResult<ROption<TensorId>> {
        let Some(base) = &self.base else {
            return RResult::RErr(err(format!("base_bias: layer `{}` has no base weight here (an attention hook point?)", self.layer)));
        };
        match base.bias.clone().map(|b| b.to_dtype(DType::F32)) {
            None => RResult::ROk(ROption::RNone),
            Some(Ok(b)) => RResult::ROk(ROption::RSome(self.insert(b))),
            Some(Err(e)) => RResult::RErr(err(format!("base_bias: layer `{}`: {e}", self.layer))),
        }
    }

    fn abs(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("abs", x, |x| x.abs())
    }

    fn clamp(&mut self, x: TensorId, min: f64, max: f64) -> GResult<TensorId> {
        if min.is_nan() || max.is_nan() || min > max {
            return RResult::RErr(err(format!("clamp: needs min <= max, got [{min}, {max}]")));
        }
        // maximum / minimum against scalars carry candle's backward (clamp itself has none).
        self.unary("clamp", x, |x| x.maximum(min)?.minimum(max))
    }

    fn maximum(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("maximum", a, b, |a, b| a.broadcast_maximum(b))
    }

    fn minimum(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("minimum", a, b, |a, b| a.broadcast_minimum(b))
    }

    fn where_cond(&mut self, cond: TensorId, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.op("where_cond", |ops| {
            let (c, a, b) = (ops.tensor(cond)?, ops.tensor(a)?, ops.tensor(b)?);
            where_cond(&c, &a, &b).map_err(|e| candle(e, &[&c, &a, &b]))
        })
    }

    fn gt(&mut self, a: TensorId, b: TensorId) -> GResult<TensorId> {
        self.binary("gt", a, b, |a, b| a.broadcast_gt(b)?.to_dtype(a.dtype()))
    }

    fn ln(&mut self, x: TensorId) -> GResult<TensorId> {
        self.unary("ln", x, |x| x.log())
    }

    fn powf(&mut self, x: TensorId, e: f64) -> GResult<TensorId> {
        self.unary("powf", x, |x| x.powf(e))
    }

    fn eye(&mut self, n: u64) -> GResult<TensorId> {
        self.op("eye", |ops| {
            let n = n as usize;
            let values: Vec<f32> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
            Tensor::from_vec(values, (n, n), ops.store.device()).and_then(|t| t.to_dtype(ops.store.dtype())).map_err(|e| err(e.to_string()))
        })
    }

    fn inverse(&mut self, x: TensorId) -> GResult<TensorId> {
        self.op("inverse", |ops| {
            let x = ops.tensor(x)?;
            inverse(&x).map_err(|e| candle(e, &[&x]))
        })
    }

    fn permute(&mut self, x: TensorId, dims: RSlice<'_, i64>) -> GResult<TensorId> {
        self.op("permute", |ops| {
            let x = ops.tensor(x)?;
            let order = dims.iter().map(|&d| resolve_dim(d, x.rank())).collect::<Result<Vec<_>, _>>()?;
            let mut sorted = order.clone();
            sorted.sort_unstable();
            if sorted != (0..x.rank()).collect::<Vec<_>>() {
                return Err(err(format!("{:?} is not a permutation of the {} dimensions of {:?}", dims.as_slice(), x.rank(), x.dims())));
            }
            x.permute(order).map_err(|e| candle(e, &[&x]))
        })
    }

    fn index_select(&mut self, x: TensorId, dim: i64, indices: RSlice<'_, u64>) -> GResult<TensorId> {
        self.op("index_select", |ops| {
            let x = ops.tensor(x)?;
            let d = resolve_dim(dim, x.rank())?;
            if let Some(&bad) = indices.iter().find(|&&i| i as usize >= x.dim(d).unwrap_or(0)) {
                return Err(err(format!("index {bad} out of range for dimension {dim} of {:?}", x.dims())));
            }
            let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, indices.len(), x.device()).map_err(|e| err(e.to_string()))?;
            x.index_select(&idx, d).map_err(|e| candle(e, &[&x]))
        })
    }

    fn random_normal(&mut self, shape: RSlice<'_, u64>, seed: u64) -> GResult<TensorId> {
        self.op("random_normal", |ops| {
            let shape = shape_usize(shape);
            GraftRng::new(seed)
                .randn(shape.as_slice(), ops.store.device())
                .and_then(|t| t.to_dtype(ops.store.dtype()))
                .map_err(|e| err(format!("shape {shape:?}: {e}")))
        })
    }
}

thread_local! {
    /// The ops table of the plugin call this thread is running, for the extension's functions,
    /// which get no table of their own.
    static CURRENT: std::cell::Cell<*mut ()> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

impl<'a> CandleOps<'a> {
    /// Runs a plugin entry point `f` with this table, as the ABI table and as the current call
    /// of this thread (for the `graft.ops` extension).
    pub fn call<R>(&mut self, f: impl FnOnce(HostOpsMut<'_>) -> R) -> R {
        struct Restore(*mut ());
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let this: *mut Self = self;
        let _restore = Restore(CURRENT.with(|c| c.replace(this as *mut ())));
        // SAFETY: `this` comes from `&mut self`, which outlives the call; the extension reaches
        // the table only while the plugin runs inside `f`, one op at a time, on this thread.
        f(HostOps_TO::from_ptr(unsafe { &mut *this }, TD_Opaque))
    }
}

/// Runs `f` on the call in progress on this thread.
fn with_current<T>(op: &str, f: impl FnOnce(&mut CandleOps<'static>) -> GResult<T>) -> GResult<T> {
    let p = CURRENT.with(|c| c.get());
    if p.is_null() {
        return RResult::RErr(err(format!("{op}: called outside a plugin call (extension ops work only inside forward, delta_weight, export or init_param, on the host's thread)")));
    }
    // SAFETY: set by `CandleOps::call` for the duration of the plugin call; the lifetime is
    // erased because the table only lives that long, and nothing here keeps the reference.
    f(unsafe { &mut *(p as *mut CandleOps<'static>) })
}

macro_rules! ext_fns {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(pub(super) extern "C" fn $name($($arg: $ty),*) -> GResult<$ret> {
            with_current(stringify!($name), |ops| ops.$name($($arg),*))
        })*
    };
}

mod ext {
    use super::*;
    ext_fns! {
        base_bias() -> ROption<TensorId>;
        abs(x: TensorId) -> TensorId;
        clamp(x: TensorId, min: f64, max: f64) -> TensorId;
        maximum(a: TensorId, b: TensorId) -> TensorId;
        minimum(a: TensorId, b: TensorId) -> TensorId;
        where_cond(c: TensorId, a: TensorId, b: TensorId) -> TensorId;
        gt(a: TensorId, b: TensorId) -> TensorId;
        ln(x: TensorId) -> TensorId;
        powf(x: TensorId, e: f64) -> TensorId;
        eye(n: u64) -> TensorId;
        inverse(x: TensorId) -> TensorId;
        permute(x: TensorId, dims: RSlice<'_, i64>) -> TensorId;
        index_select(x: TensorId, dim: i64, indices: RSlice<'_, u64>) -> TensorId;
        random_normal(shape: RSlice<'_, u64>, seed: u64) -> TensorId;
    }
}

/// The host's side of the `graft.ops` extension, handed to each plugin that has it.
pub static HOST_OPS_V1: HostOpsV1Ext = HostOpsV1Ext {
    base_bias: ext::base_bias,
    abs: ext::abs,
    clamp: ext::clamp,
    maximum: ext::maximum,
    minimum: ext::minimum,
    where_cond: ext::where_cond,
    gt: ext::gt,
    ln: ext::ln,
    powf: ext::powf,
    eye: ext::eye,
    inverse: ext::inverse,
    permute: ext::permute,
    index_select: ext::index_select,
    random_normal: ext::random_normal,
};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ok<T>(r: GResult<T>) -> T {
        match r {
            RResult::ROk(v) => v,
            RResult::RErr(e) => panic!("op failed: {e}"),
        }
    }

    fn fail<T: std::fmt::Debug>(r: GResult<T>) -> String {
        match r {
            RResult::ROk(v) => panic!("op should fail, got {v:?}"),
            RResult::RErr(e) => e.message.into_string(),
        }
    }

    fn store() -> ParamStore {
        ParamStore::new(&Device::Cpu, DType::F32, 3)
    }

    #[test]
    fn lora_math_matches_candle_and_has_gradients() -> candle_core::Result<()> {
        let store = store();
        let mut rng = GraftRng::new(1);
        let x = rng.randn((2, 3, 4), &Device::Cpu)?;
        let w = rng.randn((5, 4), &Device::Cpu)?;
        let mut ops = CandleOps::new(&store, &mut rng, "lora", "unet.l", Some(LinearWeights { weight: w.clone(), bias: None }), true);
        let xi = ops.insert(x.clone());
        let down = ok(ops.param("down".into(), [2u64, 4].as_slice().into(), Init::normal(0.0, 1.0)));
        let up = ok(ops.param("up".into(), [5u64, 2].as_slice().into(), Init::constant(0.1)));
        let h = ok(ops.linear(xi, down, ROption::RNone));
        let d = ok(ops.linear(h, up, ROption::RNone));
        let base = ok(ops.base_weight());
        let b = ok(ops.linear(xi, base, ROption::RNone));
        let y = ok(ops.add(b, d));
        let y = ops.tensor(y).unwrap();

        let dv = store.get(&ParamKey::new("lora", "unet.l", "down")).unwrap().var;
        let uv = store.get(&ParamKey::new("lora", "unet.l", "up")).unwrap().var;
        let want = x.broadcast_matmul(&w.t()?)?.add(&x.broadcast_matmul(&dv.as_tensor().t()?)?.broadcast_matmul(&uv.as_tensor().t()?)?)?;
        let diff = (y.clone() - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");

        let grads = y.sqr()?.sum_all()?.backward()?;
        for v in [&dv, &uv] {
            let g = grads.get(v.as_tensor()).expect("gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        assert_eq!(ops.created_params().len(), 2);
        Ok(())
    }

    #[test]
    fn shape_ops_and_reductions() -> candle_core::Result<()> {
        let store = store();
        let mut rng = GraftRng::new(1);
        let mut ops = CandleOps::new(&store, &mut rng, "s", "l", None, false);
        let x = ops.insert(Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?);
        let r = ok(ops.reshape(x, [-1i64, 4].as_slice().into()));
        assert_eq!(ok(ops.shape(r)).as_slice(), &[6, 4]);
        let t = ok(ops.transpose(x, -1, 0));
        assert_eq!(ok(ops.shape(t)).as_slice(), &[4, 3, 2]);
        let n = ok(ops.narrow(x, -1, 1, 2));
        assert_eq!(ok(ops.shape(n)).as_slice(), &[2, 3, 2]);
        let c = ok(ops.concat([x, x].as_slice().into(), 1));
        assert_eq!(ok(ops.shape(c)).as_slice(), &[2, 6, 4]);
        let s = ok(ops.sum(x, RSlice::from_slice(&[]), false));
        assert_eq!(ok(ops.to_scalar(s)), 276.0);
        let m = ok(ops.mean(x, [0i64, 2].as_slice().into(), true));
        assert_eq!(ok(ops.shape(m)).as_slice(), &[1, 3, 1]);
        let sm = ok(ops.softmax(x, -1));
        let total = ok(ops.sum(sm, RSlice::from_slice(&[]), false));
        assert!((ok(ops.to_scalar(total)) - 6.0).abs() < 1e-5);
        let k = ok(ops.constant([2u64].as_slice().into(), 3.0));
        let four = ok(ops.constant([2u64].as_slice().into(), 4.0));
        let pair = ok(ops.concat([k, four].as_slice().into(), 0));
        let nrm = ok(ops.norm(pair, RSlice::from_slice(&[]), false));
        assert!((ok(ops.to_scalar(nrm)) - 50f64.sqrt()).abs() < 1e-5);
        let sg = ok(ops.sigmoid(k));
        let first = ok(ops.narrow(sg, 0, 0, 1));
        assert!((ok(ops.to_scalar(first)) - 1.0 / (1.0 + (-3f64).exp())).abs() < 1e-6);
        // Dropout is the identity outside training.
        let d = ok(ops.dropout(x, 0.5));
        assert_eq!(ops.tensor(d).unwrap().to_vec3::<f32>()?, ops.tensor(x).unwrap().to_vec3::<f32>()?);
        Ok(())
    }

    /// The ops added after ABI version 1, each against a value computed by hand, with the
    /// gradients that pass through them.
    #[test]
    fn added_ops_values_and_gradients() -> candle_core::Result<()> {
        let store = store();
        let mut rng = GraftRng::new(1);
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2.0], [3.0, 0.5]], &dev)?;
        let bias = Tensor::new(&[0.25f32, -1.0], &dev)?;
        let mut ops = CandleOps::new(&store, &mut rng, "s", "l", Some(LinearWeights { weight: w.clone(), bias: Some(bias) }), true);
        let vals = |ops: &CandleOps<'_>, id| ops.tensor(id).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = ok(ops.base_bias()).into_option().expect("a bias");
        assert_eq!(vals(&ops, b), vec![0.25, -1.0]);
        let x = Var::new(&[[-1.5f32, 0.5], [2.0, -3.0]], &dev)?;
        let xi = ops.insert(x.as_tensor().clone());
        let a = ok(ops.abs(xi));
        assert_eq!(vals(&ops, a), vec![1.5, 0.5, 2.0, 3.0]);
        let c = ok(ops.clamp(xi, -1.0, 1.0));
        assert_eq!(vals(&ops, c), vec![-1.0, 0.5, 1.0, -1.0]);
        assert!(fail(ops.clamp(xi, 1.0, -1.0)).contains("min <= max"));
        let wi = ops.insert(w.clone());
        let mx = ok(ops.maximum(xi, wi));
        assert_eq!(vals(&ops, mx), vec![1.0, 0.5, 3.0, 0.5]);
        let mn = ok(ops.minimum(xi, wi));
        assert_eq!(vals(&ops, mn), vec![-1.5, -2.0, 2.0, -3.0]);
        let mask = ok(ops.gt(xi, wi));
        assert_eq!(vals(&ops, mask), vec![0.0, 1.0, 0.0, 0.0]);
        let zero = ok(ops.constant([].as_slice().into(), 0.0));
        let sel = ok(ops.where_cond(mask, xi, zero));
        assert_eq!(vals(&ops, sel), vec![0.0, 0.5, 0.0, 0.0]);
        let p = ok(ops.powf(a, 2.0));
        let l = ok(ops.ln(p));
        assert!(vals(&ops, l).iter().zip([2.25f32, 0.25, 4.0, 9.0]).all(|(v, w)| (v - w.ln()).abs() < 1e-6));
        let e = ok(ops.eye(3));
        assert_eq!(vals(&ops, e), vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        let pm = ok(ops.permute(wi, [1i64, 0].as_slice().into()));
        assert_eq!(vals(&ops, pm), vec![1.0, 3.0, -2.0, 0.5]);
        assert!(fail(ops.permute(wi, [0i64, 0].as_slice().into())).contains("not a permutation"));
        let rows = ok(ops.index_select(xi, 0, [1u64, 0, 1].as_slice().into()));
        assert_eq!(vals(&ops, rows), vec![2.0, -3.0, -1.5, 0.5, 2.0, -3.0]);
        assert!(fail(ops.index_select(xi, 0, [2u64].as_slice().into())).contains("out of range"));
        let r1 = ok(ops.random_normal([4u64].as_slice().into(), 9));
        let r2 = ok(ops.random_normal([4u64].as_slice().into(), 9));
        assert_eq!(vals(&ops, r1), vals(&ops, r2));
        // inverse: x @ inverse(x) = I, and its gradient matches -A^-T G A^-T.
        let inv = ok(ops.inverse(xi));
        let prod = ok(ops.matmul(xi, inv));
        assert!(vals(&ops, prod).iter().zip([1f32, 0.0, 0.0, 1.0]).all(|(v, w)| (v - w).abs() < 1e-5));
        let single = ops.insert(Tensor::new(&[[1f32, 2.0], [2.0, 4.0]], &dev)?);
        assert!(fail(ops.inverse(single)).contains("singular"));
        let parts = [a, c, mx, mn, sel, l, rows, inv];
        let total = parts.iter().map(|&id| ops.tensor(id).unwrap().sum_all().unwrap()).reduce(|s, t| (s + t).unwrap()).unwrap();
        let grads = total.backward()?;
        let g = grads.get(x.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
        // By hand: abs sign + clamp inside + max/min winners + where + d ln(x²) = 2/x + rows (1, 2)
        // + inverse: -(A^-T 1 A^-T).
        let xv = [-1.5f64, 0.5, 2.0, -3.0];
        let inv_v = x.as_tensor().to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let det = inv_v[0][0] * inv_v[1][1] - inv_v[0][1] * inv_v[1][0];
        let ai = [[inv_v[1][1] / det, -inv_v[0][1] / det], [-inv_v[1][0] / det, inv_v[0][0] / det]];
        let ait = [[ai[0][0], ai[1][0]], [ai[0][1], ai[1][1]]];
        let s = [ait[0][0] + ait[0][1], ait[1][0] + ait[1][1]];
        let col = [ait[0][0] + ait[1][0], ait[0][1] + ait[1][1]];
        let inv_grad = [-s[0] * col[0], -s[0] * col[1], -s[1] * col[0], -s[1] * col[1]];
        let clamp_in = [0.0, 1.0, 0.0, 0.0];
        let max_win = [0.0, 1.0, 0.0, 0.0];
        let min_win = [1.0, 0.0, 1.0, 1.0];
        let where_in = [0.0, 1.0, 0.0, 0.0];
        let rows_n = [1.0, 1.0, 2.0, 2.0];
        for i in 0..4 {
            let want = xv[i].signum() + clamp_in[i] + max_win[i] + min_win[i] + where_in[i] + 2.0 / xv[i] + rows_n[i] + inv_grad[i];
            assert!((g[i] as f64 - want).abs() < 1e-4, "element {i}: {} vs {want}", g[i]);
        }
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_and_scaled() -> candle_core::Result<()> {
        let store = store();
        let run = |seed: u64| -> Vec<f32> {
            let mut rng = GraftRng::new(seed);
            let mut ops = CandleOps::new(&store, &mut rng, "s", "l", None, true);
            let x = ops.insert(Tensor::ones(1000, DType::F32, &Device::Cpu).unwrap());
            let d = ok(ops.dropout(x, 0.25));
            ops.tensor(d).unwrap().to_vec1::<f32>().unwrap()
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        let kept = a.iter().filter(|&&v| v > 0.0).count();
        assert!((650..850).contains(&kept), "{kept}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn errors_are_values() -> candle_core::Result<()> {
        let store = store();
        let mut rng = GraftRng::new(1);
        let stale = {
            let mut ops = CandleOps::new(&store, &mut rng, "s", "l", None, false);
            ops.insert(Tensor::zeros(2, DType::F32, &Device::Cpu)?)
        };
        let mut ops = CandleOps::new(&store, &mut rng, "s", "l", None, false);
        let a = ops.insert(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?);
        let b = ops.insert(Tensor::zeros((4, 5), DType::F32, &Device::Cpu)?);
        assert!(fail(ops.matmul(a, b)).starts_with("matmul: "));
        assert!(fail(ops.add(a, b)).contains("operand shapes [2, 3], [4, 5]"));
        assert!(fail(ops.add(a, TensorId(77))).contains("unknown tensor handle 77"));
        assert!(fail(ops.add(a, stale)).contains("comes from an earlier call"));
        assert!(fail(ops.reshape(a, [-1i64, -1].as_slice().into())).contains("at most one may be -1"));
        assert!(fail(ops.reshape(a, [4i64].as_slice().into())).contains("cannot reshape"));
        assert!(fail(ops.transpose(a, 0, 2)).contains("out of range"));
        assert!(fail(ops.narrow(a, 1, 2, 5)).starts_with("narrow: "));
        assert!(fail(ops.base_weight()).contains("no base weight"));
        assert!(fail(ops.get_param("nope".into())).contains("no parameter `nope`"));
        assert!(fail(ops.to_scalar(a)).contains("one-element"));
        assert!(fail(ops.dropout(a, 1.5)).contains("[0, 1)"));
        assert!(fail(ops.concat(RSlice::from_slice(&[]), 0)).contains("nothing to concatenate"));
        let bad = Init { kind: graft_abi::InitKind(42), a: 0.0, b: 0.0 };
        assert!(fail(ops.param("p".into(), [2u64].as_slice().into(), bad)).contains("unknown parameter init kind"));
        ok(ops.param("p".into(), [2u64].as_slice().into(), Init::zeros()));
        assert!(fail(ops.param("p".into(), [3u64].as_slice().into(), Init::zeros())).contains("exists with shape [2]"));
        Ok(())
    }

    #[test]
    fn frozen_params_are_detached() -> crate::Result<()> {
        let store = store();
        let key = ParamKey::new("s", "l", "w");
        store.get_or_create(&key, &[2], InitKind::Constant(1.0), "g", false)?;
        let mut rng = GraftRng::new(1);
        let mut ops = CandleOps::new(&store, &mut rng, "s", "l", None, false);
        let w = ok(ops.get_param("w".into()));
        let t = ops.tensor(w).unwrap();
        let v: &Var = &store.get(&key).unwrap().var;
        let grads = t.sum_all()?.backward()?;
        assert!(grads.get(v.as_tensor()).is_none());
        Ok(())
    }
}
