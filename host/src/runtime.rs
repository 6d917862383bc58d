//! Process-wide settings for tensor work, made once at start-up before any thread exists.

/// The settings below; `graft` calls this first thing. `threads`: a count asked for on the
/// command line, which must be set before rayon's pool starts (it starts with its size fixed).
pub fn configure(threads: Option<usize>) {
    pin_thread_count(threads.filter(|&n| n > 0));
    keep_freed_memory();
    // Its size comes from RAYON_NUM_THREADS, set just above. This fails only if the pool
    // exists already, which nothing before this line starts.
    let _ = pool_builder().build_global();
}

/// Every thread pool of `graft`: threads with a stack of 64 MiB. The commands run on a pool
/// thread ([`on_worker`]), and candle's backward walks the graph recursively, as deep as the
/// model is; rayon's default stack is 2 MiB, the main thread's 8. Only what is touched of a
/// stack is backed by memory.
pub fn pool_builder() -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new().stack_size(64 << 20)
}

/// candle asks for its thread count on every matmul, and without `RAYON_NUM_THREADS` it works
/// the count out again each time by reading and parsing /proc/cpuinfo: a third of a tiny-model
/// training step went there (`graft bench tiny.train_step_b4`: 151 -> 81 ms). Working it out once
/// and setting the variable makes every later call an environment lookup.
fn pin_thread_count(asked: Option<usize>) {
    if asked.is_some() || std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = asked.unwrap_or_else(candle_core::utils::get_num_threads);
        // Single-threaded here: no other thread reads the environment yet.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// glibc serves allocations above its mmap threshold with fresh mappings and unmaps them on
/// free, and trims the heap top as soon as it frees enough: every large tensor of every step
/// then pays page faults on freshly zeroed pages (16% of a real-size training step's time).
/// A fixed 32 MiB threshold (glibc's upper bound) and no trimming keep freed tensors' memory for
/// the next step: `graft bench real.block_train_32x32` 1.33 s -> 1.01 s per step, same peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Runs `f` on a worker of rayon's global pool and waits for it. Tensor ops split their work
/// over that pool (candle's matmul through gemm, graft's fused kernels); started from a thread
/// outside it, every op hands its work over and sleeps until woken, two thread switches per op.
/// Started from a worker, the caller does its share and only the other workers are woken:
/// on this 2-core Xeon, `graft bench tiny.train_step_b1` 65 -> 37 ms, the demo 95 -> 61 s.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    /// Recursion as deep as 16 MiB of stack, on a thread of `graft`'s pools.
    #[test]
    fn pool_threads_have_room_for_a_deep_backward() {
        fn depth(n: u32) -> u64 {
            let frame = std::hint::black_box([n as u8; 1024]);
            if n == 0 {
                return frame[0] as u64;
            }
            depth(n - 1) + frame[(n % 1024) as usize] as u64
        }
        let pool = super::pool_builder().num_threads(1).build().unwrap();
        assert_eq!(pool.install(|| depth(16 * 1024)), (0..=16 * 1024u32).map(|n| (n as u8) as u64).sum::<u64>());
    }

    #[test]
    fn on_worker_runs_on_a_pool_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is not a worker");
        assert!(super::on_worker(rayon::current_thread_index).is_some());
    }
}
