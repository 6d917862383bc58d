//! Tensor handles over the host's ops table.
//!
//! An op that fails records the first error in the call and returns a poisoned handle; every
//! later op is skipped. The SDK returns that first error from the entry point, so operators can
//! return plain [`Tensor`]s and a plugin reads like ordinary tensor code.

use std::cell::RefCell;
use std::ops::{Add, Div, Mul, Neg, Sub};

use abi_stable::sabi_types::RMut;
use abi_stable::std_types::{RNone, ROption, RResult, RSome};
use graft_abi::{ErrorKind, ForwardInputs, GResult, HostOps_TO, Init, LogLevel, TensorId};

/// The raw ops table as the host passes it.
type Raw<'a, 'b> = HostOps_TO<'a, RMut<'b, ()>>;

use crate::error::{Error, Result};

/// The host's ops added after ABI version 1 (extension `graft.ops`), handed over when the host
/// loads this library; unset under a host that predates them.
pub(crate) static HOST_EXT: std::sync::OnceLock<&'static graft_abi::HostOpsV1Ext> = std::sync::OnceLock::new();

/// The handle every op returns once the call is poisoned.
const POISONED: TensorId = TensorId(u64::MAX);

/// The state behind [`Ops`] for one entry-point call.
pub(crate) struct OpsState<'a, 'b> {
    raw: RefCell<Raw<'a, 'b>>,
    error: RefCell<Option<Error>>,
}

impl<'a, 'b> OpsState<'a, 'b> {
    pub(crate) fn new(raw: Raw<'a, 'b>) -> Self {
        Self { raw: RefCell::new(raw), error: RefCell::new(None) }
    }

    pub(crate) fn take_error(&self) -> Option<Error> {
        self.error.borrow_mut().take()
    }
}

/// Object-safe access to [`OpsState`], so [`Ops`] needs one lifetime only.
pub(crate) trait Backend {
    fn with_raw(&self, f: &mut dyn FnMut(&mut Raw<'_, '_>));
    fn record(&self, e: Error);
    fn poisoned(&self) -> bool;
    fn first_error(&self) -> Option<Error>;
}

impl Backend for OpsState<'_, '_> {
    fn with_raw(&self, f: &mut dyn FnMut(&mut Raw<'_, '_>)) {
        let mut raw = self.raw.borrow_mut();
        f(&mut raw)
    }

    fn record(&self, e: Error) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn poisoned(&self) -> bool {
        self.error.borrow().is_some()
    }

    fn first_error(&self) -> Option<Error> {
        self.error.borrow().clone()
    }
}

/// The host's ops table for the current call (copyable handle).
#[derive(Clone, Copy)]
pub struct Ops<'o> {
    backend: &'o dyn Backend,
    training: bool,
    step: u64,
}

impl<'o> Ops<'o> {
    pub(crate) fn new(backend: &'o dyn Backend, training: bool, step: u64) -> Self {
        Self { backend, training, step }
    }

    /// Runs one op that returns a tensor, honouring the poison rule.
    fn run(self, op: &str, mut f: impl FnMut(&mut Raw<'_, '_>) -> GResult<TensorId>) -> Tensor<'o> {
        if self.backend.poisoned() {
            return Tensor { id: POISONED, ops: self };
        }
        let mut out = RResult::RErr(graft_abi::GraftError::op("op not run"));
        self.backend.with_raw(&mut |raw| out = f(raw));
        match out {
            RResult::ROk(id) => Tensor { id, ops: self },
            RResult::RErr(e) => {
                self.backend.record(Error::new(e.kind, format!("{op}: {}", e.message)));
                Tensor { id: POISONED, ops: self }
            }
        }
    }

    /// Runs one op that returns something else; `fallback` when poisoned or failed.
    fn query<T>(self, op: &str, fallback: T, mut f: impl FnMut(&mut Raw<'_, '_>) -> GResult<T>) -> T {
        if self.backend.poisoned() {
            return fallback;
        }
        let mut out = None;
        self.backend.with_raw(&mut |raw| out = Some(f(raw)));
        match out {
            Some(RResult::ROk(v)) => v,
            Some(RResult::RErr(e)) => {
                self.backend.record(Error::new(e.kind, format!("{op}: {}", e.message)));
                fallback
            }
            None => fallback,
        }
    }

    /// The `graft.ops` extension; under a host that predates it, `None` and an `unsupported`
    /// error recorded for `op`.
    fn ext(self, op: &str) -> Option<&'static graft_abi::HostOpsV1Ext> {
        let ext = HOST_EXT.get().copied();
        if ext.is_none() {
            self.fail(Error::new(
                ErrorKind::UNSUPPORTED,
                format!("{op}: this graft is older than the plugin's graft-sdk (it lacks the `graft.ops` extension): update graft"),
            ));
        }
        ext
    }

    /// Runs one op of the `graft.ops` extension, honouring the poison rule.
    fn run_ext(self, op: &str, f: impl Fn(&graft_abi::HostOpsV1Ext) -> GResult<TensorId>) -> Tensor<'o> {
        match self.ext(op) {
            Some(ext) => self.run(op, |_| f(ext)),
            None => Tensor { id: POISONED, ops: self },
        }
    }

    /// True in training (dropout active), false in inference.
    pub fn training(self) -> bool {
        self.training
    }

    /// The optimizer step (0 in inference).
    pub fn step(self) -> u64 {
        self.step
    }

    /// The first error of this call, if an op failed. Entry points return it anyway; call this
    /// to stop early.
    pub fn check(self) -> Result<()> {
        match self.backend.first_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Records an error: the call fails with it (unless an earlier one is recorded).
    pub fn fail(self, error: Error) {
        self.backend.record(error);
    }

    /// Wraps a raw handle (one the host gave this call).
    pub fn tensor(self, id: TensorId) -> Tensor<'o> {
        Tensor { id, ops: self }
    }

    /// The parameter `name` of the current layer, created with `shape` and `init` if missing.
    pub fn param(self, name: &str, shape: &[usize], init: Init) -> Tensor<'o> {
        let shape = dims_u64(shape);
        self.run("param", |raw| raw.param(name.into(), shape.as_slice().into(), init))
    }

    /// An existing parameter of the current layer (declared in the plan).
    pub fn get_param(self, name: &str) -> Tensor<'o> {
        self.run("get_param", |raw| raw.get_param(name.into()))
    }

    /// The base weight `[out, in]` of the current linear layer.
    pub fn base_weight(self) -> Tensor<'o> {
        self.run("base_weight", |raw| raw.base_weight())
    }

    /// A tensor of `shape` filled with `value`.
    pub fn constant(self, shape: &[usize], value: f64) -> Tensor<'o> {
        let shape = dims_u64(shape);
        self.run("constant", |raw| raw.constant(shape.as_slice().into(), value))
    }

    /// The bias `[out]` of the current linear layer; `None` when it has none (or the call is
    /// poisoned). Detached from the graph unless the plan unfroze it.
    pub fn base_bias(self) -> Option<Tensor<'o>> {
        if self.backend.poisoned() {
            return None;
        }
        let ext = self.ext("base_bias")?;
        let id = self.query("base_bias", ROption::RNone, |_| (ext.base_bias)());
        id.into_option().map(|id| self.tensor(id))
    }

    /// The identity matrix `[n, n]`.
    pub fn eye(self, n: usize) -> Tensor<'o> {
        self.run_ext("eye", |ext| (ext.eye)(n as u64))
    }

    /// Standard normal values that depend only on `seed` and `shape`, with no gradient: a frozen
    /// random matrix rebuilt on every call instead of stored (VeRA's shared projections).
    pub fn random_normal(self, shape: &[usize], seed: u64) -> Tensor<'o> {
        let shape = dims_u64(shape);
        self.run_ext("random_normal", |ext| (ext.random_normal)(shape.as_slice().into(), seed))
    }

    /// `on_true` where `cond` is not 0, else `on_false` (broadcast). Gradients flow to both
    /// branches where they were taken, none to `cond`.
    pub fn where_cond(self, cond: Tensor<'o>, on_true: Tensor<'o>, on_false: Tensor<'o>) -> Tensor<'o> {
        let (c, a, b) = (cond.id, on_true.id, on_false.id);
        if [c, a, b].contains(&POISONED) {
            return Tensor { id: POISONED, ops: self };
        }
        self.run_ext("where_cond", |ext| (ext.where_cond)(c, a, b))
    }

    /// A 0-d tensor.
    pub fn scalar(self, value: f64) -> Tensor<'o> {
        self.constant(&[], value)
    }

    /// Concatenates along `dim` (negative counts from the end).
    pub fn concat(self, xs: &[Tensor<'o>], dim: i64) -> Tensor<'o> {
        let ids: Vec<TensorId> = xs.iter().map(|t| t.id).collect();
        if ids.contains(&POISONED) {
            return Tensor { id: POISONED, ops: self };
        }
        self.run("concat", |raw| raw.concat(ids.as_slice().into(), dim))
    }

    /// A message in the host's log.
    pub fn log(self, level: LogLevel, message: &str) {
        self.backend.with_raw(&mut |raw| raw.log(level, message.into()));
    }

    pub fn info(self, message: &str) {
        self.log(LogLevel::INFO, message)
    }

    pub fn warn(self, message: &str) {
        self.log(LogLevel::WARN, message)
    }
}

fn dims_u64(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

/// A handle to a host tensor, valid during the current call only. Copy it freely.
#[derive(Clone, Copy)]
pub struct Tensor<'o> {
    id: TensorId,
    ops: Ops<'o>,
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({})", self.id.0)
    }
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        $(
            $(#[$doc])*
            pub fn $name(self) -> Tensor<'o> {
                self.unary(stringify!($name), |raw, x| raw.$name(x))
            }
        )*
    };
}

impl<'o> Tensor<'o> {
    pub fn id(self) -> TensorId {
        self.id
    }

    pub fn ops(self) -> Ops<'o> {
        self.ops
    }

    fn unary(self, op: &str, f: impl Fn(&mut Raw<'_, '_>, TensorId) -> GResult<TensorId>) -> Tensor<'o> {
        let x = self.id;
        if x == POISONED {
            return self;
        }
        self.ops.run(op, |raw| f(raw, x))
    }

    fn binary(self, rhs: Tensor<'o>, op: &str, f: impl Fn(&mut Raw<'_, '_>, TensorId, TensorId) -> GResult<TensorId>) -> Tensor<'o> {
        let (a, b) = (self.id, rhs.id);
        if a == POISONED || b == POISONED {
            return Tensor { id: POISONED, ops: self.ops };
        }
        self.ops.run(op, |raw| f(raw, a, b))
    }

    fn unary_ext(self, op: &str, f: impl Fn(&graft_abi::HostOpsV1Ext, TensorId) -> GResult<TensorId>) -> Tensor<'o> {
        let x = self.id;
        if x == POISONED {
            return self;
        }
        self.ops.run_ext(op, |ext| f(ext, x))
    }

    fn binary_ext(self, rhs: Tensor<'o>, op: &str, f: impl Fn(&graft_abi::HostOpsV1Ext, TensorId, TensorId) -> GResult<TensorId>) -> Tensor<'o> {
        let (a, b) = (self.id, rhs.id);
        if a == POISONED || b == POISONED {
            return Tensor { id: POISONED, ops: self.ops };
        }
        self.ops.run_ext(op, |ext| f(ext, a, b))
    }

    /// The dimensions (empty when the call is poisoned).
    pub fn shape(self) -> Vec<usize> {
        let x = self.id;
        self.ops.query("shape", abi_stable::std_types::RVec::new(), |raw| raw.shape(x)).iter().map(|&d| d as usize).collect()
    }

    pub fn rank(self) -> usize {
        self.shape().len()
    }

    /// The size of dimension `dim` (negative counts from the end); 0 when it does not exist
    /// (and the call is poisoned with an error saying so).
    pub fn dim(self, dim: i64) -> usize {
        let shape = self.shape();
        if self.ops.backend.poisoned() {
            return 0;
        }
        let rank = shape.len() as i64;
        let d = if dim < 0 { dim + rank } else { dim };
        if d < 0 || d >= rank {
            self.ops.fail(Error::new(ErrorKind::OP, format!("dim: dimension {dim} out of range for shape {shape:?}")));
            return 0;
        }
        shape[d as usize]
    }

    /// The value of a one-element tensor (0.0 when the call is poisoned).
    pub fn to_scalar(self) -> f64 {
        let x = self.id;
        self.ops.query("to_scalar", 0.0, |raw| raw.to_scalar(x))
    }

    /// Matrix product over the last two dimensions.
    pub fn matmul(self, rhs: Tensor<'o>) -> Tensor<'o> {
        self.binary(rhs, "matmul", |raw, a, b| raw.matmul(a, b))
    }

    /// `self W^T + b` with `weight` [out, in].
    pub fn linear(self, weight: Tensor<'o>, bias: Option<Tensor<'o>>) -> Tensor<'o> {
        let (x, w) = (self.id, weight.id);
        let b: ROption<TensorId> = match bias {
            Some(t) => RSome(t.id),
            None => RNone,
        };
        if x == POISONED || w == POISONED || b == RSome(POISONED) {
            return Tensor { id: POISONED, ops: self.ops };
        }
        self.ops.run("linear", |raw| raw.linear(x, w, b))
    }

    /// Swaps the last two dimensions.
    pub fn t(self) -> Tensor<'o> {
        self.transpose(-2, -1)
    }

    pub fn transpose(self, dim0: i64, dim1: i64) -> Tensor<'o> {
        self.unary("transpose", |raw, x| raw.transpose(x, dim0, dim1))
    }

    pub fn reshape(self, shape: &[usize]) -> Tensor<'o> {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.reshape_infer(&shape)
    }

    /// Reshape where one dimension may be -1 (inferred).
    pub fn reshape_infer(self, shape: &[i64]) -> Tensor<'o> {
        self.unary("reshape", |raw, x| raw.reshape(x, shape.into()))
    }

    pub fn narrow(self, dim: i64, start: usize, len: usize) -> Tensor<'o> {
        self.unary("narrow", |raw, x| raw.narrow(x, dim, start as u64, len as u64))
    }

    /// Sum over `dims` (all when empty), dropping them.
    pub fn sum(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("sum", |raw, x| raw.sum(x, dims.into(), false))
    }

    pub fn sum_keepdim(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("sum", |raw, x| raw.sum(x, dims.into(), true))
    }

    /// Mean over `dims` (all when empty), dropping them.
    pub fn mean(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("mean", |raw, x| raw.mean(x, dims.into(), false))
    }

    pub fn mean_keepdim(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("mean", |raw, x| raw.mean(x, dims.into(), true))
    }

    /// L2 norm over `dims` (all when empty), dropping them.
    pub fn norm(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("norm", |raw, x| raw.norm(x, dims.into(), false))
    }

    pub fn norm_keepdim(self, dims: &[i64]) -> Tensor<'o> {
        self.unary("norm", |raw, x| raw.norm(x, dims.into(), true))
    }

    /// Differentiable softmax along `dim`.
    pub fn softmax(self, dim: i64) -> Tensor<'o> {
        self.unary("softmax", |raw, x| raw.softmax(x, dim))
    }

    /// Inverted dropout (the identity outside training).
    pub fn dropout(self, p: f64) -> Tensor<'o> {
        self.unary("dropout", |raw, x| raw.dropout(x, p))
    }

    /// `self * s`.
    pub fn scale(self, s: f64) -> Tensor<'o> {
        self.unary("scale", |raw, x| raw.scale(x, s))
    }

    /// `self * mul + add`.
    pub fn affine(self, mul: f64, add: f64) -> Tensor<'o> {
        self.unary("affine", |raw, x| raw.affine(x, mul, add))
    }

    /// `self * self`.
    pub fn sqr(self) -> Tensor<'o> {
        self * self
    }

    /// Limited to `[min, max]`; the gradient is 0 where the value was clamped.
    pub fn clamp(self, min: f64, max: f64) -> Tensor<'o> {
        self.unary_ext("clamp", |ext, x| (ext.clamp)(x, min, max))
    }

    /// Element-wise maximum (broadcast); the gradient goes to the larger operand.
    pub fn maximum(self, rhs: Tensor<'o>) -> Tensor<'o> {
        self.binary_ext(rhs, "maximum", |ext, a, b| (ext.maximum)(a, b))
    }

    /// Element-wise minimum (broadcast); the gradient goes to the smaller operand.
    pub fn minimum(self, rhs: Tensor<'o>) -> Tensor<'o> {
        self.binary_ext(rhs, "minimum", |ext, a, b| (ext.minimum)(a, b))
    }

    /// 1 where `self > rhs`, else 0 (broadcast); no gradient. A mask for [`Ops::where_cond`].
    pub fn gt(self, rhs: Tensor<'o>) -> Tensor<'o> {
        self.binary_ext(rhs, "gt", |ext, a, b| (ext.gt)(a, b))
    }

    /// `self` to the power `e`, element-wise.
    pub fn powf(self, e: f64) -> Tensor<'o> {
        self.unary_ext("powf", |ext, x| (ext.powf)(x, e))
    }

    /// Reorders the dimensions (`dims` a permutation of `0..rank`).
    pub fn permute(self, dims: &[i64]) -> Tensor<'o> {
        self.unary_ext("permute", |ext, x| (ext.permute)(x, dims.into()))
    }

    /// The entries `indices` along `dim` (a gather; the gradient scatters back).
    pub fn index_select(self, dim: i64, indices: &[usize]) -> Tensor<'o> {
        let indices = dims_u64(indices);
        self.unary_ext("index_select", |ext, x| (ext.index_select)(x, dim, indices.as_slice().into()))
    }

    /// |x|; gradient sign(x).
    pub fn abs(self) -> Tensor<'o> {
        self.unary_ext("abs", |ext, x| (ext.abs)(x))
    }

    /// Natural logarithm.
    pub fn ln(self) -> Tensor<'o> {
        self.unary_ext("ln", |ext, x| (ext.ln)(x))
    }

    /// The inverse of each square matrix in the last two dimensions (differentiable).
    pub fn inverse(self) -> Tensor<'o> {
        self.unary_ext("inverse", |ext, x| (ext.inverse)(x))
    }

    unary! {
        sigmoid,
        tanh,
        silu,
        gelu,
        relu,
        exp,
        sqrt,
        /// The same values, cut from the autograd graph.
        detach,
    }
}

macro_rules! binary_operator {
    ($trait:ident, $method:ident) => {
        impl<'o> $trait<Tensor<'o>> for Tensor<'o> {
            type Output = Tensor<'o>;
            fn $method(self, rhs: Tensor<'o>) -> Tensor<'o> {
                self.binary(rhs, stringify!($method), |raw, a, b| raw.$method(a, b))
            }
        }
    };
}

binary_operator!(Add, add);
binary_operator!(Sub, sub);
binary_operator!(Mul, mul);
binary_operator!(Div, div);

// Scalars go through `affine` (one host op, no constant tensor).

impl<'o> Add<f64> for Tensor<'o> {
    type Output = Tensor<'o>;
    fn add(self, s: f64) -> Tensor<'o> {
        self.affine(1.0, s)
    }
}

impl<'o> Add<Tensor<'o>> for f64 {
    type Output = Tensor<'o>;
    fn add(self, t: Tensor<'o>) -> Tensor<'o> {
        t.affine(1.0, self)
    }
}

impl<'o> Sub<f64> for Tensor<'o> {
    type Output = Tensor<'o>;
    fn sub(self, s: f64) -> Tensor<'o> {
        self.affine(1.0, -s)
    }
}

impl<'o> Sub<Tensor<'o>> for f64 {
    type Output = Tensor<'o>;
    fn sub(self, t: Tensor<'o>) -> Tensor<'o> {
        t.affine(-1.0, self)
    }
}

impl<'o> Mul<f64> for Tensor<'o> {
    type Output = Tensor<'o>;
    fn mul(self, s: f64) -> Tensor<'o> {
        self.affine(s, 0.0)
    }
}

impl<'o> Mul<Tensor<'o>> for f64 {
    type Output = Tensor<'o>;
    fn mul(self, t: Tensor<'o>) -> Tensor<'o> {
        t.affine(self, 0.0)
    }
}

impl<'o> Div<f64> for Tensor<'o> {
    type Output = Tensor<'o>;
    fn div(self, s: f64) -> Tensor<'o> {
        self.affine(1.0 / s, 0.0)
    }
}

impl<'o> Div<Tensor<'o>> for f64 {
    type Output = Tensor<'o>;
    fn div(self, t: Tensor<'o>) -> Tensor<'o> {
        t.ops.scalar(self) / t
    }
}

impl<'o> Neg for Tensor<'o> {
    type Output = Tensor<'o>;
    fn neg(self) -> Tensor<'o> {
        self.affine(-1.0, 0.0)
    }
}

/// The tensors a hook point gives to `forward`.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'o> {
    /// Linear hook points: the input `[.., in]`.
    pub input: Option<Tensor<'o>>,
    /// Linear hook points: the base output `[.., out]`.
    pub base_out: Option<Tensor<'o>>,
    /// Attention hook points: the attention's input hidden states.
    pub hidden: Option<Tensor<'o>>,
    /// Cross-attention hook points: the context (text embeddings).
    pub context: Option<Tensor<'o>>,
    /// Attention hook points: the attention's output (after `to_out`).
    pub out: Option<Tensor<'o>>,
    pub training: bool,
    pub step: u64,
}

fn missing(name: &str, hint: &str) -> Error {
    Error::new(ErrorKind::OP, format!("this hook point has no `{name}` ({hint})"))
}

impl<'o> Inputs<'o> {
    pub(crate) fn from_abi(ops: Ops<'o>, inputs: &ForwardInputs) -> Self {
        let wrap = |id: &ROption<TensorId>| match id {
            RSome(id) => Some(ops.tensor(*id)),
            RNone => None,
        };
        Self {
            input: wrap(&inputs.input),
            base_out: wrap(&inputs.base_out),
            hidden: wrap(&inputs.hidden),
            context: wrap(&inputs.context),
            out: wrap(&inputs.out),
            training: inputs.training,
            step: inputs.step,
        }
    }

    /// The input of a linear hook point.
    pub fn input(&self) -> Result<Tensor<'o>> {
        self.input.ok_or_else(|| missing("input", "it is an attention hook point: use hidden()"))
    }

    /// The base output of a linear hook point.
    pub fn base_out(&self) -> Result<Tensor<'o>> {
        self.base_out.ok_or_else(|| missing("base_out", "it is an attention hook point: use out()"))
    }

    /// The input hidden states of an attention hook point.
    pub fn hidden(&self) -> Result<Tensor<'o>> {
        self.hidden.ok_or_else(|| missing("hidden", "it is a linear hook point: use input()"))
    }

    /// The output of an attention hook point.
    pub fn out(&self) -> Result<Tensor<'o>> {
        self.out.ok_or_else(|| missing("out", "it is a linear hook point: use base_out()"))
    }

    /// The output being replaced: `base_out` of a linear, `out` of an attention module.
    pub fn original(&self) -> Result<Tensor<'o>> {
        self.base_out.or(self.out).ok_or_else(|| missing("base_out or out", "no output was given"))
    }
}
