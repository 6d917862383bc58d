//! bf16 matrix multiply with f32 accumulation for x86-64, kernel chosen at run time.
//!
//! `C = beta * C + A · B` where A and B are read through strided views of `f32`, `bf16` or `f16`,
//! converted to bf16 (round-to-nearest-even) while they are packed, and multiplied with
//!
//! * [`Kernel::Amx`]: AMX-BF16 tiles (`tdpbf16ps`, a 32x32 micro-kernel of 2x2 16x16 f32 tiles), or
//! * [`Kernel::Avx512Bf16`]: AVX-512 BF16 (`vdpbf16ps`, an 8x32 micro-kernel in zmm registers).
//!
//! [`kernel()`] tells which one this CPU (and OS) can run; `None` means the caller should compute
//! in f32 itself. Work runs on the rayon global pool, parallel over blocks of C.
//!
//! Blocking: K is cut into blocks of [`KC`]; for each K block the whole of A and B are packed once
//! (in parallel) into zero-padded bf16 panels in the pair-interleaved ("VNNI") layout the
//! instructions need, then blocks of `MB x NB` of C are computed in parallel from the packed
//! panels. Padding means the micro-kernels never read out of range; only the valid part of C is
//! written.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports, unused_variables))]

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;

use rayon::prelude::*;

/// Which kernel runs on this CPU, detected once per process.
///
/// Detection uses cpuid (`is_x86_feature_detected!` for AVX-512; raw cpuid leaf 7 plus XCR0 for
/// AMX, since AMX detection is not stable in std), and for AMX also the Linux
/// `arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)` permission request, done
/// once per process; if the request fails, AMX is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX-BF16 tile instructions (Sapphire Rapids and later).
    Amx,
    /// AVX-512 BF16 `vdpbf16ps` (Cooper Lake, Sapphire Rapids, Zen 4 and later).
    Avx512Bf16,
}

impl Kernel {
    /// Whether this kernel can run on this CPU in this process (cached; for AMX this includes the
    /// OS permission request).
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Amx => amx_available(),
            Kernel::Avx512Bf16 => avx512bf16_available(),
        }
    }
}

/// The kernel to use on this CPU: AMX where available, else AVX-512 BF16, else `None` (the caller
/// computes in f32 instead). Detected once and cached.
///
/// The environment variable `GRAFT_GEMM_KERNEL=amx|avx512bf16|none` (read once) forces a choice,
/// for tests and benches; a forced kernel the CPU lacks gives `None`. Any other value is ignored.
pub fn kernel() -> Option<Kernel> {
    static K: OnceLock<Option<Kernel>> = OnceLock::new();
    *K.get_or_init(|| {
        let forced = std::env::var("GRAFT_GEMM_KERNEL").ok();
        match forced.as_deref().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Some("amx") => Kernel::Amx.is_available().then_some(Kernel::Amx),
            Some("avx512bf16") | Some("avx512") => Kernel::Avx512Bf16.is_available().then_some(Kernel::Avx512Bf16),
            Some("none") => None,
            _ => {
                if Kernel::Amx.is_available() {
                    Some(Kernel::Amx)
                } else if Kernel::Avx512Bf16.is_available() {
                    Some(Kernel::Avx512Bf16)
                } else {
                    None
                }
            }
        }
    })
}

fn avx512bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(amx::detect_and_request)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Element types the packing routines read: `f32`, `half::bf16`, `half::f16`, all converted to
/// bf16 with round-to-nearest-even when packed (NaN stays NaN).
pub trait Element: Copy + Send + Sync + 'static {
    /// Convert to bf16, round-to-nearest-even.
    fn to_bf16(self) -> half::bf16;

    /// The slice's bf16 bits when the type is bf16 already (packing then only moves bits).
    fn as_bits16(_data: &[Self]) -> Option<&[u16]> {
        None
    }

    /// The slice as f32 when the type is f32 (packing then converts 32 values an instruction).
    fn as_f32(_data: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Element for f32 {
    #[inline(always)]
    fn to_bf16(self) -> half::bf16 {
        half::bf16::from_bits(f32_to_bf16_bits(self))
    }

    fn as_f32(data: &[Self]) -> Option<&[f32]> {
        Some(data)
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn to_bf16(self) -> half::bf16 {
        self
    }

    fn as_bits16(data: &[Self]) -> Option<&[u16]> {
        // SAFETY: bf16 is a transparent u16.
        Some(unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) })
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn to_bf16(self) -> half::bf16 {
        // f16 -> f32 is exact; then one rounding to bf16.
        half::bf16::from_bits(f32_to_bf16_bits(self.to_f32()))
    }
}

/// f32 -> bf16 bits, round-to-nearest-even; NaN becomes a quiet NaN. Branch-free so that the
/// contiguous packing loops vectorize (same results as `half::bf16::from_f32`).
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    let is_nan = (u & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
    let nan = ((u >> 16) as u16) | 0x0040;
    if is_nan {
        nan
    } else {
        rounded
    }
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    /// Backing storage; must hold every element of the view.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in elements between rows.
    pub row_stride: usize,
    /// Distance in elements between columns.
    pub col_stride: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A row-major view: `data[i * cols + j]`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// A column-major view: `data[i + j * rows]` (e.g. the transpose of a row-major `[cols, rows]`
    /// weight).
    pub fn col_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: 1, col_stride: rows }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }

    /// Element `(i, j)`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Panics unless every element of the view lies inside `data` (checked once, so the packing
    /// loops can index without further overflow concerns).
    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| (self.cols - 1).checked_mul(self.col_stride).and_then(|c| r.checked_add(c)));
        assert!(
            matches!(last, Some(l) if l < self.data.len()),
            "graft-gemm: view {what} ({}x{}, strides {},{}) exceeds its data (len {})",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// K block: K is processed in blocks of this many (a multiple of 32); C is re-read between blocks.
pub const KC: usize = 1024;
/// Rows of C per parallel task (a multiple of 32).
const MB: usize = 256;
/// Columns of C per parallel task (a multiple of 32).
const NB: usize = 256;

fn check_shapes<A: Copy, B: Copy>(a: &MatRef<A>, b: &MatRef<B>, c: &[f32], ldc: usize) {
    assert_eq!(a.cols, b.rows, "graft-gemm: A is {}x{} but B is {}x{}", a.rows, a.cols, b.rows, b.cols);
    a.check("A");
    b.check("B");
    check_c(a.rows, b.cols, c, ldc);
}

fn check_c(m: usize, n: usize, c: &[f32], ldc: usize) {
    if m > 0 && n > 0 {
        assert!(ldc >= n, "graft-gemm: c_row_stride {ldc} < n {n}");
        let need = (m - 1).checked_mul(ldc).and_then(|x| x.checked_add(n));
        assert!(matches!(need, Some(x) if x <= c.len()), "graft-gemm: C slice (len {}) too short for {m}x{n} with row stride {ldc}", c.len());
    }
}

/// Scale the valid `m x n` part of C by beta (beta == 0 writes zeros, so NaN garbage goes away).
fn scale_c(c: &mut [f32], m: usize, n: usize, ldc: usize, beta: f32) {
    if beta == 1.0 {
        return;
    }
    let rows = c.par_chunks_mut(ldc).take(m);
    if beta == 0.0 {
        rows.for_each(|r| r[..n].fill(0.0));
    } else {
        rows.for_each(|r| r[..n].iter_mut().for_each(|x| *x *= beta));
    }
}

/// `C[m, n] = beta * C + A[m, k] · B[k, n]`.
///
/// C is row-major with row stride `c_row_stride` (column stride 1). `beta` is normally 0.0
/// (overwrite: C may hold garbage or NaN) or 1.0 (accumulate); other values scale C first. A and B
/// are converted to bf16 while packed; products are accumulated in f32. Runs on the rayon global
/// pool, parallel over blocks of C. Any `m, n, k` work, including 0 (`k == 0` only applies beta).
///
/// Panics if the shapes disagree, a view or C is too short for its shape, or `kernel` is not
/// available on this CPU (see [`Kernel::is_available`]); running it anyway would be undefined.
pub fn gemm<A: Element, B: Element>(kernel: Kernel, a: MatRef<A>, b: MatRef<B>, c: &mut [f32], c_row_stride: usize, beta: f32) {
    check_shapes(&a, &b, c, c_row_stride);
    gemm_from(kernel, a, BSource::View(&b), c, c_row_stride, beta, true)
}

/// B packed once for several products with the same right-hand side ([`gemm_packed`]): the
/// per-head keys and values of an attention, used once per chunk of query rows.
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    /// One packed buffer per K block of [`tune`]'s length.
    blocks: Vec<Aligned>,
}

impl PackedB {
    /// Packs `b` on the calling thread (meant for a task that is one of many parallel ones).
    pub fn new<B: Element>(kernel: Kernel, b: MatRef<B>) -> Self {
        b.check("B");
        let (k, n) = (b.rows, b.cols);
        let np = round_up(n, 32);
        let (kc_blk, _, _) = tune();
        let blocks = (0..k)
            .step_by(kc_blk.max(1))
            .map(|k0| {
                let kc = (k - k0).min(kc_blk);
                let kcp = round_up(kc, 32);
                let mut buf = Aligned::zeroed(np * kcp / 2);
                for_each_panel(false, buf.u32s_mut(), 8 * kcp, |p, dst| pack_panel(PanelKind::Pairs, &b, k0, kc, p * 16, dst));
                buf
            })
            .collect();
        PackedB { kernel, k, n, blocks }
    }
}

/// [`gemm`] with a B packed beforehand, on the calling thread alone: for small products inside
/// a task that is already one of many parallel ones, where splitting costs more than it gains.
/// Panics as [`gemm`] does, and if `b` was packed for another kernel or another `k`.
pub fn gemm_packed<A: Element>(a: MatRef<A>, b: &PackedB, c: &mut [f32], c_row_stride: usize, beta: f32) {
    assert_eq!(a.cols, b.k, "graft-gemm: A is {}x{} but the packed B has {} rows", a.rows, a.cols, b.k);
    a.check("A");
    check_c(a.rows, b.n, c, c_row_stride);
    gemm_from::<A, f32>(b.kernel, a, BSource::Packed(b), c, c_row_stride, beta, false)
}

/// Where the kernels get B's packed K blocks from.
enum BSource<'a, 'b, B> {
    View(&'a MatRef<'b, B>),
    Packed(&'a PackedB),
}

fn gemm_from<A: Element, B: Element>(
    kernel: Kernel,
    a: MatRef<A>,
    b: BSource<B>,
    c: &mut [f32],
    c_row_stride: usize,
    beta: f32,
    parallel: bool,
) {
    assert!(kernel.is_available(), "graft-gemm: kernel {kernel:?} is not available on this CPU");
    let (m, k, n) = match &b {
        BSource::View(b) => (a.rows, a.cols, b.cols),
        BSource::Packed(b) => (a.rows, b.k, b.n),
    };
    if m == 0 || n == 0 {
        return;
    }
    // Any beta other than 0 or 1 is applied up front; then the kernels either overwrite (first K
    // block with beta 0) or accumulate.
    if k == 0 || (beta != 0.0 && beta != 1.0) {
        scale_c(c, m, n, c_row_stride, beta);
        if k == 0 {
            return;
        }
    }
    let overwrite_first = beta == 0.0;
    #[cfg(target_arch = "x86_64")]
    gemm_blocked(kernel, &a, &b, c, c_row_stride, overwrite_first, parallel);
}

#[inline]
fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// View packed u32 storage as bf16 bits.
fn as_u16(x: &mut [u32]) -> &mut [u16] {
    // SAFETY: u16 has weaker alignment than u32 and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u16, x.len() * 2) }
}

fn as_u16_ref(x: &[u32]) -> &[u16] {
    // SAFETY: as in as_u16.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len() * 2) }
}

/// Blocking (K block, rows per task, columns per task): the constants, or
/// `GRAFT_GEMM_TUNE=kc,mb,nb` (read once; for benchmarking; kc is rounded up to a multiple of 32,
/// mb and nb to multiples of 32, all at least 32).
fn tune() -> (usize, usize, usize) {
    static T: OnceLock<(usize, usize, usize)> = OnceLock::new();
    *T.get_or_init(|| {
        let v: Vec<usize> = std::env::var("GRAFT_GEMM_TUNE").unwrap_or_default().split(',').filter_map(|x| x.parse().ok()).collect();
        if v.len() == 3 {
            let r = |x: usize| round_up(x.max(32), 32);
            (r(v[0]), r(v[1]), r(v[2]))
        } else {
            (KC, MB, NB)
        }
    })
}

/// A raw pointer to C that tasks may share: each task writes a disjoint block of C.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks only write disjoint row/column blocks of C (see gemm_blocked).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}
impl CPtr {
    /// A method (not field access) so closures capture the whole Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
fn gemm_blocked<A: Element, B: Element>(
    kernel: Kernel,
    a: &MatRef<A>,
    b: &BSource<B>,
    c: &mut [f32],
    ldc: usize,
    overwrite_first: bool,
    parallel: bool,
) {
    let (m, k) = (a.rows, a.cols);
    let n = match b {
        BSource::View(b) => b.cols,
        BSource::Packed(b) => {
            assert!(b.kernel == kernel, "graft-gemm: B was packed for {:?}", b.kernel);
            b.n
        }
    };
    // Panels are 16 rows of A / 16 columns of B; micro-kernels span 32, so round to 32.
    let mp = round_up(m, 32);
    let np = round_up(n, 32);
    let (kc_blk, mb, nb) = tune();
    let kc_max = round_up(k.min(kc_blk), 32);
    // u32 storage: 4-byte aligned pairs for pack_pairs; the AMX A layout views it as u16.
    let mut apack = PackBuf::take(&PACK_A, mp * kc_max / 2);
    let mut bpack = PackBuf::take(&PACK_B, if matches!(b, BSource::View(_)) { np * kc_max / 2 } else { 0 });
    let cptr = CPtr(c.as_mut_ptr());
    let (mtasks, ntasks) = (m.div_ceil(mb), n.div_ceil(nb));

    let mut k0 = 0;
    while k0 < k {
        let kc = (k - k0).min(kc_blk);
        let kcp = round_up(kc, 32);
        let panel = 8 * kcp; // u32s per 16-wide panel
                             // Pack B: 16-column panels, rows k and k+1 interleaved (same layout for both kernels).
        let bp: &[u32] = match b {
            BSource::View(b) => {
                for_each_panel(parallel, &mut bpack.0.u32s_mut()[..np * kcp / 2], panel, |p, dst| {
                    pack_panel(PanelKind::Pairs, *b, k0, kc, p * 16, dst)
                });
                bpack.0.u32s()
            }
            BSource::Packed(b) => b.blocks[k0 / kc_blk].u32s(),
        };
        // Pack A: 16-row panels, layout depends on the kernel.
        let at = a.t();
        for_each_panel(parallel, &mut apack.0.u32s_mut()[..mp * kcp / 2], panel, |p, dst| match kernel {
            Kernel::Amx => pack_panel(PanelKind::AmxA, a, k0, kc, p * 16, dst),
            Kernel::Avx512Bf16 => pack_panel(PanelKind::Pairs, &at, k0, kc, p * 16, dst),
        });
        let load_c = !(overwrite_first && k0 == 0);
        let (ap, bp) = (as_u16_ref(apack.0.u32s()), as_u16_ref(bp));
        let block_task = |t: usize| {
            // Neighbouring tasks share one operand's block (kept in cache) and stream the other;
            // stream the operand whose whole packed K block is the smaller (more likely cached).
            let (mt, nt) = if mp <= np { (t % mtasks, t / mtasks) } else { (t / ntasks, t % ntasks) };
            let (m0, n0) = (mt * mb, nt * nb);
            let (m1, n1) = ((m0 + mb).min(m), (n0 + nb).min(n));
            let blk = Block { m0, m1, n0, n1, kcp, ldc, load_c };
            // SAFETY: the kernel is available (checked in gemm); packed buffers hold
            // round_up(m,32) x kcp and round_up(n,32) x kcp zero-padded elements, which covers every
            // 32-wide micro-panel the block touches; this task writes only C[m0..m1, n0..n1], which
            // lies inside `c` (checked in check_shapes) and is disjoint from other tasks' blocks.
            unsafe {
                match kernel {
                    Kernel::Amx => amx::block(ap, bp, cptr.get(), &blk),
                    Kernel::Avx512Bf16 => avx512::block(ap, bp, cptr.get(), &blk),
                }
            }
        };
        if parallel {
            (0..mtasks * ntasks).into_par_iter().for_each(block_task);
        } else {
            (0..mtasks * ntasks).for_each(block_task);
        }
        k0 += kc;
    }
}

/// `f(index, panel)` for each `panel`-long chunk of `buf`, in parallel or in order.
fn for_each_panel(parallel: bool, buf: &mut [u32], panel: usize, f: impl Fn(usize, &mut [u32]) + Sync) {
    if parallel {
        buf.par_chunks_mut(panel).enumerate().for_each(|(p, dst)| f(p, dst));
    } else {
        buf.chunks_mut(panel).enumerate().for_each(|(p, dst)| f(p, dst));
    }
}

#[derive(Clone, Copy)]
enum PanelKind {
    Pairs,
    AmxA,
}

/// Packs one panel, in code built for AVX-512 where the CPU has it (both kernels' CPUs do): the
/// conversion loops then run 16 lanes wide, and bf16 weights used transposed go through a
/// register transpose.
fn pack_panel<T: Element>(kind: PanelKind, v: &MatRef<T>, k0: usize, kc: usize, n0: usize, dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        // SAFETY: AVX-512F/BW/VL were detected on this CPU.
        return unsafe { pack_panel_avx512(kind, v, k0, kc, n0, dst) };
    }
    pack_panel_plain(kind, v, k0, kc, n0, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_panel_avx512<T: Element>(kind: PanelKind, v: &MatRef<T>, k0: usize, kc: usize, n0: usize, dst: &mut [u32]) {
    pack_panel_plain(kind, v, k0, kc, n0, dst)
}

#[inline(always)]
fn pack_panel_plain<T: Element>(kind: PanelKind, v: &MatRef<T>, k0: usize, kc: usize, n0: usize, dst: &mut [u32]) {
    match kind {
        PanelKind::Pairs => pack::pack_pairs(v, k0, kc, n0, dst),
        PanelKind::AmxA => pack::pack_a_amx(v, k0, kc, n0, as_u16(dst)),
    }
}

pub(crate) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    static PACK_A: std::cell::Cell<Aligned> = const { std::cell::Cell::new(Aligned(Vec::new())) };
    static PACK_B: std::cell::Cell<Aligned> = const { std::cell::Cell::new(Aligned(Vec::new())) };
}

/// 64 bytes on a 64-byte boundary. Packed panels are kept in these so that every 64-byte tile
/// row a kernel loads is one cache line: a `Vec<u32>` from malloc is only 16-byte aligned (a
/// large one 16 bytes past a page), and its rows then straddle two lines, which halved the AMX
/// kernel's speed in some runs and not in others, as the allocations fell.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Zeroed, cache-line-aligned u32 storage.
#[derive(Default)]
struct Aligned(Vec<Line>);

impl Aligned {
    fn zeroed(len: usize) -> Self {
        Aligned(vec![Line([0; 16]); len.div_ceil(16)])
    }

    fn len(&self) -> usize {
        self.0.len() * 16
    }

    fn u32s(&self) -> &[u32] {
        // SAFETY: a Line is 16 u32s with no padding; the Vec holds len() of them contiguously.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u32, self.len()) }
    }

    fn u32s_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in u32s, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u32, self.len()) }
    }
}

/// A packing buffer kept by the calling thread between products, so that a product neither
/// allocates nor clears one (packing writes every element the kernels read, padding included).
/// A nested product on the same thread (rayon may run one while this one waits) finds the slot
/// empty and gets a fresh buffer.
struct PackBuf(Aligned, &'static std::thread::LocalKey<std::cell::Cell<Aligned>>);

impl PackBuf {
    fn take(slot: &'static std::thread::LocalKey<std::cell::Cell<Aligned>>, len: usize) -> Self {
        let mut v = slot.take();
        if v.len() < len {
            v = Aligned::zeroed(len);
        }
        PackBuf(v, slot)
    }
}

impl Drop for PackBuf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // Keep the larger of this buffer and one a nested product may have left.
        self.1.with(|c| {
            let other = c.take();
            c.set(if other.len() > v.len() { other } else { v });
        });
    }
}

/// One task's block of C for one K block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub m0: usize,
    pub m1: usize,
    pub n0: usize,
    pub n1: usize,
    /// Padded K-block length (multiple of 32); a 16-wide panel holds `16 * kcp` bf16.
    pub kcp: usize,
    pub ldc: usize,
    /// Add to C (true) or overwrite it (false).
    pub load_c: bool,
}

/// Plain reference: converts A and B to bf16 exactly as the kernels do, multiplies in f32 (exact
/// for bf16 inputs) and sums in f64, then `C = beta * C + sum` (beta == 0 overwrites, ignoring NaN
/// in C). Single-threaded and slow; for tests.
pub fn gemm_reference<A: Element, B: Element>(a: MatRef<A>, b: MatRef<B>, c: &mut [f32], c_row_stride: usize, beta: f32) {
    check_shapes(&a, &b, c, c_row_stride);
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += (a.at(i, p).to_bf16().to_f32() * b.at(p, j).to_bf16().to_f32()) as f64;
            }
            let cij = &mut c[i * c_row_stride + j];
            *cij = if beta == 0.0 { s as f32 } else { (beta as f64 * *cij as f64 + s) as f32 };
        }
    }
}

#[cfg(test)]
mod tests {
    /// Packed panels start on cache lines, whatever malloc hands out.
    #[test]
    fn packing_buffers_are_cache_line_aligned() {
        for len in [1, 100, 1 << 20] {
            assert_eq!(super::Aligned::zeroed(len).u32s().as_ptr() as usize % 64, 0);
        }
    }
}
