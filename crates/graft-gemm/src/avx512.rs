//! AVX-512 BF16 kernel: `vdpbf16ps` (via the stable `_mm512_dpbf16_ps` intrinsic).
//!
//! Micro-kernel: 8 rows x 32 columns of C in 16 zmm accumulators. Per K pair it loads the two
//! B vectors (16 columns x (k, k+1) pairs each, straight from the pair-layout panel) and, for each
//! of the 8 rows, broadcasts that row's (k, k+1) pair (one u32 of the pair-layout A panel) and
//! runs two `vdpbf16ps`. A panels are 16 rows, so each is used as two 8-row halves.

use crate::Block;
use std::arch::x86_64::*;

/// Compute one task's block of C for one K block (see [`Block`]).
///
/// # Safety
/// AVX-512F/BW/VL + BF16 must be available. `ap` and `bp` must be packed with pack::pack_pairs
/// (A through its transposed view) covering `round_up(m1,32)` rows and `round_up(n1,32)` columns
/// in `16 * kcp`-element panels; `m0`, `n0` multiples of 32; `c` valid for writes of
/// `C[m0..m1, n0..n1]` with row stride `ldc`, and not written by anyone else meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn block(ap: &[u16], bp: &[u16], c: *mut f32, blk: &Block) {
    // SAFETY: the caller keeps this function's contract (its doc comment above), which
    // covers every unsafe operation of the body.
    unsafe {
        let panel = 16 * blk.kcp;
        debug_assert!(ap.len() >= blk.m1.div_ceil(32) * 2 * panel);
        debug_assert!(bp.len() >= blk.n1.div_ceil(32) * 2 * panel);
        let mut n = blk.n0;
        while n < blk.n1 {
            let bptr = bp.as_ptr().add((n / 16) * panel) as *const u32;
            let cols = (blk.n1 - n).min(32);
            let mut m = blk.m0;
            while m < blk.m1 {
                let aptr = ap.as_ptr().add((m / 16) * panel) as *const u32;
                let rows = (blk.m1 - m).min(8);
                // Row m lies in panel m/16 at offset m%16 (0 or 8).
                micro(aptr.add(m % 16), bptr, blk.kcp, c.add(m * blk.ldc + n), blk.ldc, rows, cols, blk.load_c);
                m += 8;
            }
            n += 32;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(a: *const u32, b: *const u32, kcp: usize, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool) {
    // SAFETY: called only by `block`, with pointers into the panels and C that its contract
    // (the doc comment of `block`) makes valid for every access below.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        let b1 = b.add(8 * kcp); // second 16-column panel: (kcp/2) pairs x 16 u32 further on
        for p in 0..kcp / 2 {
            let bv0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 16) as *const _));
            let bv1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 16) as *const _));
            let ar = a.add(p * 16);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(ar.add(r).read() as i32));
                accr[0] = _mm512_dpbf16_ps(accr[0], av, bv0);
                accr[1] = _mm512_dpbf16_ps(accr[1], av, bv1);
            }
        }
        let mask = |w: usize| -> __mmask16 {
            if w >= 16 {
                0xffff
            } else {
                ((1u32 << w) - 1) as u16
            }
        };
        let m0 = mask(cols);
        let m1 = mask(cols.saturating_sub(16));
        for (r, accr) in acc.iter().enumerate().take(rows) {
            let cr = c.add(r * ldc);
            let mut v0 = accr[0];
            let mut v1 = accr[1];
            if load_c {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr.add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, v0);
            _mm512_mask_storeu_ps(cr.add(16), m1, v1);
        }
    }
}
