//! Each available kernel against `gemm_reference`. Kernels the CPU lacks are skipped with a note.

use graft_gemm::{gemm, gemm_packed, gemm_reference, Element, Kernel, MatRef, PackedB};
use half::{bf16, f16};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for k in [Kernel::Amx, Kernel::Avx512Bf16] {
        if k.is_available() {
            v.push(k);
        } else {
            eprintln!("note: kernel {k:?} not available on this CPU, skipped");
        }
    }
    v
}

/// Layout of a logical rows x cols matrix inside a buffer.
#[derive(Clone, Copy, Debug)]
enum Layout {
    RowMajor,
    ColMajor,
    /// Row-major with padding: row stride cols + 7.
    PaddedRows,
    /// Neither stride is 1: element (i, j) at i * 3 * cols + j * 3 (generic packing path).
    Strided,
}

fn make<T: Copy>(data: &[T], rows: usize, cols: usize, layout: Layout) -> MatRef<'_, T> {
    match layout {
        Layout::RowMajor => MatRef { data, rows, cols, row_stride: cols, col_stride: 1 },
        Layout::ColMajor => MatRef { data, rows, cols, row_stride: 1, col_stride: rows },
        Layout::PaddedRows => MatRef { data, rows, cols, row_stride: cols + 7, col_stride: 1 },
        Layout::Strided => MatRef { data, rows, cols, row_stride: 3 * cols, col_stride: 3 },
    }
}

fn buf_len(rows: usize, cols: usize, layout: Layout) -> usize {
    match layout {
        Layout::RowMajor | Layout::ColMajor => rows * cols,
        Layout::PaddedRows => rows * (cols + 7),
        Layout::Strided => rows * 3 * cols,
    }
}

/// Run `kernel` and the reference on the same inputs and compare with a tolerance of
/// 1e-5 * sum_k |a||b| (+ |C| rounding for beta = 1).
#[allow(clippy::too_many_arguments)]
fn check<A: Element, B: Element>(
    kernel: Kernel,
    m: usize,
    k: usize,
    n: usize,
    la: Layout,
    lb: Layout,
    beta: f32,
    conv_a: impl Fn(f32) -> A,
    conv_b: impl Fn(f32) -> B,
    seed: u64,
) {
    let mut rng = Lcg(seed);
    let adata: Vec<A> = rng.vec(buf_len(m, k, la)).into_iter().map(&conv_a).collect();
    let bdata: Vec<B> = rng.vec(buf_len(k, n, lb)).into_iter().map(&conv_b).collect();
    let a = make(&adata, m, k, la);
    let b = make(&bdata, k, n, lb);
    let ldc = n + 3;
    let c0: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * ldc] } else { rng.vec(m * ldc) };
    let mut c_ref = c0.clone();
    let mut c_k = c0.clone();
    gemm_reference(a, b, &mut c_ref, ldc, beta);
    gemm(kernel, a, b, &mut c_k, ldc, beta);
    for i in 0..m {
        for j in 0..n {
            let mut bound = 0f64;
            for p in 0..k {
                bound += (a.at(i, p).to_bf16().to_f32() as f64 * b.at(p, j).to_bf16().to_f32() as f64).abs();
            }
            let cterm = if beta == 0.0 { 0.0 } else { (beta as f64 * c0[i * ldc + j] as f64).abs() };
            let tol = 1e-5 * bound + 1e-6 * cterm + 1e-30;
            let (x, y) = (c_k[i * ldc + j] as f64, c_ref[i * ldc + j] as f64);
            assert!(
                (x - y).abs() <= tol,
                "{kernel:?} m={m} k={k} n={n} A:{la:?} B:{lb:?} beta={beta}: C[{i},{j}] = {x}, reference {y}, tol {tol}"
            );
        }
        // Padding columns of C are never touched.
        for j in n..ldc {
            let (x, y) = (c_k[i * ldc + j], c0[i * ldc + j]);
            assert!(x.to_bits() == y.to_bits(), "{kernel:?}: wrote C[{i},{j}] outside n");
        }
    }
}

const LAYOUTS: [Layout; 4] = [Layout::RowMajor, Layout::ColMajor, Layout::PaddedRows, Layout::Strided];

#[test]
fn shapes_f32() {
    let shapes = [(1, 1, 1), (17, 65, 33), (31, 1, 47), (2, 3, 5), (32, 32, 32), (33, 31, 65), (100, 300, 200), (16, 64, 16)];
    for kernel in kernels() {
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            for (li, &la) in LAYOUTS.iter().enumerate() {
                for &lb in &LAYOUTS {
                    // Keep the big shape to a subset of layout pairs to bound the reference's cost.
                    if m * k * n > 1_000_000 && !(li == 0 || matches!(lb, Layout::ColMajor)) {
                        continue;
                    }
                    for beta in [0.0, 1.0] {
                        check(kernel, m, k, n, la, lb, beta, |x| x, |x| x, s as u64 * 31 + 7);
                    }
                }
            }
        }
    }
}

#[test]
fn multiple_k_blocks_and_tasks() {
    // K > KC (several K blocks, C re-read between them), M and N over one task block, odd edges.
    for kernel in kernels() {
        for beta in [0.0, 1.0, 0.5] {
            check(kernel, 300, 1100, 290, Layout::RowMajor, Layout::ColMajor, beta, |x| x, |x| x, 11);
        }
        check(kernel, 257, 1025, 263, Layout::ColMajor, Layout::RowMajor, 0.0, |x| x, |x| x, 12);
    }
}

#[test]
fn half_types() {
    for kernel in kernels() {
        for (la, lb) in [(Layout::RowMajor, Layout::RowMajor), (Layout::RowMajor, Layout::ColMajor), (Layout::ColMajor, Layout::Strided)] {
            for beta in [0.0, 1.0] {
                // conv-like: bf16 / f16 weights as A, f32 columns as B
                check(kernel, 40, 9 * 7, 70, la, lb, beta, bf16::from_f32, |x| x, 1);
                check(kernel, 40, 9 * 7, 70, la, lb, beta, f16::from_f32, |x| x, 2);
                // linear-like: f32 activations as A, bf16 / f16 weight as B
                check(kernel, 70, 33, 40, la, lb, beta, |x| x, bf16::from_f32, 3);
                check(kernel, 70, 33, 40, la, lb, beta, |x| x, f16::from_f32, 4);
                check(kernel, 19, 45, 21, la, lb, beta, f16::from_f32, bf16::from_f32, 5);
            }
        }
    }
}

#[test]
fn bf16_weight_used_transposed() {
    // The register-transpose packing path: bf16 B with K contiguous (a [n, k] weight used as
    // W^T), full 16-column panels, several 16-pair tiles, a K remainder of odd length, two K
    // blocks, and a partial last panel that takes the scalar path.
    for kernel in kernels() {
        for (m, k, n) in [(37, 1100, 48), (5, 65, 16), (33, 97, 40)] {
            for beta in [0.0, 1.0] {
                check(kernel, m, k, n, Layout::RowMajor, Layout::ColMajor, beta, |x| x, bf16::from_f32, 21);
            }
        }
    }
}

#[test]
fn packed_b_matches_the_reference() {
    // B packed once and used for several A's (attention's keys and values): several K blocks,
    // transposed and plain layouts, overwrite and accumulate.
    let mut rng = Lcg(5);
    for kernel in kernels() {
        for (m, k, n, lb) in [(37, 64, 300, Layout::ColMajor), (70, 1100, 64, Layout::RowMajor), (16, 33, 17, Layout::Strided)] {
            let bdata = rng.vec(buf_len(k, n, lb));
            let b = make(&bdata, k, n, lb);
            let packed = PackedB::new(kernel, b);
            for beta in [0.0, 1.0] {
                let adata = rng.vec(m * k);
                let a = MatRef::row_major(&adata, m, k);
                let start = rng.vec(m * n);
                let (mut got, mut want) = (start.clone(), start);
                gemm_packed(a, &packed, &mut got, n, beta);
                gemm_reference(a, b, &mut want, n, beta);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * k as f32 + 1e-6 * w.abs();
                    assert!((g - w).abs() <= tol, "{kernel:?} {m}x{k}x{n} {lb:?} beta {beta}: C[{i}] {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn zero_sizes() {
    for kernel in kernels() {
        let a = [1.0f32; 12];
        let b = [1.0f32; 12];
        // k == 0: only beta applies.
        let mut c = vec![f32::NAN; 6];
        gemm(kernel, MatRef::row_major(&a[..0], 2, 0), MatRef::row_major(&b[..0], 0, 3), &mut c, 3, 0.0);
        assert_eq!(c, vec![0.0; 6]);
        let mut c = vec![2.0f32; 6];
        gemm(kernel, MatRef::row_major(&a[..0], 2, 0), MatRef::row_major(&b[..0], 0, 3), &mut c, 3, 1.0);
        assert_eq!(c, vec![2.0; 6]);
        gemm(kernel, MatRef::row_major(&a[..0], 2, 0), MatRef::row_major(&b[..0], 0, 3), &mut c, 3, 0.5);
        assert_eq!(c, vec![1.0; 6]);
        // m == 0 or n == 0: no-op, C may be empty.
        let mut e: Vec<f32> = vec![];
        gemm(kernel, MatRef::row_major(&a[..0], 0, 4), MatRef::row_major(&b[..12], 4, 3), &mut e, 3, 0.0);
        gemm(kernel, MatRef::row_major(&a[..8], 2, 4), MatRef::row_major(&b[..0], 4, 0), &mut e, 0, 0.0);
    }
}

#[test]
fn conversion_matches_half() {
    // The branch-free f32 -> bf16 rounding agrees with half's.
    let mut rng = Lcg(99);
    // 1 + 2^-8 and 1 + 3 * 2^-8: bf16 rounding ties, written out exactly.
    #[allow(clippy::excessive_precision)]
    let specials =
        [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY, 1.00390625, 1.01171875, 3.3895314e38];
    for x in specials.into_iter().chain((0..100_000).map(|_| rng.next() * 1e3)) {
        assert_eq!(x.to_bf16().to_bits(), bf16::from_f32(x).to_bits(), "{x}");
    }
    assert!(f32::NAN.to_bf16().is_nan());
}

#[test]
fn dispatch() {
    let k = graft_gemm::kernel();
    eprintln!("note: graft_gemm::kernel() = {k:?}");
    if let Some(k) = k {
        assert!(k.is_available());
    }
}
