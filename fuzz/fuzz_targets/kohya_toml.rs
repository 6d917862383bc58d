//! kohya dataset TOML configs: parsed, and opened (image folders are mostly missing: their
//! errors are checked too).
#![no_main]

use libfuzzer_sys::fuzz_target;

use graft_trainer::dataset::{Dataset, DatasetConfig, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match DatasetConfig::from_toml_str(text, "fuzz-dataset.toml", &graft_fuzz::scratch()) {
        Err(e) => graft_fuzz::names(&e.to_string(), "fuzz-dataset.toml"),
        Ok(cfg) => {
            if let Ok(ds) = Dataset::open(&cfg, &OpenOptions { skip_bad: true, verify_images: false }) {
                let epoch = ds.epoch(1, 0).without_images();
                for i in 0..epoch.len().min(4) {
                    let _ = epoch.batch(i);
                }
            }
        }
    }
});
