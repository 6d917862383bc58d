//! Element-wise CPU kernels written so that the compiler vectorizes them: branch-free `exp` and
//! `erf`, and the row loops of softmax, GEGLU, LayerNorm and GroupNorm (+ SiLU). Each kernel is
//! compiled three times, for the baseline x86-64, for AVX2 + FMA and for AVX-512, and picks the
//! widest the CPU has at run time (candle's own element-wise ops call libm's scalar `expf` /
//! `erff` one element at a time).

/// Defines `fn $name(args)` that runs its body compiled for AVX-512 or AVX2 + FMA when the CPU
/// has them.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if crate::simd::avx512() {
                    // SAFETY: this CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: this CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Whether the CPU has the AVX-512 subsets the `avx512` versions are compiled for (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *A.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    })
}

/// e^x within 2 ulp (Cephes' expf: 2^n times a degree-7 polynomial on [-ln2/2, ln2/2]); 0 below
/// -87.3, NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let c = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5 * 2^23 trick: t's low mantissa bits then hold n as an integer
    // (no float -> int conversion, which does not vectorize).
    let t = c * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = c - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// erf(x) within 4e-7: an odd rational function on [-4, 4] (Eigen's float erf), ±1 outside.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let c = x.clamp(-4.0, 4.0);
    let x2 = c * c;
    let p = (((((-2.726_142_3e-10 * x2 + 2.770_681_4e-8) * x2 - 2.101_024e-6) * x2 - 5.692_506_4e-5) * x2 - 7.349_906_3e-4) * x2 - 2.954_6e-3)
        * x2
        - 1.609_603_3e-2;
    let q = (((-1.456_607_2e-5 * x2 - 2.133_740_6e-4) * x2 - 1.682_827e-3) * x2 - 7.373_329_3e-3) * x2 - 1.426_474e-2;
    c * p / q
}

/// Φ(x), the standard normal cdf.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The largest element (NaN elements are passed over; they reach the result through `exp`).
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    lanes.into_iter().chain(tail.iter().copied()).fold(f32::NEG_INFINITY, |a, v| if v > a { v } else { a })
}

/// The sum, in 8 lanes (a vector's worth).
#[inline(always)]
fn sum_of(row: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

multiversion! {
    /// Softmax of each `m`-long row of `data`, in place. With `causal = Some(first)`, row `r` is
    /// query `first + r` and its keys after the query get probability 0.
    pub fn softmax_rows(data: &mut [f32], m: usize, causal: Option<usize>) {
        for (r, row) in data.chunks_exact_mut(m).enumerate() {
            let len = causal.map_or(m, |first| (first + r + 1).min(m));
            let (row, masked) = row.split_at_mut(len);
            masked.fill(0.0);
            let max = max_of(row);
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let inv = 1.0 / sum_of(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Softmax's backward for rows of probabilities `p`: `ds = p * (ds - row_dot)` in place, where
    /// `ds` holds the probabilities' gradient and `row_dot[r]` = Σ_j p[r][j] * ds[r][j].
    pub fn softmax_grad_rows(p: &[f32], ds: &mut [f32], row_dot: &[f32]) {
        let m = p.len() / row_dot.len().max(1);
        for ((p, ds), &dot) in p.chunks_exact(m).zip(ds.chunks_exact_mut(m)).zip(row_dot) {
            for (d, &p) in ds.iter_mut().zip(p) {
                *d = p * (*d - dot);
            }
        }
    }
}

multiversion! {
    /// GEGLU of rows `[value | gate]` (each `inner` long): `out = value * gelu(gate)`.
    pub fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) {
        for (row, o) in h.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
            let (value, gate) = row.split_at(inner);
            for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                *o = v * g * normal_cdf(g);
            }
        }
    }
}

multiversion! {
    /// GEGLU's gradient: for each row, `[grad * gelu(gate) | grad * value * gelu'(gate)]`, with
    /// gelu'(x) = Φ(x) + x φ(x).
    pub fn geglu_grad_rows(h: &[f32], grad: &[f32], dh: &mut [f32], inner: usize) {
        for ((row, gr), d) in h.chunks_exact(2 * inner).zip(grad.chunks_exact(inner)).zip(dh.chunks_exact_mut(2 * inner)) {
            let (value, gate) = row.split_at(inner);
            let (dv, dg) = d.split_at_mut(inner);
            for j in 0..inner {
                let (v, g, gr) = (value[j], gate[j], gr[j]);
                let cdf = normal_cdf(g);
                let pdf = exp(-0.5 * g * g) * 0.398_942_3;
                dv[j] = gr * g * cdf;
                dg[j] = gr * v * (cdf + g * pdf);
            }
        }
    }
}

/// Σx and Σ(x - mean)² of a slice, accumulated in f64 per 8-lane f32 chunk run.
#[inline(always)]
fn moments(x: &[f32]) -> (f64, f64) {
    let mean = x.chunks(4096).map(|c| sum_of(c) as f64).sum::<f64>() / x.len().max(1) as f64;
    let m = mean as f32;
    let sq = x
        .chunks(4096)
        .map(|c| {
            let mut lanes = [0f32; 8];
            let chunks = c.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
            for c in chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l += (v - m) * (v - m);
                }
            }
            (lanes.iter().sum::<f32>() + tail) as f64
        })
        .sum::<f64>();
    (mean, sq)
}

/// x σ(x) (SiLU) and its derivative σ(x) (1 + x (1 - σ(x))).
#[inline(always)]
fn silu_and_grad(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-x));
    (x * s, s * (1.0 + x * (1.0 - s)))
}

multiversion! {
    /// LayerNorm of one row: `(x - mean) / sqrt(var + eps) * w + b`.
    pub fn layer_norm_row(x: &[f32], out: &mut [f32], w: &[f32], b: &[f32], eps: f64) {
        let (mean, sq) = moments(x);
        let rstd = (1.0 / (sq / x.len().max(1) as f64 + eps).sqrt()) as f32;
        let mean = mean as f32;
        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) * rstd * w + b;
        }
    }
}

multiversion! {
    /// The input's gradient of [`layer_norm_row`]: with xhat the normalized row and g = grad * w,
    /// dx = rstd (g - mean(g) - xhat mean(g xhat)).
    pub fn layer_norm_row_grad(x: &[f32], grad: &[f32], dx: &mut [f32], w: &[f32], eps: f64) {
        let (mean, sq) = moments(x);
        let n = x.len().max(1) as f64;
        let rstd = (1.0 / (sq / n + eps).sqrt()) as f32;
        let mean = mean as f32;
        let (mut lg, mut lgx) = ([0f32; 8], [0f32; 8]);
        for (k, ((&v, &g), &w)) in x.iter().zip(grad).zip(w).enumerate() {
            let g = g * w;
            lg[k % 8] += g;
            lgx[k % 8] += g * (v - mean) * rstd;
        }
        let mean_g = (lg.iter().map(|&v| v as f64).sum::<f64>() / n) as f32;
        let mean_gx = (lgx.iter().map(|&v| v as f64).sum::<f64>() / n) as f32;
        for (((d, &v), &g), &w) in dx.iter_mut().zip(x).zip(grad).zip(w) {
            *d = rstd * (g * w - mean_g - (v - mean) * rstd * mean_gx);
        }
    }
}

multiversion! {
    /// GroupNorm of one (sample, group) `x` of `w.len()` channels, `spatial` elements each:
    /// `(x - mean) / sqrt(var + eps) * w[c] + b[c]`, then SiLU when `silu`.
    pub fn group_norm_group(x: &[f32], out: &mut [f32], w: &[f32], b: &[f32], eps: f64, silu: bool) {
        let (mean, sq) = moments(x);
        let rstd = (1.0 / (sq / x.len().max(1) as f64 + eps).sqrt()) as f32;
        let (mean, spatial) = (mean as f32, x.len() / w.len().max(1));
        for (c, (xs, os)) in x.chunks_exact(spatial).zip(out.chunks_exact_mut(spatial)).enumerate() {
            let (scale, shift) = (rstd * w[c], b[c] - mean * rstd * w[c]);
            for (o, &v) in os.iter_mut().zip(xs) {
                let y = v * scale + shift;
                *o = if silu { silu_and_grad(y).0 } else { y };
            }
        }
    }
}

multiversion! {
    /// The input's gradient of [`group_norm_group`]: with xhat the normalized input and
    /// g = (grad, through SiLU when `silu`) * w, dx = rstd (g - mean(g) - xhat mean(g xhat)).
    pub fn group_norm_group_grad(x: &[f32], grad: &[f32], dx: &mut [f32], w: &[f32], b: &[f32], eps: f64, silu: bool) {
        let (mean, sq) = moments(x);
        let n = x.len().max(1) as f64;
        let rstd = (1.0 / (sq / n + eps).sqrt()) as f32;
        let (mean, spatial) = (mean as f32, x.len() / w.len().max(1));
        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
        for (c, ((xs, gs), ds)) in x.chunks_exact(spatial).zip(grad.chunks_exact(spatial)).zip(dx.chunks_exact_mut(spatial)).enumerate() {
            let (wc, bc) = (w[c], b[c]);
            let (mut lg, mut lgx) = ([0f32; 8], [0f32; 8]);
            for (k, ((&v, &g), d)) in xs.iter().zip(gs).zip(ds.iter_mut()).enumerate() {
                let xhat = (v - mean) * rstd;
                let g = if silu { g * silu_and_grad(xhat * wc + bc).1 } else { g } * wc;
                *d = g;
                lg[k % 8] += g;
                lgx[k % 8] += g * xhat;
            }
            sum_g += lg.iter().sum::<f32>() as f64;
            sum_gx += lgx.iter().sum::<f32>() as f64;
        }
        let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
        for (&v, d) in x.iter().zip(dx.iter_mut()) {
            let xhat = (v - mean) * rstd;
            *d = rstd * (*d - mean_g - xhat * mean_gx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        let mut worst = (0f32, 0f32);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.5e-4;
            if (-87.0..88.0).contains(&x) {
                let e = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs() as f32;
                worst.0 = worst.0.max(e);
            }
            worst.1 = worst.1.max((erf(x) as f64 - libm_erf(x as f64)).abs() as f32);
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 5e-7, "erf error {}", worst.1);
        assert_eq!(exp(-1e4), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan() && erf(f32::NAN).is_nan());
        assert!((erf(-10.0) + 1.0).abs() < 5e-7);
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn softmax_rows_sum_to_one_and_mask() {
        let scores: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let mut out = scores.clone();
        softmax_rows(&mut out, 6, None);
        for (row, o) in scores.chunks(6).zip(out.chunks(6)) {
            let max = row.iter().cloned().fold(f32::MIN, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            for (&v, &p) in row.iter().zip(o) {
                assert!((p as f64 - ((v - max) as f64).exp() / sum).abs() < 1e-7);
            }
        }
        // Causal: 4 query rows starting at query 1 over 6 keys.
        let mut out = scores.clone();
        softmax_rows(&mut out, 6, Some(1));
        for (r, o) in out.chunks(6).enumerate() {
            assert!(o[r + 2..].iter().all(|&p| p == 0.0), "row {r}: {o:?}");
            assert!((o.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
