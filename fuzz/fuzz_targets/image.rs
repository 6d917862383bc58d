//! Training images (PNG, JPEG, WebP, by content): opened as a one-image dataset, placed in a
//! bucket, decoded, resized and cropped; and a PNG's A1111 `parameters`. Run with
//! `-malloc_limit_mb`: a size in an image header must not become an allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

use graft_trainer::dataset::{Dataset, DatasetConfig, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let dir = graft_fuzz::scratch().join("images");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let image = dir.join("a.png");
    std::fs::write(&image, data).expect("write scratch file");
    std::fs::write(dir.join("a.txt"), "a caption").expect("write scratch file");
    let toml = "[general]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"images\"\n";
    let cfg = DatasetConfig::from_toml_str(toml, "fuzz.toml", &graft_fuzz::scratch()).expect("fixed config");
    match Dataset::open(&cfg, &OpenOptions { skip_bad: false, verify_images: true }) {
        Err(e) => graft_fuzz::names(&e.to_string(), "a.png"),
        Ok(ds) => {
            if let Err(e) = ds.load_image(0, true) {
                graft_fuzz::names(&e.to_string(), "a.png");
            }
        }
    }
    if let Err(e) = graft_trainer::png_out::read_parameters(&image) {
        graft_fuzz::names(&format!("{e:#}"), "a.png");
    }
});
