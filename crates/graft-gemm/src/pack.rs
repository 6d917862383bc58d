//! Packing strided f32/bf16/f16 views into zero-padded bf16 panels.
//!
//! Two layouts, both for one K block `[k0, k0 + kc)` padded to `kcp = round_up(kc, 32)`, and one
//! panel of 16 rows (A) or 16 columns (B):
//!
//! * pair layout (`pack_pairs`), `[kcp / 2][16][2]`: for each pair of K indices, the 16 panel
//!   entries as (k, k+1) bf16 pairs. This is the AMX B-tile layout (16 rows of 16 pairs, 64 bytes,
//!   one tile per 32 K values, tiles contiguous) and also what a `vdpbf16ps` zmm operand wants, so
//!   B uses it for both kernels and A uses it (on the transposed view) for the AVX-512 kernel.
//! * AMX A layout (`pack_a_amx`), `[kcp / 32][16][32]`: one 16x32 A tile (16 rows of 32 K values)
//!   per 32 K values, tiles contiguous.
//!
//! Fast paths for the two common strides (unit stride along the panel, or along K); any other
//! stride goes through the generic element accessor.

use crate::{Element, MatRef};

#[inline(always)]
fn cvt<T: Element>(x: T) -> u16 {
    x.to_bf16().to_bits()
}

/// Two bf16 as one u32 (low half = even K index), the unit of the pair layout.
#[inline(always)]
fn pair<T: Element>(lo: T, hi: T) -> u32 {
    cvt(lo) as u32 | (cvt(hi) as u32) << 16
}

/// Pack `v[k0 .. k0+kc, n0 .. n0+16]` (rows = K) into `dst` in the pair layout: `dst[p * 16 + j]`
/// holds the bf16 pair (k0 + 2p, k0 + 2p + 1) of column n0 + j. Columns past `v.cols` and K past
/// `kc` are zero. `dst.len()` must be `8 * kcp` (u32s).
#[inline(always)]
pub(crate) fn pack_pairs<T: Element>(v: &MatRef<T>, k0: usize, kc: usize, n0: usize, dst: &mut [u32]) {
    if n0 >= v.cols {
        dst.fill(0);
        return;
    }
    let nv = (v.cols - n0).min(16);
    let (rs, cs) = (v.row_stride, v.col_stride);
    let full_pairs = kc / 2;
    // A full panel's first `full_pairs` rows of 16 are all written below; only the rest is padding.
    dst[if nv == 16 { full_pairs * 16 } else { 0 }..].fill(0);
    #[cfg(target_arch = "x86_64")]
    if rs == 1 && nv == 16 && full_pairs >= 16 && crate::avx512_available() {
        if let Some(bits) = T::as_bits16(v.data) {
            // bf16 with K contiguous (a weight used transposed): 16x16 transposes.
            // SAFETY: AVX-512F is available (checked above), and the view (checked by the caller) holds every element read: columns n0..n0+16, rows
            // k0..k0+kc.
            let tiles = unsafe { transpose_pairs_avx512(bits, cs, k0 + n0 * cs, full_pairs, dst) };
            for p in tiles * 16..full_pairs {
                for j in 0..16 {
                    let at = (n0 + j) * cs + k0 + 2 * p;
                    dst[p * 16 + j] = bits[at] as u32 | (bits[at + 1] as u32) << 16;
                }
            }
            if kc % 2 == 1 {
                for j in 0..16 {
                    dst[full_pairs * 16 + j] = bits[(n0 + j) * cs + k0 + kc - 1] as u32;
                }
            }
            return;
        }
    }
    if cs == 1 {
        // Rows (fixed k) contiguous along the panel: zip two rows into pairs (vectorizes).
        for (p, out) in dst.chunks_exact_mut(16).enumerate().take(full_pairs) {
            let k = k0 + 2 * p;
            let r0 = &v.data[k * rs + n0..][..nv];
            let r1 = &v.data[(k + 1) * rs + n0..][..nv];
            for ((o, &x0), &x1) in out.iter_mut().zip(r0).zip(r1) {
                *o = pair(x0, x1);
            }
        }
        if kc % 2 == 1 {
            let r0 = &v.data[(k0 + kc - 1) * rs + n0..][..nv];
            for (o, &x0) in dst[full_pairs * 16..][..nv].iter_mut().zip(r0) {
                *o = cvt(x0) as u32;
            }
        }
    } else if rs == 1 {
        // Columns (fixed panel index) contiguous along K: each (k, k+1) pair is adjacent.
        for j in 0..nv {
            let col = &v.data[(n0 + j) * cs + k0..][..kc];
            let mut pairs = col.chunks_exact(2);
            for (p, pr) in (&mut pairs).enumerate() {
                dst[p * 16 + j] = pair(pr[0], pr[1]);
            }
            if let [last] = pairs.remainder() {
                dst[full_pairs * 16 + j] = cvt(*last) as u32;
            }
        }
    } else {
        for p in 0..kc.div_ceil(2) {
            for j in 0..nv {
                let lo = cvt(v.at(k0 + 2 * p, n0 + j)) as u32;
                let hi = if 2 * p + 1 < kc { cvt(v.at(k0 + 2 * p + 1, n0 + j)) as u32 } else { 0 };
                dst[p * 16 + j] = lo | hi << 16;
            }
        }
    }
}

/// Pack `a[m0 .. m0+16, k0 .. k0+kc]` into the AMX A layout `[kcp/32][16][32]`, zero-padding rows
/// past `a.rows` and K past `kc`. `dst.len()` must be `16 * kcp`.
#[inline(always)]
pub(crate) fn pack_a_amx<T: Element>(a: &MatRef<T>, k0: usize, kc: usize, m0: usize, dst: &mut [u16]) {
    if m0 >= a.rows {
        dst.fill(0);
        return;
    }
    let mv = (a.rows - m0).min(16);
    let (rs, cs) = (a.row_stride, a.col_stride);
    if cs == 1 && mv == 16 && kc.is_multiple_of(32) {
        // Every element of the panel is written below: no padding to clear.
    } else {
        dst.fill(0);
    }
    #[cfg(target_arch = "x86_64")]
    if cs == 1 && crate::avx512bf16_available() {
        if let Some(f) = T::as_f32(a.data) {
            // SAFETY: AVX-512 BF16 is available (checked above); the view (checked by the
            // caller) holds rows m0..m0+mv, columns k0..k0+kc, and dst holds 16 * kcp values.
            return unsafe { rows_f32_avx512bf16(f, rs, m0, mv, k0, kc, dst) };
        }
    }
    if cs == 1 {
        // Rows contiguous along K: copy 32-value runs.
        for i in 0..mv {
            let row = &a.data[(m0 + i) * rs + k0..][..kc];
            for (t, run) in row.chunks(32).enumerate() {
                let out = &mut dst[t * 512 + i * 32..][..run.len()];
                for (o, &x) in out.iter_mut().zip(run) {
                    *o = cvt(x);
                }
            }
        }
    } else if rs == 1 {
        // Columns contiguous along M: one K index at a time, 16 rows contiguous.
        for kk in 0..kc {
            let col = &a.data[(k0 + kk) * cs + m0..][..mv];
            let base = (kk / 32) * 512 + (kk % 32);
            for (i, &x) in col.iter().enumerate() {
                dst[base + i * 32] = cvt(x);
            }
        }
    } else {
        for i in 0..mv {
            for kk in 0..kc {
                dst[(kk / 32) * 512 + i * 32 + (kk % 32)] = cvt(a.at(m0 + i, k0 + kk));
            }
        }
    }
}

/// Packs `pairs / 16 * 16` pairs of a full 16-column panel whose columns are contiguous along K
/// (`bits[base + j * cs + 2p ..]` holds the pair p of column j) into the pair layout, 16 pairs
/// at a time: 16 loads, one 16x16 transpose of u32 in registers, 16 contiguous stores. Returns
/// the number of 16-pair tiles written.
///
/// # Safety
/// AVX-512F must be available; `bits` must hold `base + 15 * cs + 2 * pairs` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pairs_avx512(bits: &[u16], cs: usize, base: usize, pairs: usize, dst: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let tiles = pairs / 16;
    assert!(base + 15 * cs + 2 * pairs <= bits.len() && dst.len() >= tiles * 256);
    // SAFETY: the assert above bounds every load (16 u32 = 32 bf16 from column j at pair 16t)
    // and store (256 u32 per tile).
    unsafe {
        for t in 0..tiles {
            let r: [__m512i; 16] = std::array::from_fn(|j| _mm512_loadu_si512(bits.as_ptr().add(base + j * cs + 32 * t) as *const _));
            // Within 128-bit lanes: interleave rows pairwise (32-bit), then 64-bit.
            let lo32 = |a, b| _mm512_unpacklo_epi32(a, b);
            let hi32 = |a, b| _mm512_unpackhi_epi32(a, b);
            let mut u = [_mm512_setzero_si512(); 16];
            for g in 0..4 {
                let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
                let (t0, t1, t2, t3) = (lo32(a, b), hi32(a, b), lo32(c, d), hi32(c, d));
                // u[4g + e]: lane L holds element 4L + e of rows 4g..4g+4.
                u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            // Across lanes: element e of lane L is output row 4L + e; gather its four row groups.
            let out = dst.as_mut_ptr().add(t * 256);
            for e in 0..4 {
                let v_even = _mm512_shuffle_i32x4::<0x88>(u[e], u[4 + e]); // lanes 0, 2 of groups 0, 1
                let v_odd = _mm512_shuffle_i32x4::<0xdd>(u[e], u[4 + e]); // lanes 1, 3
                let w_even = _mm512_shuffle_i32x4::<0x88>(u[8 + e], u[12 + e]);
                let w_odd = _mm512_shuffle_i32x4::<0xdd>(u[8 + e], u[12 + e]);
                // Rows e, 8 + e (lanes 0, 2) and 4 + e, 12 + e (lanes 1, 3).
                _mm512_storeu_si512(out.add(e * 16) as *mut _, _mm512_shuffle_i32x4::<0x88>(v_even, w_even));
                _mm512_storeu_si512(out.add((8 + e) * 16) as *mut _, _mm512_shuffle_i32x4::<0xdd>(v_even, w_even));
                _mm512_storeu_si512(out.add((4 + e) * 16) as *mut _, _mm512_shuffle_i32x4::<0x88>(v_odd, w_odd));
                _mm512_storeu_si512(out.add((12 + e) * 16) as *mut _, _mm512_shuffle_i32x4::<0xdd>(v_odd, w_odd));
            }
        }
    }
    tiles
}

/// [`pack_a_amx`] for f32 rows contiguous along K: each run of 32 values converted by one
/// `vcvtne2ps2bf16` (round to nearest even, as `cvt`; unlike `cvt` it reads subnormal inputs as
/// zero, as torch's and oneDNN's conversions do).
///
/// # Safety
/// AVX-512F and AVX-512 BF16 must be available; `f` must hold rows `m0..m0 + mv` of stride `rs`,
/// columns `k0..k0 + kc`; `dst` must hold `16 * round_up(kc, 32)` values, padding already zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_f32_avx512bf16(f: &[f32], rs: usize, m0: usize, mv: usize, k0: usize, kc: usize, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let runs = kc / 32;
    assert!(mv <= 16 && dst.len() >= kc.div_ceil(32) * 512);
    for i in 0..mv {
        let row = &f[(m0 + i) * rs + k0..][..kc];
        for t in 0..runs {
            // SAFETY: run t covers row[32t .. 32t + 32], inside `row`; its destination
            // dst[512t + 32i ..][..32] is inside dst (asserted above).
            unsafe {
                let src = row.as_ptr().add(32 * t);
                let v: __m512bh = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(src));
                _mm512_storeu_si512(dst.as_mut_ptr().add(512 * t + 32 * i) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
            }
        }
        if !kc.is_multiple_of(32) {
            for (o, &x) in dst[runs * 512 + i * 32..].iter_mut().zip(&row[runs * 32..]) {
                *o = cvt(x);
            }
        }
    }
}
