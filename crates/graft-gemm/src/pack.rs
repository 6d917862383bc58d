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
pub(crate) fn pack_pairs<T: Element>(v: &MatRef<T>, k0: usize, kc: usize, n0: usize, dst: &mut [u32]) {
    dst.fill(0);
    if n0 >= v.cols {
        return;
    }
    let nv = (v.cols - n0).min(16);
    let (rs, cs) = (v.row_stride, v.col_stride);
    let full_pairs = kc / 2;
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
pub(crate) fn pack_a_amx<T: Element>(a: &MatRef<T>, k0: usize, kc: usize, m0: usize, dst: &mut [u16]) {
    dst.fill(0);
    if m0 >= a.rows {
        return;
    }
    let mv = (a.rows - m0).min(16);
    let (rs, cs) = (a.row_stride, a.col_stride);
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
