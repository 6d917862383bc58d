//! Sample images during training (and `graft generate --prompts`): kohya's sample-prompt files,
//! rendering them with the adapters in use, and image grids.
//!
//! A prompt file (kohya `--sample_prompts`, `.txt`) has one prompt a line; blank lines and lines
//! starting with `#` are skipped. Options follow the prompt after ` --`:
//!
//! ```text
//! a watercolor fox, autumn --n blurry, lowres --w 1024 --h 768 --d 42 --s 30 --l 5.5 --ss euler_a
//! ```
//!
//! `--n` negative prompt, `--w` / `--h` size, `--d` seed, `--s` steps, `--l` guidance (CFG),
//! `--ss` sampler. Sampler names may be graft's (`euler`, `euler_a`, `ddim`, `dpmpp_2m`,
//! `dpmpp_2m_karras`), kohya's (`k_euler`, `k_euler_a`, `dpmsolver++`) or A1111's (`Euler a`,
//! `DPM++ 2M Karras`). kohya ignores options it does not know; graft stops with the line number,
//! so a typo never silently changes a sample.
//!
//! A line without `--d` gets the seed `defaults.seed + its index` (0-based, in prompt order), so
//! each prompt has its own fixed seed and every sampling round of a run redraws the same noise.

use std::path::{Path, PathBuf};

use graft_sdxl::pipeline::to_rgb8;
use graft_sdxl::{GenerateParams, SdxlModel};
use image::RgbImage;

use crate::error::{io, At, Error, Result};
use crate::png_out;
use graft_runtime::adapters::dispatcher::AdapterSet;

/// What a prompt line leaves unsaid.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleDefaults {
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    /// The seed of the first prompt without `--d`; the next one gets `seed + 1`, and so on.
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// A graft scheduler name; `None`: the pipeline's default (`euler`).
    pub scheduler: Option<String>,
}

impl Default for SampleDefaults {
    /// kohya's sampling defaults (512x512, 30 steps, CFG 7.5) at SDXL's size.
    fn default() -> Self {
        Self { negative: None, width: 1024, height: 1024, seed: 0, steps: 30, guidance: 7.5, scheduler: None }
    }
}

/// One image to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    pub prompt: String,
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// A graft scheduler name (already mapped from kohya / A1111 names); `None`: `euler`.
    pub scheduler: Option<String>,
}

impl SamplePrompt {
    /// The pipeline parameters of this prompt.
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.clone().unwrap_or_else(|| "euler".into()),
            seed: self.seed,
            init_latents: None,
        }
    }
}

/// The schedulers graft has.
pub const SAMPLERS: [&str; 5] = ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"];

/// A graft scheduler name for a graft, kohya or A1111 sampler name; `None` when graft has no
/// such sampler.
pub fn sampler_to_scheduler(name: &str) -> Option<&'static str> {
    let key = name.trim().to_lowercase().replace("++", "pp").replace([' ', '-'], "_");
    let key = key.strip_prefix("k_").unwrap_or(&key);
    Some(match key {
        "euler" => "euler",
        "euler_a" | "euler_ancestral" => "euler_a",
        "ddim" => "ddim",
        "dpmpp_2m" | "dpmsolverpp" | "dpmsolver_pp" | "dpm_solver_pp" => "dpmpp_2m",
        "dpmpp_2m_karras" => "dpmpp_2m_karras",
        _ => return None,
    })
}

/// Parses the text of a prompt file. `source` names it in errors (`file:line: ...`).
pub fn parse_prompts(text: &str, source: &str, defaults: &SampleDefaults) -> Result<Vec<SamplePrompt>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let index = out.len() as u64;
        let p = parse_line(line, index, defaults).at(|| format!("{source}:{}: {line}", i + 1))?;
        out.push(p);
    }
    Ok(out)
}

/// Reads a kohya prompt file (`.txt`), one prompt a line.
pub fn parse_prompt_file(path: &Path, defaults: &SampleDefaults) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path).map_err(io(format!("{}: cannot read the sample prompt file", path.display()), path))?;
    let prompts = parse_prompts(&text, &path.display().to_string(), defaults)?;
    if prompts.is_empty() {
        return Err(Error::Sample(format!("{}: no prompt in the file (blank lines and `#` comments are skipped)", path.display())));
    }
    Ok(prompts)
}

fn parse_line(line: &str, index: u64, d: &SampleDefaults) -> Result<SamplePrompt> {
    // A leading space lets a line that starts with an option have an empty prompt, as in kohya.
    let spaced = format!(" {line}");
    let mut parts = spaced.split(" --");
    let prompt = parts.next().unwrap_or_default().trim().to_string();
    let mut p = SamplePrompt {
        prompt,
        negative: d.negative.clone(),
        width: d.width,
        height: d.height,
        seed: d.seed.wrapping_add(index),
        steps: d.steps,
        guidance: d.guidance,
        scheduler: d.scheduler.clone(),
    };
    for part in parts {
        let part = part.trim();
        let (key, value) = match part.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => (part, ""),
        };
        if value.is_empty() {
            return Err(Error::Sample(format!("option `--{key}` has no value")));
        }
        let int = |what: &str| -> Result<u64> {
            value.parse::<u64>().map_err(|_| Error::Sample(format!("`--{key} {value}`: the {what} must be a whole number")))
        };
        match key.to_lowercase().as_str() {
            "n" => p.negative = Some(value.to_string()),
            "w" => p.width = int("width")? as usize,
            "h" => p.height = int("height")? as usize,
            "d" => p.seed = int("seed")?,
            "s" => p.steps = int("number of steps")? as usize,
            "l" => {
                p.guidance = value
                    .parse::<f64>()
                    .ok()
                    .filter(|g| g.is_finite())
                    .ok_or_else(|| Error::Sample(format!("`--l {value}`: the guidance scale must be a number")))?
            }
            "ss" => {
                let s = sampler_to_scheduler(value)
                    .ok_or_else(|| Error::Sample(format!("sampler `{value}` is not available in graft; use one of {}", SAMPLERS.join(", "))))?;
                p.scheduler = Some(s.to_string());
            }
            _ => {
                return Err(Error::Sample(format!(
                    "unknown option `--{key}`; sample prompts take --n (negative), --w, --h (size), --d (seed), \
                     --s (steps), --l (guidance), --ss (sampler)"
                )))
            }
        }
    }
    graft_sdxl::pipeline::check_size(p.width, p.height).map_err(|e| Error::Sample(e.to_string()))?;
    if p.steps == 0 {
        return Err(Error::Sample("`--s 0`: sampling needs at least one step".to_string()));
    }
    Ok(p)
}

/// The file name kohya-style: `{stem}_{index:02}_{seed}.png`.
pub fn sample_file_name(stem: &str, index: usize, seed: u64) -> String {
    format!("{stem}_{index:02}_{seed}.png")
}

/// Generates every prompt with the adapters of `set` and writes `{stem}_{index:02}_{seed}.png`
/// into `out_dir` (created if needed), each with its A1111 `parameters` chunk. Returns the paths
/// in prompt order.
///
/// The caller must switch the set out of training mode first (`set.set_training(false)`, which
/// needs `&mut`), and back afterwards: in training mode strategies apply dropout and the images
/// would not be the trained adapter's, so a set in training mode is an error. A strategy that fails while sampling is detached by the set as during training; its
/// failure stays in `set.take_failures()` for the caller.
pub fn render_samples(model: &SdxlModel, set: &AdapterSet, prompts: &[SamplePrompt], out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if set.is_training() {
        return Err(Error::Sample(
            "render_samples: the adapter set is in training mode (dropout on); call `set.set_training(false)` first".to_string(),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(io(format!("cannot create the sample folder {}", out_dir.display()), out_dir))?;
    let model_name = model.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let hooks = set.hooks();
    let mut written = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let params = p.params();
        let out = model.generate(&params, hooks.pipeline(), &mut |_, _| {}).at(|| format!("sample {i} (`{}`)", p.prompt))?;
        let (w, h, rgb) = to_rgb8(&out.image.get(0)?)?;
        let path = out_dir.join(sample_file_name(stem, i, p.seed));
        png_out::write_png(&path, w, h, &rgb, &png_out::a1111_parameters(&params, &model_name))?;
        written.push(path);
    }
    Ok(written)
}

/// Gap between grid cells and around the grid, in pixels.
const GRID_GAP: u32 = 4;
const GRID_BACKGROUND: [u8; 3] = [255, 255, 255];

/// Lays images out in rows of `columns` (0: a near-square grid), each in a cell the size of the
/// largest image, centred, with a white gap between cells.
pub fn grid_image(images: &[RgbImage], columns: usize) -> Result<RgbImage> {
    if images.is_empty() {
        return Err(Error::Sample("a grid needs at least one image".to_string()));
    }
    let n = images.len();
    let cols = if columns == 0 { (n as f64).sqrt().ceil() as usize } else { columns.min(n) };
    let rows = n.div_ceil(cols);
    let cell_w = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let cell_h = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let width = cols as u32 * (cell_w + GRID_GAP) + GRID_GAP;
    let height = rows as u32 * (cell_h + GRID_GAP) + GRID_GAP;
    let mut out = RgbImage::from_pixel(width, height, image::Rgb(GRID_BACKGROUND));
    for (i, img) in images.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        let x = GRID_GAP + c * (cell_w + GRID_GAP) + (cell_w - img.width()) / 2;
        let y = GRID_GAP + r * (cell_h + GRID_GAP) + (cell_h - img.height()) / 2;
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    Ok(out)
}

/// Writes a grid of `images` to `out` (see [`grid_image`]); `parameters` becomes its A1111
/// `parameters` chunk when given.
pub fn grid(images: &[RgbImage], columns: usize, out: &Path, parameters: Option<&str>) -> Result<()> {
    let g = grid_image(images, columns)?;
    write_rgb_png(out, &g, parameters)
}

/// Reads image files (PNG, JPEG, WebP) and writes their grid to `out`, with the `parameters`
/// chunk of the first one (as A1111 does for its grids).
pub fn grid_files(paths: &[PathBuf], columns: usize, out: &Path) -> Result<()> {
    let mut images = Vec::with_capacity(paths.len());
    for p in paths {
        let img = image::open(p).map_err(io(format!("{}: cannot read the image for the grid", p.display()), p))?;
        images.push(img.to_rgb8());
    }
    let parameters = match paths.first() {
        Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) => png_out::read_parameters(p).ok().flatten(),
        _ => None,
    };
    grid(&images, columns, out, parameters.as_deref())
}

/// Writes an RGB image as a PNG through a temporary file and a rename, with an optional A1111
/// `parameters` chunk.
pub fn write_rgb_png(path: &Path, img: &RgbImage, parameters: Option<&str>) -> Result<()> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if let Some(text) = parameters {
        return png_out::write_png(path, w, h, img.as_raw(), text);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create folder {}", dir.display()), dir))?;
    }
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png).map_err(io(format!("cannot write {}", tmp.display()), &tmp))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot move {} to {}", tmp.display(), path.display()), path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> SampleDefaults {
        SampleDefaults { width: 64, height: 48, seed: 100, steps: 4, guidance: 5.0, ..Default::default() }
    }

    #[test]
    fn parses_options_comments_and_defaults() {
        let text = "# samples\n\n  a red fox --n blurry, lowres --w 128 --h 96 --d 7 --s 12 --l 6.5 --ss Euler a\n\
                    a blue bird\n   # indented comment\nthird --ss dpmsolver++ --L 3\n";
        let p = parse_prompts(text, "p.txt", &defaults()).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0],
            SamplePrompt {
                prompt: "a red fox".into(),
                negative: Some("blurry, lowres".into()),
                width: 128,
                height: 96,
                seed: 7,
                steps: 12,
                guidance: 6.5,
                scheduler: Some("euler_a".into()),
            }
        );
        // Defaults, and the seed of the n-th prompt without --d is seed + n.
        assert_eq!(
            p[1],
            SamplePrompt {
                prompt: "a blue bird".into(),
                negative: None,
                width: 64,
                height: 48,
                seed: 101,
                steps: 4,
                guidance: 5.0,
                scheduler: None,
            }
        );
        assert_eq!((p[2].seed, p[2].guidance, p[2].scheduler.as_deref()), (102, 3.0, Some("dpmpp_2m")));
        assert_eq!(p[0].params().scheduler, "euler_a");
        assert_eq!(p[1].params().scheduler, "euler");
    }

    #[test]
    fn a_line_may_start_with_an_option() {
        let p = parse_prompts("--n only negative --d 3", "p.txt", &defaults()).unwrap();
        assert_eq!((p[0].prompt.as_str(), p[0].negative.as_deref(), p[0].seed), ("", Some("only negative"), 3));
    }

    #[test]
    fn sampler_names_of_every_tool() {
        for (name, want) in [
            ("euler", "euler"),
            ("k_euler", "euler"),
            ("Euler", "euler"),
            ("euler_a", "euler_a"),
            ("k_euler_a", "euler_a"),
            ("Euler a", "euler_a"),
            ("ddim", "ddim"),
            ("DDIM", "ddim"),
            ("dpmsolver++", "dpmpp_2m"),
            ("DPM++ 2M", "dpmpp_2m"),
            ("dpmpp_2m_karras", "dpmpp_2m_karras"),
            ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ] {
            assert_eq!(sampler_to_scheduler(name), Some(want), "{name}");
        }
        for name in ["pndm", "lms", "heun", "dpm_2", "dpmsolver", ""] {
            assert_eq!(sampler_to_scheduler(name), None, "{name}");
        }
        // Every graft name builds a scheduler.
        for s in SAMPLERS {
            graft_sdxl::schedulers::build_scheduler(s, &graft_sdxl::schedulers::SchedulerConfig::sdxl_base(), 4).unwrap();
        }
    }

    #[test]
    fn errors_name_the_file_line_and_what_to_do() {
        let err = |text: &str| format!("{:#}", parse_prompts(text, "prompts.txt", &defaults()).unwrap_err());
        let e = err("ok\n# c\na cat --ss heun");
        assert!(e.contains("prompts.txt:3") && e.contains("`heun`") && e.contains("dpmpp_2m_karras"), "{e}");
        let e = err("a cat --w 100");
        assert!(e.contains("prompts.txt:1") && e.contains("multiple of 8"), "{e}");
        let e = err("a cat --w wide");
        assert!(e.contains("whole number"), "{e}");
        let e = err("a cat --q 3");
        assert!(e.contains("unknown option `--q`"), "{e}");
        let e = err("a cat --n");
        assert!(e.contains("`--n` has no value"), "{e}");
        let e = err("a cat --l much");
        assert!(e.contains("guidance"), "{e}");
        let e = err("a cat --s 0");
        assert!(e.contains("at least one step"), "{e}");
        // The kind: a sample prompt problem, at a line of the file.
        let e = parse_prompts("a cat --q 3", "prompts.txt", &defaults()).unwrap_err();
        assert!(
            matches!(&e, crate::error::Error::At { what, cause } if what.starts_with("prompts.txt:1") && matches!(**cause, crate::error::Error::Sample(_))),
            "{e:?}"
        );
    }

    #[test]
    fn prompt_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let e = format!("{:#}", parse_prompt_file(&missing, &defaults()).unwrap_err());
        assert!(e.contains("nope.txt") && e.contains("cannot read"), "{e}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "# nothing\n\n").unwrap();
        let e = format!("{:#}", parse_prompt_file(&empty, &defaults()).unwrap_err());
        assert!(e.contains("no prompt"), "{e}");
        let ok = dir.path().join("ok.txt");
        std::fs::write(&ok, "a\r\nb --d 5\r\n").unwrap();
        let p = parse_prompt_file(&ok, &defaults()).unwrap();
        assert_eq!((p[0].prompt.as_str(), p[1].prompt.as_str(), p[1].seed), ("a", "b", 5));
    }

    #[test]
    fn file_names_follow_kohya() {
        assert_eq!(sample_file_name("graft_e000001_s000010", 3, 42), "graft_e000001_s000010_03_42.png");
        assert_eq!(sample_file_name("step000010", 12, 0), "step000010_12_0.png");
    }

    #[test]
    fn grid_lays_out_and_centres() {
        let red = RgbImage::from_pixel(6, 4, image::Rgb([255, 0, 0]));
        let green = RgbImage::from_pixel(2, 2, image::Rgb([0, 255, 0]));
        let blue = RgbImage::from_pixel(6, 4, image::Rgb([0, 0, 255]));
        let g = grid_image(&[red, green, blue], 2).unwrap();
        // 2 columns x 2 rows of 6x4 cells, gaps of 4.
        assert_eq!((g.width(), g.height()), (2 * 10 + 4, 2 * 8 + 4));
        assert_eq!(g.get_pixel(4, 4).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(14 + 2, 4 + 1).0, [0, 255, 0], "centred in its cell");
        assert_eq!(g.get_pixel(14, 4).0, GRID_BACKGROUND);
        assert_eq!(g.get_pixel(4, 12).0, [0, 0, 255]);
        assert_eq!(g.get_pixel(14, 12).0, GRID_BACKGROUND, "empty last cell");
        assert!(grid_image(&[], 2).is_err());
        // 0 columns: near-square.
        let five: Vec<RgbImage> = (0..5).map(|_| RgbImage::new(2, 2)).collect();
        assert_eq!(grid_image(&five, 0).unwrap().width(), 3 * 6 + 4);
    }

    #[test]
    fn grid_files_keep_the_first_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.png");
        let b = dir.path().join("b.png");
        write_rgb_png(&a, &RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])), Some("a fox\nSteps: 2")).unwrap();
        write_rgb_png(&b, &RgbImage::from_pixel(8, 8, image::Rgb([4, 5, 6])), None).unwrap();
        let out = dir.path().join("sub/grid.png");
        grid_files(&[a, b], 2, &out).unwrap();
        let g = image::open(&out).unwrap().to_rgb8();
        assert_eq!((g.width(), g.height()), (2 * 12 + 4, 16));
        assert_eq!(g.get_pixel(4, 4).0, [1, 2, 3]);
        assert_eq!(png_out::read_parameters(&out).unwrap().as_deref(), Some("a fox\nSteps: 2"));
        let e = format!("{:#}", grid_files(&[dir.path().join("x.png")], 1, &out).unwrap_err());
        assert!(e.contains("x.png"), "{e}");
    }
}
