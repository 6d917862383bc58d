//! A1111 prompt tags (`<lora:name:w>`, `<lora:name:te:unet>`, `te=` / `unet=`, `<lyco:...>`) and
//! `--adapter FILE:w` arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;

use graft_host::generate::prompt_syntax::{extract_adapter_tags, parse_adapter_spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match extract_adapter_tags(text) {
        Ok((rest, tags)) => {
            assert!(rest.len() <= text.len());
            for t in tags {
                assert!(!t.name.trim().is_empty() && t.te_weight.is_finite() && t.unet_weight.is_finite(), "{t:?}");
            }
        }
        Err(e) => graft_fuzz::names(&format!("{e:#}"), "prompt tag `<"),
    }
    if let Err(e) = parse_adapter_spec(text) {
        graft_fuzz::names(&format!("{e:#}"), "--adapter");
    }
});
