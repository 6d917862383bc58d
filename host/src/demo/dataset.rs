//! The demo dataset: line-art shapes in a pastel palette, each with a caption that describes it.
//!
//! Image `i` is a function of `i` and the size only (no RNG state, no trigonometry: the shapes'
//! vertices are constants), so the same call writes the same bytes every time. Shapes cycle
//! through [`SHAPES`]; colour, background, size, fill and position come from a hash of `i`.
//! Each pixel is the average of 4x4 sub-samples, which smooths the outlines.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::{Rgb, RgbImage};

/// A shape: its name in captions and its outline as a polygon in unit coordinates (y down;
/// `None`: a circle of radius 1).
struct Shape {
    name: &'static str,
    polygon: Option<&'static [(f64, f64)]>,
}

const TRIANGLE: &[(f64, f64)] = &[(0.0, -1.0), (0.866_025_403_784_438_6, 0.6), (-0.866_025_403_784_438_6, 0.6)];
const SQUARE: &[(f64, f64)] = &[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)];
const DIAMOND: &[(f64, f64)] = &[(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)];
const HEXAGON: &[(f64, f64)] = &[
    (1.0, 0.0),
    (0.5, 0.866_025_403_784_438_6),
    (-0.5, 0.866_025_403_784_438_6),
    (-1.0, 0.0),
    (-0.5, -0.866_025_403_784_438_6),
    (0.5, -0.866_025_403_784_438_6),
];
/// Five points at radius 1, five notches at radius 0.45 (cos / sin of 18 and 54 degrees).
const STAR: &[(f64, f64)] = &[
    (0.0, -1.0),
    (0.264_503_363_531_612_9, -0.364_057_647_468_726_4),
    (0.951_056_516_295_153_5, -0.309_016_994_374_947_4),
    (0.427_975_432_332_819_1, 0.139_057_647_468_726_3),
    (0.587_785_252_292_473_1, 0.809_016_994_374_947_5),
    (0.0, 0.45),
    (-0.587_785_252_292_473_1, 0.809_016_994_374_947_5),
    (-0.427_975_432_332_819_1, 0.139_057_647_468_726_3),
    (-0.951_056_516_295_153_5, -0.309_016_994_374_947_4),
    (-0.264_503_363_531_612_9, -0.364_057_647_468_726_4),
];

const SHAPES: [Shape; 6] = [
    Shape { name: "circle", polygon: None },
    Shape { name: "square", polygon: Some(SQUARE) },
    Shape { name: "triangle", polygon: Some(TRIANGLE) },
    Shape { name: "star", polygon: Some(STAR) },
    Shape { name: "diamond", polygon: Some(DIAMOND) },
    Shape { name: "hexagon", polygon: Some(HEXAGON) },
];

/// Pastel colours: name, fill, and the darker line colour of the same hue.
const COLORS: [(&str, [u8; 3], [u8; 3]); 6] = [
    ("pink", [246, 178, 201], [176, 74, 112]),
    ("peach", [250, 200, 160], [178, 100, 52]),
    ("yellow", [246, 226, 146], [150, 122, 30]),
    ("mint green", [170, 226, 190], [52, 128, 84]),
    ("sky blue", [168, 206, 242], [52, 98, 160]),
    ("lavender", [206, 186, 236], [104, 76, 160]),
];

const BACKGROUNDS: [(&str, [u8; 3]); 3] = [("cream", [251, 246, 236]), ("pale blue", [236, 244, 251]), ("pale pink", [252, 240, 243])];

/// The shape names, for prompts and docs.
pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

/// What image `i` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub shape: &'static str,
    pub color: &'static str,
    pub background: &'static str,
    pub large: bool,
    pub filled: bool,
    /// -1 left, 0 centre, 1 right.
    pub position: i32,
}

impl Description {
    /// The caption: `a large pink star outline on the left, line art, pastel colors, cream background`.
    pub fn caption(&self) -> String {
        let size = if self.large { "large" } else { "small" };
        let kind = if self.filled { "filled with pastel color" } else { "outline" };
        let place = match self.position {
            -1 => " on the left",
            1 => " on the right",
            _ => "",
        };
        format!("a {size} {} {} {kind}{place}, line art, pastel colors, {} background", self.color, self.shape, self.background)
    }
}

/// SplitMix64: a fixed, well-mixed hash of the image index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn choice(i: usize) -> (usize, usize, usize, bool, bool, i32) {
    let h = mix(i as u64 ^ 0x6772_6166_7464_656d);
    let color = (h % COLORS.len() as u64) as usize;
    let background = ((h >> 8) % BACKGROUNDS.len() as u64) as usize;
    let large = (h >> 16) & 1 == 0;
    let filled = (h >> 17) & 1 == 0;
    // Small shapes move left or right; large ones stay centred (they fill the frame).
    let position = if large { 0 } else { ((h >> 18) % 3) as i32 - 1 };
    (i % SHAPES.len(), color, background, large, filled, position)
}

/// What image `i` of the dataset shows.
pub fn describe(i: usize) -> Description {
    let (shape, color, background, large, filled, position) = choice(i);
    Description { shape: SHAPES[shape].name, color: COLORS[color].0, background: BACKGROUNDS[background].0, large, filled, position }
}

/// Signed distance from `p` to a polygon (negative inside), in the polygon's units.
fn polygon_distance(poly: &[(f64, f64)], p: (f64, f64)) -> f64 {
    let mut best = f64::INFINITY;
    let mut inside = false;
    for k in 0..poly.len() {
        let a = poly[k];
        let b = poly[(k + 1) % poly.len()];
        let (ex, ey) = (b.0 - a.0, b.1 - a.1);
        let (px, py) = (p.0 - a.0, p.1 - a.1);
        let t = ((px * ex + py * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
        let (dx, dy) = (px - ex * t, py - ey * t);
        best = best.min(dx * dx + dy * dy);
        // Even-odd rule: does a ray to the right from p cross this edge?
        if (a.1 > p.1) != (b.1 > p.1) && p.0 < a.0 + (p.1 - a.1) * ex / ey {
            inside = !inside;
        }
    }
    let d = best.sqrt();
    if inside {
        -d
    } else {
        d
    }
}

/// Image `i` of the dataset at `size` x `size` pixels, and its caption.
pub fn render(i: usize, size: u32) -> (RgbImage, String) {
    let (shape, color, background, large, filled, position) = choice(i);
    let (_, fill, line) = COLORS[color];
    let paper = BACKGROUNDS[background].1;
    let s = size as f64;
    let radius = s * if large { 0.36 } else { 0.22 };
    let center = (s / 2.0 + position as f64 * s * 0.22, s / 2.0);
    let half_line = (s / 48.0).max(0.75);
    let polygon = SHAPES[shape].polygon;
    // The colour at one point of the image.
    let at = |x: f64, y: f64| -> [u8; 3] {
        let p = ((x - center.0) / radius, (y - center.1) / radius);
        let d = match polygon {
            Some(poly) => polygon_distance(poly, p),
            None => (p.0 * p.0 + p.1 * p.1).sqrt() - 1.0,
        } * radius;
        if d.abs() <= half_line {
            line
        } else if d < 0.0 && filled {
            fill
        } else {
            paper
        }
    };
    const N: u32 = 4;
    let img = RgbImage::from_fn(size, size, |x, y| {
        let mut sum = [0u32; 3];
        for sy in 0..N {
            for sx in 0..N {
                let c = at(x as f64 + (sx as f64 + 0.5) / N as f64, y as f64 + (sy as f64 + 0.5) / N as f64);
                for k in 0..3 {
                    sum[k] += c[k] as u32;
                }
            }
        }
        let n = N * N;
        Rgb([((sum[0] + n / 2) / n) as u8, ((sum[1] + n / 2) / n) as u8, ((sum[2] + n / 2) / n) as u8])
    });
    (img, describe(i).caption())
}

/// Writes images `000.png`, `001.png`, ... and their captions `000.txt`, ... (`n` of each) into
/// `dir` (created if needed); returns the image paths. The same arguments write the same bytes.
pub fn write_dataset(dir: &Path, n: usize, size: u32) -> anyhow::Result<Vec<PathBuf>> {
    if size < 8 {
        anyhow::bail!("demo dataset: images of {size} pixels are too small (at least 8)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the dataset folder {}", dir.display()))?;
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        let (img, caption) = render(i, size);
        let path = dir.join(format!("{i:03}.png"));
        img.save_with_format(&path, image::ImageFormat::Png).with_context(|| format!("cannot write {}", path.display()))?;
        let txt = dir.join(format!("{i:03}.txt"));
        std::fs::write(&txt, &caption).with_context(|| format!("cannot write {}", txt.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_index_same_pixels_and_caption() {
        for i in 0..12 {
            assert_eq!(render(i, 32), render(i, 32), "image {i}");
        }
        // Different images differ.
        assert_ne!(render(0, 32).0, render(1, 32).0);
    }

    #[test]
    fn captions_describe_the_image() {
        let d = describe(3);
        assert_eq!(d.shape, "star");
        let c = d.caption();
        assert!(c.contains("star") && c.contains(d.color) && c.contains("line art") && c.contains(d.background), "{c}");
        // Every shape, and more than one colour, appear in the first dozen.
        let first: Vec<Description> = (0..12).map(describe).collect();
        for s in shape_names() {
            assert!(first.iter().any(|d| d.shape == s), "{s}");
        }
        assert!(first.iter().any(|d| d.color != first[0].color));
    }

    #[test]
    fn pixels_are_palette_colours() {
        let (img, _) = render(1, 64);
        let d = describe(1);
        let paper = BACKGROUNDS.iter().find(|b| b.0 == d.background).unwrap().1;
        let line = COLORS.iter().find(|c| c.0 == d.color).unwrap().2;
        // Corner: paper. Somewhere: the line colour exactly (a sub-sampled stroke centre).
        assert_eq!(img.get_pixel(0, 0).0, paper);
        assert!(img.pixels().any(|p| p.0 == line), "no pixel of the line colour");
    }

    #[test]
    fn polygon_distance_signs() {
        assert!(polygon_distance(SQUARE, (0.0, 0.0)) < 0.0);
        assert!((polygon_distance(SQUARE, (0.0, 0.0)) + 0.8).abs() < 1e-12);
        assert!((polygon_distance(SQUARE, (1.0, 0.0)) - 0.2).abs() < 1e-12);
        assert!(polygon_distance(STAR, (0.0, 0.0)) < 0.0);
        // Between two points of the star: outside.
        assert!(polygon_distance(STAR, (0.0, 0.6)) > 0.0);
    }
}
