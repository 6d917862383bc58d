//! The allocator setting for tensor work.

/// glibc serves allocations above its mmap threshold with fresh mappings and unmaps them on
/// free, and trims the heap top as soon as it frees enough: every large tensor of every step
/// then pays page faults on freshly zeroed pages (16% of a real-size training step's time).
/// A fixed 32 MiB threshold (glibc's upper bound) and no trimming keep freed tensors' memory for
/// the next step: `graft bench real.block_train_32x32` 1.33 s -> 1.01 s per step, same peak.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
