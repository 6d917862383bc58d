//! PNG output with the generation parameters in an A1111 `parameters` text chunk.

use std::path::Path;

use graft_sdxl::GenerateParams;

use crate::error::{io, Cause, Result};

/// A1111's sampler name for a graft scheduler name.
pub fn sampler_name(scheduler: &str) -> &str {
    match scheduler {
        "euler" => "Euler",
        "euler_a" => "Euler a",
        "ddim" => "DDIM",
        "dpmpp_2m" => "DPM++ 2M",
        "dpmpp_2m_karras" => "DPM++ 2M Karras",
        other => other,
    }
}

/// The `parameters` text as A1111 writes it: prompt, negative prompt, then the settings line.
pub fn a1111_parameters(p: &GenerateParams, model: &str) -> String {
    a1111_parameters_with(p, model, &[])
}

/// As [`a1111_parameters`], with more `Key: value` fields before `Version` (e.g. A1111's
/// `Lora hashes: "name: 0123456789ab"`).
pub fn a1111_parameters_with(p: &GenerateParams, model: &str, extra: &[(String, String)]) -> String {
    let mut text = p.prompt.clone();
    if let Some(n) = p.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        text.push_str(&format!("\nNegative prompt: {n}"));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        p.steps,
        sampler_name(&p.scheduler),
        p.guidance,
        p.seed,
        p.width,
        p.height,
        model,
    ));
    for (k, v) in extra {
        text.push_str(&format!(", {k}: {v}"));
    }
    text.push_str(&format!(", Version: graft {}", env!("CARGO_PKG_VERSION")));
    text
}

/// Writes an 8-bit RGB PNG with a `parameters` tEXt chunk, through a temporary file and a rename
/// so an existing image is never left half-written.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8], parameters: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create folder {}", dir.display()), dir))?;
    }
    let tmp = path.with_extension("png.tmp");
    let write = || -> std::result::Result<(), Cause> {
        let file = std::fs::File::create(&tmp)?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("parameters".into(), parameters.into())?;
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
        Ok(())
    };
    write().map_err(io(format!("cannot write {}", tmp.display()), &tmp))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot move {} to {}", tmp.display(), path.display()), path))?;
    Ok(())
}

/// Reads the `parameters` text chunk of a PNG (for tests and `graft inspect`).
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display()), path))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(io(format!("{}: not a readable PNG", path.display()), path))?;
    Ok(reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone()))
}
