//! Multi-head attention on any device (the GPU's, and the CPU's for half-precision activations)
//! that never keeps a [heads, n, m] score matrix: the forward runs over chunks of query rows,
//! and the backward recomputes each chunk's probabilities from q and k, as flash attention does.
//! The composed form keeps scores and probabilities for the backward: at 1024 px SDXL's
//! 4096-token self-attentions would keep about 1 GB each in bf16.
//!
//! Products run in the inputs' dtype (bf16 on the tensor cores); softmax and its gradient in
//! f32. Exact reformulation of the composed form: the tests compare value and gradients.

use candle_core::{DType, Result, Tensor, D};

/// Score elements per chunk: 64 M (256 MB in f32).
const CHUNK_SCORES: usize = 1 << 26;

/// q [b, n, h*d], k and v [b, m, h*d] -> [b, n, h*d], scale 1/sqrt(d); `causal` masks key
/// positions after the query's.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, _, _) = q.dims3()?;
    let m = k.dim(1)?;
    let rows = (CHUNK_SCORES / (b * heads * m).max(1)).max(1);
    attention_in_chunks(q, k, v, heads, causal, rows)
}

/// [`attention`] with `rows` query rows a chunk.
pub fn attention_in_chunks(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, rows: usize) -> Result<Tensor> {
    let (b, _, inner) = q.dims3()?;
    let (kb, _, kw) = k.dims3()?;
    if kb != b || kw != inner || v.dims() != k.dims() || heads == 0 || inner % heads != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads", q.dims(), k.dims(), v.dims())
    }
    let op = ChunkedAttention { heads, scale: 1.0 / ((inner / heads) as f64).sqrt(), causal, rows: rows.max(1) };
    let out = op.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let backward = Box::new(move |q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, g: &Tensor| op.backward(q, k, v, out, g));
    crate::precomputed::with_backward3("graft-chunked-attention", q, k, v, out, backward)
}

/// The dtype of softmax and its gradient: f32, or f64 for f64 inputs.
fn stats(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The attention's settings, and its forward and backward in chunks.
#[derive(Debug, Clone, Copy)]
struct ChunkedAttention {
    heads: usize,
    scale: f64,
    causal: bool,
    rows: usize,
}

impl ChunkedAttention {
    /// [b, len, h*d] -> [b, h, len, d]
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let (b, len, inner) = t.dims3()?;
        t.reshape((b, len, self.heads, inner / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// [b, h, len, d] -> [b, len, h*d]
    fn merge(t: &Tensor) -> Result<Tensor> {
        let (b, h, len, d) = t.dims4()?;
        t.transpose(1, 2)?.reshape((b, len, h * d))
    }

    /// The query-row chunks: (start, len).
    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..n).step_by(self.rows).map(move |s| (s, self.rows.min(n - s)))
    }

    /// Softmax probabilities of the chunk of queries `qc` [b, h, len, d] starting at row `start`,
    /// against `k` [b, h, m, d]: [b, h, len, m]. In f32 (f64 for f64 inputs), except half scores
    /// on a GPU, whose softmax kernel accumulates in f32 already: two passes over the scores saved.
    fn probs(&self, qc: &Tensor, k: &Tensor, start: usize) -> Result<Tensor> {
        let dt = qc.dtype();
        let softmax_dtype = if qc.device().is_cuda() && matches!(dt, DType::BF16 | DType::F16) { dt } else { stats(dt) };
        let scores = (qc * self.scale)?.matmul(&k.t()?)?.to_dtype(softmax_dtype)?;
        let scores = if self.causal {
            let (len, m) = (qc.dim(2)?, k.dim(2)?);
            let mask: Vec<f32> = (0..len).flat_map(|i| (0..m).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            scores.broadcast_add(&Tensor::from_vec(mask, (len, m), qc.device())?.to_dtype(scores.dtype())?)?
        } else {
            scores
        };
        candle_nn::ops::softmax_last_dim(&scores)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (self.split(q)?, self.split(k)?, self.split(v)?);
        let n = q.dim(2)?;
        let outs = self
            .chunks(n)
            .map(|(start, len)| self.probs(&q.narrow(2, start, len)?, &k, start)?.to_dtype(v.dtype())?.matmul(&v))
            .collect::<Result<Vec<_>>>()?;
        Self::merge(&Tensor::cat(&outs, 2)?)
    }

    /// With p = softmax(s), o = p v: dv = p^T g, dp = g v^T, ds = p (dp - rowsum(g o)),
    /// dq = ds k scale, dk = ds^T q scale; p recomputed chunk by chunk.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dt = q.dtype();
        let (qs, ks, vs) = (self.split(q)?, self.split(k)?, self.split(v)?);
        let (g, o) = (self.split(&grad.to_dtype(dt)?)?, self.split(out)?);
        let row_dot = (g.to_dtype(stats(dt))? * o.to_dtype(stats(dt))?)?.sum_keepdim(D::Minus1)?;
        let n = qs.dim(2)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        };
        for (start, len) in self.chunks(n) {
            let (qc, gc) = (qs.narrow(2, start, len)?, g.narrow(2, start, len)?);
            let p = self.probs(&qc, &ks, start)?;
            let dp = gc.matmul(&vs.t()?)?.to_dtype(stats(dt))?;
            let ds = (p.to_dtype(stats(dt))? * dp.broadcast_sub(&row_dot.narrow(2, start, len)?)?)?.to_dtype(dt)?;
            if v.track_op() {
                dv = add(dv, p.to_dtype(dt)?.t()?.matmul(&gc)?)?;
            }
            if k.track_op() {
                dk = add(dk, (ds.t()?.matmul(&qc)? * self.scale)?)?;
            }
            if q.track_op() {
                dq.push((ds.matmul(&ks)? * self.scale)?);
            }
        }
        let dq = if dq.is_empty() { None } else { Some(Self::merge(&Tensor::cat(&dq, 2)?)?) };
        Ok((dq, dk.map(|t| Self::merge(&t)).transpose()?, dv.map(|t| Self::merge(&t)).transpose()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn chunks_give_the_composed_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::GraftRng::new(9);
        for (causal, n, m, rows) in [(false, 7, 5, 3), (true, 6, 6, 4), (false, 5, 9, 64)] {
            let q = Var::from_tensor(&rng.randn((2, n, 12), &dev)?)?;
            let k = Var::from_tensor(&rng.randn((2, m, 12), &dev)?)?;
            let v = Var::from_tensor(&rng.randn((2, m, 12), &dev)?)?;
            let w = rng.randn((2, n, 12), &dev)?;
            let ours = attention_in_chunks(&q, &k, &v, 3, causal, rows)?;
            let theirs = crate::nn::composed_attention(&q, &k, &v, 3, causal)?;
            assert!(max_diff(&ours, &theirs) < 1e-5, "value, causal {causal}");
            let g1 = (ours * &w)?.sum_all()?.backward()?;
            let g2 = (theirs * &w)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (g1.get(x).expect("gradient"), g2.get(x).expect("gradient"));
                assert!(max_diff(a, b) < 1e-5, "{name} gradient, causal {causal}, rows {rows}: {}", max_diff(a, b));
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_inputs_get_no_op() -> Result<()> {
        let q = Tensor::ones((1, 4, 8), DType::F32, &Device::Cpu)?;
        let out = attention(&q, &q, &q, 2, false)?;
        assert!(!out.track_op());
        assert!(max_diff(&out, &q) < 1e-6);
        Ok(())
    }
}
