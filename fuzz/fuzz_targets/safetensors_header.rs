//! Any bytes as a safetensors file: the adapter reader, the header-only reader (`--lora-dir`),
//! the memory-mapped model reader and candle's loader (checkpoints). Run with
//! `-malloc_limit_mb` (tools/fuzz.sh does): a size in a header must never become an allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/input.safetensors");
    if let Err(e) = graft_formats::read::read_bytes(data, path) {
        graft_fuzz::names(&e.to_string(), "/fuzz/input.safetensors");
    }
    let _ = candle_core::safetensors::load_buffer(data, &candle_core::Device::Cpu);
    let file = graft_fuzz::scratch().join("input.safetensors");
    std::fs::write(&file, data).expect("write scratch file");
    if let Err(e) = graft_host::generate::lora_dir::read_header(&file) {
        graft_fuzz::names(&format!("{e:#}"), "input.safetensors");
    }
    if let Err(e) = graft_sdxl::varbuilder::open_safetensors(&[file]) {
        graft_fuzz::names(&e.to_string(), "input.safetensors");
    }
});
