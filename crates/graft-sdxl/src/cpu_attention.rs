//! Multi-head softmax attention on f32 slices, forward and backward, for
//! [`crate::fused::attention`].
//!
//! One task per (batch entry, head), run in parallel; inside a task everything is sequential:
//! the matmuls call gemm single-threaded on strided views of the [b, n, heads * d] inputs (no
//! head split copies), and one head's block of scores stays in the cache between the matmuls
//! and the softmax. Query rows go in chunks so a task never holds more than `BLOCK` scores;
//! the backward recomputes the probabilities instead of keeping them (as flash attention does).
//!
//! With [`Dims::bf16`] set (a model whose weights compute in bf16), the products run on the
//! CPU's bf16 unit with f32 accumulation, as torch's bf16 autocast runs attention; each head's
//! keys and values are packed once for all its chunks, and softmax and its gradient stay f32.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::matmul::{matmul, View};

/// Score elements per task and chunk of query rows (4 MB of f32).
const BLOCK: usize = 1 << 20;

/// The shape of one attention call: q [b, n, heads * d], k and v [b, m, heads * d].
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
    /// Run the products on this bf16 kernel instead of in f32.
    pub bf16: Option<graft_gemm::Kernel>,
}

impl Dims {
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Query rows per chunk.
    fn rows(&self) -> usize {
        (BLOCK / self.m.max(1)).clamp(1, self.n.max(1))
    }

    /// Single-threaded gemm when the tasks alone keep every thread busy.
    fn parallelism(&self) -> Parallelism {
        let threads = rayon::current_num_threads();
        if self.b * self.heads >= threads {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        }
    }
}

/// Head `h` of batch entry `i` of a [b, len, heads * d] tensor: [len, d].
fn head<'a>(data: &'a [f32], dims: &Dims, len: usize, i: usize, h: usize) -> View<'a> {
    let start = i * len * dims.width() + h * dims.d;
    View { data: &data[start..], rows: len, cols: dims.d, rs: dims.width(), cs: 1 }
}

/// Scores of one head's query rows `start..start + len`, turned into probabilities in place.
fn probs(p: &mut [f32], q: View, k: View, start: usize, scale: f32, causal: bool, par: Parallelism) {
    let len = q.rows;
    matmul(p, k.rows, q, k.t(), scale, false, par);
    crate::simd::softmax_rows(&mut p[..len * k.rows], k.rows, causal.then_some(start));
}

/// Copies per-task [len, d] blocks into a [b, len, heads * d] tensor.
fn scatter(blocks: Vec<Vec<f32>>, dims: &Dims, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; dims.b * len * dims.width()];
    for (task, block) in blocks.iter().enumerate() {
        let (i, h) = (task / dims.heads, task % dims.heads);
        for (r, row) in block.chunks_exact(dims.d).enumerate() {
            let at = (i * len + r) * dims.width() + h * dims.d;
            out[at..at + dims.d].copy_from_slice(row);
        }
    }
    out
}

/// softmax(scale q kᵀ (+ causal mask)) v.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, causal: bool) -> Vec<f32> {
    let (rows, par) = (dims.rows(), dims.parallelism());
    let blocks: Vec<Vec<f32>> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|task| {
            let (i, h) = (task / dims.heads, task % dims.heads);
            let (q, k, v) = (head(q, &dims, dims.n, i, h), head(k, &dims, dims.m, i, h), head(v, &dims, dims.m, i, h));
            if let Some(kernel) = dims.bf16 {
                return bf16::forward_head(kernel, q, k, v, &dims, scale, causal);
            }
            let mut out = vec![0f32; dims.n * dims.d];
            let mut p = vec![0f32; rows * dims.m];
            for start in (0..dims.n).step_by(rows) {
                let len = rows.min(dims.n - start);
                probs(&mut p, q.rows(start, len), k, start, scale, causal, par);
                matmul(&mut out[start * dims.d..], dims.d, View::dense(&p, len, dims.m), v, 1.0, false, par);
            }
            out
        })
        .collect();
    scatter(blocks, &dims, dims.n)
}

/// Which input gradients to compute.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub q: bool,
    pub k: bool,
    pub v: bool,
}

/// dQ, dK, dV: those that [`Needs`] asked for.
pub type InputGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// The gradients of q, k, v given the output `out` and its gradient `grad`. With p the
/// probabilities and D = rowsum(grad * out): dV = pᵀ dO, dS = p * (dO Vᵀ - D), dQ = scale dS K,
/// dK = scale dSᵀ Q.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], grad: &[f32], dims: Dims, scale: f32, causal: bool, needs: Needs) -> InputGrads {
    let (rows, par, d, m) = (dims.rows(), dims.parallelism(), dims.d, dims.m);
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let blocks: Vec<Grads> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|task| {
            let (i, h) = (task / dims.heads, task % dims.heads);
            let (q, k, v) = (head(q, &dims, dims.n, i, h), head(k, &dims, m, i, h), head(v, &dims, m, i, h));
            let (o, g) = (head(out, &dims, dims.n, i, h), head(grad, &dims, dims.n, i, h));
            if let Some(kernel) = dims.bf16 {
                return bf16::backward_head(kernel, [q, k, v, o, g], &dims, scale, causal, needs);
            }
            let zeros = |need: bool, len: usize| vec![0f32; if need { len * d } else { 0 }];
            let (mut dq, mut dk, mut dv) = (zeros(needs.q, dims.n), zeros(needs.k, m), zeros(needs.v, m));
            let (mut p, mut ds) = (vec![0f32; rows * m], vec![0f32; rows * m]);
            let mut row_dot = vec![0f32; rows];
            for start in (0..dims.n).step_by(rows) {
                let len = rows.min(dims.n - start);
                let (q_c, g_c) = (q.rows(start, len), g.rows(start, len));
                probs(&mut p, q_c, k, start, scale, causal, par);
                let p_c = View::dense(&p, len, m);
                if needs.v {
                    matmul(&mut dv, d, p_c.t(), g_c, 1.0, start > 0, par);
                }
                if !(needs.q || needs.k) {
                    continue;
                }
                for (r, rd) in row_dot[..len].iter_mut().enumerate() {
                    let (gr, or) = (&g_c.data[r * g_c.rs..][..d], &o.data[(start + r) * o.rs..][..d]);
                    *rd = gr.iter().zip(or).map(|(a, b)| a * b).sum();
                }
                matmul(&mut ds, m, g_c, v.t(), 1.0, false, par);
                crate::simd::softmax_grad_rows(&p[..len * m], &mut ds[..len * m], &row_dot[..len]);
                let ds_c = View::dense(&ds, len, m);
                if needs.q {
                    matmul(&mut dq[start * d..], d, ds_c, k, scale, false, par);
                }
                if needs.k {
                    matmul(&mut dk, d, ds_c.t(), q_c, scale, start > 0, par);
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut parts: (Vec<_>, Vec<_>, Vec<_>) = (Vec::new(), Vec::new(), Vec::new());
    for (dq, dk, dv) in blocks {
        parts.0.push(dq);
        parts.1.push(dk);
        parts.2.push(dv);
    }
    (needs.q.then(|| scatter(parts.0, &dims, dims.n)), needs.k.then(|| scatter(parts.1, &dims, m)), needs.v.then(|| scatter(parts.2, &dims, m)))
}

/// The per-head work on the bf16 kernel ([`Dims::bf16`]).
mod bf16 {
    use graft_gemm::{gemm_packed, Kernel, MatRef, PackedB};

    use super::{Dims, Needs};
    use crate::matmul::View;

    fn mat(v: View) -> MatRef<f32> {
        MatRef { data: v.data, rows: v.rows, cols: v.cols, row_stride: v.rs, col_stride: v.cs }
    }

    fn packed(kernel: Kernel, v: View) -> PackedB {
        PackedB::new(kernel, mat(v))
    }

    /// `scale * v` as a contiguous [rows, cols] matrix.
    fn scaled(v: View, scale: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(v.rows * v.cols);
        for i in 0..v.rows {
            out.extend((0..v.cols).map(|j| scale * v.data[i * v.rs + j * v.cs]));
        }
        out
    }

    /// A contiguous [rows, cols] matrix transposed, times `scale`.
    fn transposed(data: &[f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        scaled(View { data, rows: cols, cols: rows, rs: 1, cs: cols }, scale)
    }

    /// Probabilities of query rows `start..start + len` into `p` [len, m].
    fn probs(p: &mut [f32], q: View, kt: &PackedB, m: usize, start: usize, scale: f32, causal: bool) {
        let qs = scaled(q, scale);
        gemm_packed(MatRef::row_major(&qs, q.rows, q.cols), kt, p, m, 0.0);
        crate::simd::softmax_rows(&mut p[..q.rows * m], m, causal.then_some(start));
    }

    pub(super) fn forward_head(kernel: Kernel, q: View, k: View, v: View, dims: &Dims, scale: f32, causal: bool) -> Vec<f32> {
        let (rows, d, m) = (dims.rows(), dims.d, dims.m);
        let (kt, vp) = (packed(kernel, k.t()), packed(kernel, v));
        let mut out = vec![0f32; dims.n * d];
        let mut p = vec![0f32; rows * m];
        for start in (0..dims.n).step_by(rows) {
            let len = rows.min(dims.n - start);
            probs(&mut p, q.rows(start, len), &kt, m, start, scale, causal);
            gemm_packed(MatRef::row_major(&p[..len * m], len, m), &vp, &mut out[start * d..], d, 0.0);
        }
        out
    }

    /// dQ, dK, dV of one head as [n, d], [m, d], [m, d] (empty where not needed). dV and dK are
    /// summed over the chunks transposed ([d, m]: the chunk's rows are then the product's K).
    pub(super) fn backward_head(
        kernel: Kernel,
        [q, k, v, o, g]: [View; 5],
        dims: &Dims,
        scale: f32,
        causal: bool,
        needs: Needs,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (rows, d, m) = (dims.rows(), dims.d, dims.m);
        let kt = packed(kernel, k.t());
        let (vt, kp) = (packed(kernel, v.t()), packed(kernel, k));
        let mut dq = vec![0f32; if needs.q { dims.n * d } else { 0 }];
        let (mut dkt, mut dvt) = (vec![0f32; if needs.k { d * m } else { 0 }], vec![0f32; if needs.v { d * m } else { 0 }]);
        let (mut p, mut ds) = (vec![0f32; rows * m], vec![0f32; rows * m]);
        let mut row_dot = vec![0f32; rows];
        for start in (0..dims.n).step_by(rows) {
            let len = rows.min(dims.n - start);
            let (q_c, g_c) = (q.rows(start, len), g.rows(start, len));
            probs(&mut p, q_c, &kt, m, start, scale, causal);
            let beta = if start > 0 { 1.0 } else { 0.0 };
            if needs.v {
                // dVᵀ += dOᵀ p
                let pp = packed(kernel, View::dense(&p[..len * m], len, m));
                gemm_packed(mat(g_c.t()), &pp, &mut dvt, m, beta);
            }
            if !(needs.q || needs.k) {
                continue;
            }
            for (r, rd) in row_dot[..len].iter_mut().enumerate() {
                let (gr, or) = (&g_c.data[r * g_c.rs..][..d], &o.data[(start + r) * o.rs..][..d]);
                *rd = gr.iter().zip(or).map(|(a, b)| a * b).sum();
            }
            gemm_packed(mat(g_c), &vt, &mut ds, m, 0.0);
            crate::simd::softmax_grad_rows(&p[..len * m], &mut ds[..len * m], &row_dot[..len]);
            if needs.q {
                let dq_c = &mut dq[start * d..(start + len) * d];
                gemm_packed(MatRef::row_major(&ds[..len * m], len, m), &kp, dq_c, d, 0.0);
                dq_c.iter_mut().for_each(|x| *x *= scale);
            }
            if needs.k {
                // dKᵀ += Qᵀ dS
                let dsp = packed(kernel, View::dense(&ds[..len * m], len, m));
                gemm_packed(mat(q_c.t()), &dsp, &mut dkt, m, beta);
            }
        }
        let dk = if needs.k { transposed(&dkt, d, m, scale) } else { Vec::new() };
        let dv = if needs.v { transposed(&dvt, d, m, 1.0) } else { Vec::new() };
        (dq, dk, dv)
    }
}
