//! The generated datasets of simple drawings, each image with a caption that describes it
//! (`a red circle on the left`):
//!
//! - [`Look::Plain`]: filled shapes in saturated colours at five positions, every combination of
//!   3 shapes, 4 colours and 5 positions in turn: what the demo model's UNet was trained to draw
//!   (`graft demo-model`).
//! - [`Look::Styled`]: the demo's style, which the strategies learn: pastel fill, thick dark
//!   outline, large and centred.
//! - [`Look::Varied`]: every way of drawing mixed, what the demo model's VAE learns.
//!
//! Image `i` is a function of `i`, the look and the size only (no RNG state, no trigonometry: the
//! shapes' vertices are constants), so the same call writes the same bytes every time. Each pixel
//! is the average of 4x4 sub-samples, which smooths the edges.

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
const SHAPES: [Shape; 3] = [
    Shape { name: "circle", polygon: None },
    Shape { name: "square", polygon: Some(SQUARE) },
    Shape { name: "triangle", polygon: Some(TRIANGLE) },
];

/// Colours by name: the plain drawings' saturated colour and the style's pastel one.
const COLORS: [(&str, [u8; 3], [u8; 3]); 4] = [
    ("red", [214, 40, 40], [244, 176, 176]),
    ("green", [34, 150, 60], [172, 224, 182]),
    ("blue", [36, 84, 208], [170, 198, 242]),
    ("yellow", [238, 190, 16], [246, 228, 150]),
];

/// The style's outline: thick and dark.
const OUTLINE: [u8; 3] = [44, 38, 52];
const PAPER: [u8; 3] = [255, 255, 255];

/// Where a shape is drawn, and the words that say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Center,
}

pub const POSITIONS: [Position; 5] = [Position::Left, Position::Right, Position::Top, Position::Bottom, Position::Center];

impl Position {
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Center => "in the center",
        }
    }

    /// The centre of a shape drawn here, as a fraction of the image (x, y; y down).
    pub fn anchor(self) -> (f64, f64) {
        match self {
            Position::Left => (0.27, 0.5),
            Position::Right => (0.73, 0.5),
            Position::Top => (0.5, 0.27),
            Position::Bottom => (0.5, 0.73),
            Position::Center => (0.5, 0.5),
        }
    }
}

/// How a dataset draws: the base model's plain drawings, or the demo's style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Filled shapes in saturated colours, no outline, at any of the five positions.
    Plain,
    /// The style the demo's strategies learn: pastel fill, thick dark outline, large and centred.
    Styled,
    /// Every way of drawing at once, each image its own: saturated or pastel fill, no outline or
    /// a thin or thick dark one, small or large, at any position. The demo model's VAE learns
    /// this, so that it encodes any drawing as SDXL's VAE encodes any photo; its UNet learns
    /// only [`Look::Plain`], so the style is new to it.
    Varied,
}

/// The shape names, for prompts and docs.
pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

/// The colour names, with their saturated RGB values.
pub fn plain_colors() -> Vec<(&'static str, [u8; 3])> {
    COLORS.iter().map(|c| (c.0, c.1)).collect()
}

/// What an image shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub shape: &'static str,
    pub color: &'static str,
    pub position: Position,
    pub look: Look,
}

impl Description {
    /// The caption, e.g. `a red circle on the left` (both looks use the same words: the style
    /// is what the demo's strategies learn without being told).
    pub fn caption(&self) -> String {
        format!("a {} {} {}", self.color, self.shape, self.position.phrase())
    }
}

/// SplitMix64: a fixed, well-mixed hash of the image index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Indices of shape, colour and position of image `i`: the plain dataset walks through every
/// combination in order (60 of them), the styled one picks shape and colour by a hash, the varied
/// one all three.
fn choice(i: usize, look: Look) -> (usize, usize, Position) {
    match look {
        Look::Varied => {
            let h = mix(i as u64 ^ 0x7661_7269_6564);
            (i % SHAPES.len(), (h % COLORS.len() as u64) as usize, POSITIONS[(h >> 8) as usize % POSITIONS.len()])
        }
        Look::Plain => {
            let combo = i % (SHAPES.len() * COLORS.len() * POSITIONS.len());
            (combo % SHAPES.len(), combo / SHAPES.len() % COLORS.len(), POSITIONS[combo / (SHAPES.len() * COLORS.len())])
        }
        Look::Styled => {
            let h = mix(i as u64 ^ 0x6772_6166_7464_656d);
            // Shapes in turn, shifted by one every three images, so that any three images in a row
            // and every third image (the report's examples) show each shape.
            ((i + i / SHAPES.len()) % SHAPES.len(), (h % COLORS.len() as u64) as usize, Position::Center)
        }
    }
}

/// What image `i` of a dataset shows.
pub fn describe(i: usize, look: Look) -> Description {
    let (shape, color, position) = choice(i, look);
    Description { shape: SHAPES[shape].name, color: COLORS[color].0, position, look }
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

/// A small jitter in [-1, 1] from bits of `h`, so repeated combinations differ a little.
fn jitter(h: u64, shift: u32) -> f64 {
    ((h >> shift) & 0xff) as f64 / 127.5 - 1.0
}

/// Image `i` of a dataset at `size` x `size` pixels, and its caption.
pub fn render(i: usize, size: u32, look: Look) -> (RgbImage, String) {
    let (shape, color, position) = choice(i, look);
    let (_, saturated, pastel) = COLORS[color];
    let s = size as f64;
    let h = mix(i as u64 ^ 0x7368_6170_6573);
    let (ax, ay) = position.anchor();
    let (radius, center, fill, line, half_line) = match look {
        Look::Plain => {
            let center = ((ax + 0.03 * jitter(h, 0)) * s, (ay + 0.03 * jitter(h, 8)) * s);
            (s * (0.17 + 0.02 * jitter(h, 16)), center, saturated, saturated, 0.0)
        }
        Look::Styled => ((s * 0.32), (ax * s, ay * s), pastel, OUTLINE, s / 28.0),
        Look::Varied => {
            let center = ((ax + 0.05 * jitter(h, 0)) * s, (ay + 0.05 * jitter(h, 8)) * s);
            let radius = s * (0.245 + 0.08 * jitter(h, 16));
            let fill = if h >> 24 & 1 == 0 { saturated } else { pastel };
            let half_line = [0.0, s / 64.0, s / 28.0][(h >> 25) as usize % 3];
            (radius, center, fill, if half_line == 0.0 { fill } else { OUTLINE }, half_line)
        }
    };
    let polygon = SHAPES[shape].polygon;
    // The colour at one point of the image: the outline band straddles the shape's edge.
    let at = |x: f64, y: f64| -> [u8; 3] {
        let p = ((x - center.0) / radius, (y - center.1) / radius);
        let d = match polygon {
            Some(poly) => polygon_distance(poly, p),
            None => (p.0 * p.0 + p.1 * p.1).sqrt() - 1.0,
        } * radius;
        if d.abs() <= half_line {
            line
        } else if d < 0.0 {
            fill
        } else {
            PAPER
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
    (img, describe(i, look).caption())
}

/// Writes images `000.png`, `001.png`, ... and their captions `000.txt`, ... (`n` of each) into
/// `dir` (created if needed); returns the image paths. The same arguments write the same bytes.
pub fn write_dataset(dir: &Path, n: usize, size: u32) -> anyhow::Result<Vec<PathBuf>> {
    write_looks(dir, n, size, Look::Styled)
}

/// [`write_dataset`] in either look.
pub fn write_looks(dir: &Path, n: usize, size: u32, look: Look) -> anyhow::Result<Vec<PathBuf>> {
    if size < 8 {
        anyhow::bail!("demo dataset: images of {size} pixels are too small (at least 8)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the dataset folder {}", dir.display()))?;
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        let (img, caption) = render(i, size, look);
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
        for look in [Look::Plain, Look::Styled] {
            for i in 0..12 {
                assert_eq!(render(i, 32, look), render(i, 32, look), "image {i}");
            }
            assert_ne!(render(0, 32, look).0, render(1, 32, look).0);
        }
    }

    #[test]
    fn the_plain_dataset_walks_every_combination() {
        let all: Vec<Description> = (0..60).map(|i| describe(i, Look::Plain)).collect();
        for (k, a) in all.iter().enumerate() {
            assert!(all[k + 1..].iter().all(|b| b != a), "{a:?} twice");
        }
        assert_eq!(describe(0, Look::Plain).caption(), "a red circle on the left");
        assert_eq!(describe(61, Look::Plain).caption(), describe(1, Look::Plain).caption());
        // The styled dataset is always centred.
        assert!((0..12).all(|i| describe(i, Look::Styled).position == Position::Center));
    }

    /// The centre of the non-white pixels, as a fraction of the size.
    fn ink_center(img: &RgbImage) -> (f64, f64) {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (x, y, p) in img.enumerate_pixels() {
            if p.0 != PAPER {
                sx += x as f64;
                sy += y as f64;
                n += 1.0;
            }
        }
        (sx / n / img.width() as f64, sy / n / img.height() as f64)
    }

    #[test]
    fn pixels_are_where_and_what_the_caption_says() {
        for i in 0..60 {
            let (img, _) = render(i, 64, Look::Plain);
            let d = describe(i, Look::Plain);
            let (cx, cy) = ink_center(&img);
            let (ax, ay) = d.position.anchor();
            assert!((cx - ax).abs() < 0.06 && (cy - ay).abs() < 0.08, "{d:?}: ink at ({cx:.2}, {cy:.2})");
            let rgb = COLORS.iter().find(|c| c.0 == d.color).unwrap().1;
            assert!(img.pixels().any(|p| p.0 == rgb), "{d:?}: no pixel of its colour");
        }
        let (img, _) = render(1, 64, Look::Styled);
        let d = describe(1, Look::Styled);
        assert_eq!(img.get_pixel(0, 0).0, PAPER);
        assert!(img.pixels().any(|p| p.0 == OUTLINE), "no outline pixel");
        let pastel = COLORS.iter().find(|c| c.0 == d.color).unwrap().2;
        assert_eq!(img.get_pixel(32, 34).0, pastel, "{d:?}");
    }

    /// The varied drawings hold every way of drawing: both fills, no outline and an outline,
    /// every position, both the plain and the styled sizes.
    #[test]
    fn the_varied_look_mixes_fills_outlines_positions_and_sizes() {
        let (mut outlined, mut bare, mut pastel, mut saturated) = (0, 0, 0, 0);
        let mut positions = Vec::new();
        for i in 0..60 {
            let (img, _) = render(i, 64, Look::Varied);
            let d = describe(i, Look::Varied);
            let (_, sat, pas) = *COLORS.iter().find(|c| c.0 == d.color).unwrap();
            if img.pixels().any(|p| p.0 == OUTLINE) {
                outlined += 1;
            } else {
                bare += 1;
            }
            saturated += img.pixels().any(|p| p.0 == sat) as usize;
            pastel += img.pixels().any(|p| p.0 == pas) as usize;
            if !positions.contains(&d.position) {
                positions.push(d.position);
            }
        }
        assert!(outlined >= 20 && bare >= 10, "{outlined} outlined, {bare} without");
        assert!(saturated >= 20 && pastel >= 20, "{saturated} saturated, {pastel} pastel");
        assert_eq!(positions.len(), POSITIONS.len());
    }

    #[test]
    fn polygon_distance_signs() {
        assert!(polygon_distance(SQUARE, (0.0, 0.0)) < 0.0);
        assert!((polygon_distance(SQUARE, (0.0, 0.0)) + 0.8).abs() < 1e-12);
        assert!((polygon_distance(SQUARE, (1.0, 0.0)) - 0.2).abs() < 1e-12);
        assert!(polygon_distance(TRIANGLE, (0.0, 0.0)) < 0.0);
        assert!(polygon_distance(TRIANGLE, (0.9, -0.9)) > 0.0);
    }
}
