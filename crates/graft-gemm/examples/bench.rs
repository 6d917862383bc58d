//! GFLOP/s of each available kernel on 1 and 2 threads for 4096^3 and SDXL-like shapes.
//! `cargo run --release --example bench [threads...]` (default: 1 2). Each run gets its own rayon
//! pool, so RAYON_NUM_THREADS need not be set. GRAFT_GEMM_KERNEL=amx|avx512bf16 benches one kernel.

use graft_gemm::{gemm, Element, Kernel, MatRef};
use half::bf16;
use std::time::Instant;

fn fill<T: Copy>(n: usize, f: impl Fn(f32) -> T) -> Vec<T> {
    let mut s = 0x1234_5678u64;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        })
        .collect()
}

/// Process CPU time in seconds (all threads).
fn cpu_time() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best-of-N of one gemm as GFLOP/s: (by wall time, by CPU time / threads). The second discounts
/// time the threads were descheduled (useful when other work shares the cores).
fn run<A: Element, B: Element>(kernel: Kernel, a: MatRef<A>, b: MatRef<B>, c: &mut [f32], threads: usize) -> (f64, f64) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let flops = 2.0 * m as f64 * k as f64 * n as f64;
    gemm(kernel, a, b, c, n, 0.0); // warm-up
    let iters = ((2e11 / flops) as usize).clamp(2, 20);
    let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
    for _ in 0..iters {
        let (t, c0) = (Instant::now(), cpu_time());
        gemm(kernel, a, b, c, n, 0.0);
        best = best.min(t.elapsed().as_secs_f64());
        best_cpu = best_cpu.min((cpu_time() - c0) / threads as f64);
    }
    (flops / best / 1e9, flops / best_cpu / 1e9)
}

struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
}

fn main() {
    let threads: Vec<usize> = {
        let v: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
        if v.is_empty() {
            vec![1, 2]
        } else {
            v
        }
    };
    println!("graft_gemm::kernel() = {:?}", graft_gemm::kernel());
    // GRAFT_GEMM_KERNEL set: bench only that kernel; otherwise every available one.
    let kernels: Vec<Kernel> = if std::env::var_os("GRAFT_GEMM_KERNEL").is_some() {
        graft_gemm::kernel().into_iter().collect()
    } else {
        [Kernel::Amx, Kernel::Avx512Bf16].into_iter().filter(|k| k.is_available()).collect()
    };
    let cases = [
        Case { name: "square bf16 x bf16 (A row, B row)", m: 4096, k: 4096, n: 4096 },
        Case { name: "square f32 x bf16 weight (B = W^T)", m: 4096, k: 4096, n: 4096 },
        Case { name: "linear f32 x W^T bf16", m: 4096, k: 640, n: 640 },
        Case { name: "linear f32 x W^T bf16", m: 1024, k: 1280, n: 5120 },
        Case { name: "linear f32 x W^T bf16 (512 px)", m: 256, k: 1280, n: 1280 },
        Case { name: "conv cols f32 x W^T bf16", m: 4096, k: 5760, n: 640 },
        Case { name: "conv W bf16 x cols f32 (row)", m: 640, k: 5760, n: 4096 },
        Case { name: "backward dx f32 dy x W bf16 (row)", m: 4096, k: 640, n: 640 },
        Case { name: "conv backward W^T bf16 x dy f32", m: 5760, k: 640, n: 4096 },
    ];
    println!("{:<38} {:>16} {:>12} {:>8} {:>10} {:>10}", "case", "m x k x n", "kernel", "threads", "GFLOP/s", "cpu-GF/s");
    for (ci, cs) in cases.iter().enumerate() {
        let (m, k, n) = (cs.m, cs.k, cs.n);
        let mut c = vec![0f32; m * n];
        let af32 = fill(m * k, |x| x);
        let abf = fill(m * k, bf16::from_f32);
        let bf32 = fill(k * n, |x| x);
        let bbf = fill(k * n, bf16::from_f32);
        for &kernel in &kernels {
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                let g = pool.install(|| match ci {
                    0 => run(kernel, MatRef::row_major(&abf, m, k), MatRef::row_major(&bbf, k, n), &mut c, t),
                    // weight [n, k] row-major, used transposed
                    1..=5 => run(kernel, MatRef::row_major(&af32, m, k), MatRef::row_major(&bbf, n, k).t(), &mut c, t),
                    // weight [m, k] bf16 row-major times columns [k, n] f32 row-major
                    6 => run(kernel, MatRef::row_major(&abf, m, k), MatRef::row_major(&bf32, k, n), &mut c, t),
                    // dx = dy [m, k] f32 · W [k, n] bf16 row-major
                    7 => run(kernel, MatRef::row_major(&af32, m, k), MatRef::row_major(&bbf, k, n), &mut c, t),
                    // columns' gradient = W^T (W [k, m] bf16 row-major) · dy [k, n] f32
                    _ => run(kernel, MatRef::row_major(&abf, k, m).t(), MatRef::row_major(&bf32, k, n), &mut c, t),
                });
                println!("{:<38} {:>16} {:>12} {:>8} {:>10.1} {:>10.1}", cs.name, format!("{m}x{k}x{n}"), format!("{kernel:?}"), t, g.0, g.1);
            }
        }
    }
}
