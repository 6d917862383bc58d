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
use graft_abi::{GResult, GraftError, HostOps, HostOpsMut, HostOps_TO, Init, LogLevel, TensorId};
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
    base_weight: Option<Tensor>,
    training: bool,
    call: u32,
    tensors: Vec<Tensor>,
    created: Vec<ParamKey>,
}

impl<'a> CandleOps<'a> {
    /// Ops for a call of `strategy` at `layer`. `base_weight` is the layer's base weight
    /// [out, in] (none for attention hook points); `rng` feeds dropout; dropout is the identity
    /// unless `training`.
    pub fn new(
        store: &'a ParamStore,
        rng: &'a mut GraftRng,
        strategy: &'a str,
        layer: &'a str,
        base_weight: Option<Tensor>,
        training: bool,
    ) -> Self {
        Self {
            store,
            rng,
            strategy,
            layer,
            base_weight,
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
                format!(
                    "tensor handle {} comes from an earlier call (handles are valid only during the call that made them)",
                    id.0
                )
            }));
        }
        self.tensors.get(index).cloned().ok_or_else(|| {
            GraftError::op(format!("unknown tensor handle {} (this call has {} tensors)", id.0, self.tensors.len()))
        })
    }

    /// Parameters this call created (not declared in the plan).
    pub fn created_params(&self) -> &[ParamKey] {
        &self.created
    }

    /// The ABI trait object to hand to a plugin entry point.
    pub fn as_abi(&mut self) -> HostOpsMut<'_> {
        HostOps_TO::from_ptr(self, TD_Opaque)
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
            let init = InitKind::try_from(init).map_err(|e| err(format!("{key}: {e}")))?;
            let (p, created) = ops
                .store
                .get_or_create(&key, &shape_usize(shape), init, "default", true)
                .map_err(|e| err(e.to_string()))?;
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
            ops.base_weight
                .clone()
                .ok_or_else(|| err(format!("layer `{}` has no base weight here (an attention hook point?)", ops.layer)))
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
            let v = t
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| candle(e, &[&t]))?;
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
