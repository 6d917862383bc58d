//! kohya sample-prompt files: valid prompts (size a positive multiple of 8 within the limit,
//! steps > 0, finite guidance) or an error naming the file and line.
#![no_main]

use libfuzzer_sys::fuzz_target;

use graft_trainer::samples::{parse_prompts, SampleDefaults};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_prompts(text, "fuzz-prompts.txt", &SampleDefaults::default()) {
        Err(e) => graft_fuzz::names(&format!("{e:#}"), "fuzz-prompts.txt:"),
        Ok(prompts) => {
            for p in prompts {
                assert!(p.width > 0 && p.width % 8 == 0 && p.width <= graft_sdxl::pipeline::MAX_SIDE, "{p:?}");
                assert!(p.height > 0 && p.height % 8 == 0 && p.height <= graft_sdxl::pipeline::MAX_SIDE, "{p:?}");
                assert!(p.steps > 0 && p.guidance.is_finite(), "{p:?}");
            }
        }
    }
});
