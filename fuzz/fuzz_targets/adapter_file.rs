//! Adapter files of every key family (seeded with kohya, PEFT and LyCORIS files of the tiny
//! model): read against the tiny model's layers, every key accounted for, delta weights computed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/adapter.safetensors");
    let raw = match graft_formats::read::read_bytes(data, path) {
        Ok(r) => r,
        Err(e) => return graft_fuzz::names(&e.to_string(), "/fuzz/adapter.safetensors"),
    };
    match graft_formats::read_raw(&raw, graft_fuzz::tiny_keys()) {
        Err(e) => graft_fuzz::names(&e.to_string(), "/fuzz/adapter.safetensors"),
        Ok((file, report)) => {
            assert_eq!(report.attached.len(), file.modules.len());
            let _ = report.summary();
            for m in &file.modules {
                let _ = m.delta_weight(0.8);
                let _ = m.delta_bias(0.8);
            }
        }
    }
});
