//! Process-wide settings for tensor work, made once at start-up before any thread exists.

/// Both settings below; `graft` calls this first thing.
pub fn configure() {
    pin_thread_count();
    keep_freed_memory();
}

/// candle asks for its thread count on every matmul, and without `RAYON_NUM_THREADS` it works
/// the count out again each time by reading and parsing /proc/cpuinfo: a third of a tiny-model
/// training step went there (`graft bench tiny.train_step_b4`: 151 -> 81 ms). Working it out once
/// and setting the variable makes every later call an environment lookup.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
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
