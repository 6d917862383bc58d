//! AMX-BF16 kernel, written with `asm!` because the AMX intrinsics are not stable Rust.
//!
//! Tile registers (palette 1, every tile 16 rows x 64 bytes):
//! tmm0..tmm3 = the 2x2 16x16 f32 accumulators of a 32x32 block of C,
//! tmm4, tmm5 = A tiles (16 rows x 32 bf16) for rows 0-15 and 16-31,
//! tmm6, tmm7 = B tiles (16 K pairs x 16 columns) for columns 0-15 and 16-31.
//! Each K step of 32 loads 4 tiles and runs 4 `tdpbf16ps`.
//!
//! The tile configuration is per thread, so every task runs `ldtilecfg` itself and `tilerelease`
//! when it is done. Tile state lives only inside one `block` call; the compiler never touches tile
//! registers, so it survives between the separate `asm!` statements (which are volatile and so
//! stay in program order).

use crate::Block;
use std::arch::asm;
use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};

/// cpuid/XCR0 check for AMX-TILE + AMX-BF16 with OS-enabled tile state, then the Linux permission
/// request for XTILEDATA. Called once per process (cached by the caller).
pub(crate) fn detect_and_request() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is always available on x86-64.
    let (max_leaf, osxsave, edx7) = unsafe {
        let l0 = __cpuid(0);
        let l1 = __cpuid(1);
        let edx7 = if l0.eax >= 7 { __cpuid_count(7, 0).edx } else { 0 };
        (l0.eax, l1.ecx & (1 << 27) != 0, edx7)
    };
    let amx_bf16 = edx7 & (1 << 22) != 0;
    let amx_tile = edx7 & (1 << 24) != 0;
    if max_leaf < 7 || !osxsave || !amx_bf16 || !amx_tile {
        return false;
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS manages tile state.
    // SAFETY: OSXSAVE is set, so xgetbv is available.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    request_permission()
}

#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller checked OSXSAVE, so the instruction exists and XCR0 is readable.
    unsafe { _xgetbv(0) }
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave
    // features (process-wide, so one request covers all threads, present and future).
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    // Other OSes: no known permission API here, so do not risk #NM / SIGILL.
    false
}

/// The 64-byte tile configuration: palette 1, tiles 0-7 all 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileCfg([u8; 64]);

impl TileCfg {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // colsb
            c[48 + t] = 16; // rows
        }
        TileCfg(c)
    }
}

/// Compute one task's block of C for one K block (see [`Block`]).
///
/// # Safety
/// AMX must be available and permitted (see `detect_and_request`). `ap` and `bp` must be packed
/// (pack::pack_a_amx / pack::pack_pairs) with at least `round_up(m1,32)` rows and
/// `round_up(n1,32)` columns of `16 * kcp`-element panels; `m0`, `n0` multiples of 32; `c` valid
/// for writes of `C[m0..m1, n0..n1]` with row stride `ldc`, and not written by anyone else meanwhile.
pub(crate) unsafe fn block(ap: &[u16], bp: &[u16], c: *mut f32, blk: &Block) {
    // SAFETY: the caller keeps this function's contract (its doc comment above), which
    // covers every unsafe operation of the body.
    unsafe {
        let panel = 16 * blk.kcp;
        debug_assert!(ap.len() >= blk.m1.div_ceil(32) * 2 * panel);
        debug_assert!(bp.len() >= blk.n1.div_ceil(32) * 2 * panel);
        let cfg = TileCfg::new();
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
        let mut n = blk.n0;
        while n < blk.n1 {
            let bptr = bp.as_ptr().add((n / 16) * panel);
            let cols = (blk.n1 - n).min(32);
            let mut m = blk.m0;
            while m < blk.m1 {
                let aptr = ap.as_ptr().add((m / 16) * panel);
                let rows = (blk.m1 - m).min(32);
                micro(aptr, bptr, blk.kcp, c.add(m * blk.ldc + n), blk.ldc, rows, cols, blk.load_c);
                m += 32;
            }
            n += 32;
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// 32x32 micro-kernel: C[0..rows, 0..cols] (+)= A(32 x kcp) · B(kcp x 32).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(a: *const u16, b: *const u16, kcp: usize, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool) {
    // SAFETY: called only by `block`, with pointers into the panels and C that its contract
    // (the doc comment of `block`) makes valid for every access below.
    unsafe {
        // Edge blocks go through a zero-filled 32x32 scratch so tiles never touch memory outside C.
        #[repr(C, align(64))]
        struct Scratch([f32; 1024]);
        // Only edge blocks pay for zeroing it.
        let mut scratch = std::mem::MaybeUninit::<Scratch>::uninit();
        let full = rows == 32 && cols == 32;
        let (cp, cstride) = if full {
            (c, ldc * 4)
        } else {
            let scratch = scratch.write(Scratch([0.0; 1024]));
            if load_c {
                for i in 0..rows {
                    std::ptr::copy_nonoverlapping(c.add(i * ldc), scratch.0.as_mut_ptr().add(i * 32), cols);
                }
            }
            (scratch.0.as_mut_ptr(), 128)
        };
        let row16 = 16 * cstride; // bytes to C row 16
        if load_c {
            asm!(
                "tileloadd tmm0, [{c} + {s}*1]",
                "tileloadd tmm1, [{c} + {s}*1 + 64]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c2} + {s}*1 + 64]",
                c = in(reg) cp,
                c2 = in(reg) (cp as *mut u8).add(row16),
                s = in(reg) cstride,
                options(nostack, readonly, preserves_flags)
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
        }
        let pstride = 16 * kcp; // elements between the two 16-wide panels
        let mut ks = 0;
        while ks < kcp {
            let a0 = a.add(ks * 16);
            let b0 = b.add(ks * 16);
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(pstride),
                b0 = in(reg) b0,
                b1 = in(reg) b0.add(pstride),
                s = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
            ks += 32;
        }
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c} + {s}*1 + 64], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c2} + {s}*1 + 64], tmm3",
            c = in(reg) cp,
            c2 = in(reg) (cp as *mut u8).add(row16),
            s = in(reg) cstride,
            options(nostack, preserves_flags)
        );
        if !full {
            let scratch = scratch.assume_init_ref();
            for i in 0..rows {
                std::ptr::copy_nonoverlapping(scratch.0.as_ptr().add(i * 32), c.add(i * ldc), cols);
            }
        }
    }
}
