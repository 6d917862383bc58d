//! The style score of `graft compare`: how far a set of images (a strategy's samples) is from the
//! training images in palette, line features and composition, measured on the pixels alone (no
//! pretrained network). Lower is closer; each part is in [0, 1], and so is the total, their mean.
//! docs/STYLE_SCORE.md says what each part measures and where it fails.
//!
//! Every image is first brought to [`ANALYSIS_SIZE`] on its longer side (nearest neighbour up,
//! so hard edges stay hard; area averages down), so samples and training images of
//! different sizes are measured on the same scale: widths and densities are relative to the frame.
//!
//! - Background: the per-channel median of the image's border. Ink: pixels more than
//!   [`INK_THRESHOLD`] away from it in some channel.
//! - **palette**: half the total variation distance between the two sets' colour histograms of
//!   their background pixels, half that of their ink pixels (8 levels per channel, each pixel
//!   shared between its nearest bin centres, so a small colour shift moves little mass).
//! - **edge_density**: the fraction of pixels whose Sobel gradient of luminance exceeds
//!   [`EDGE_THRESHOLD`]; the part is the relative difference `|s − r| / max(s, r)`.
//! - **stroke_width**: of the line pixels (luminance at least [`LINE_CONTRAST`] away from the
//!   background's), twice the mean distance-transform value on the ridges, minus one: the width of
//!   a band in pixels; relative difference as above.
//! - **composition**: the centre of mass of each image's ink, in image-relative coordinates;
//!   the part is twice the distance between the sets' mean centres plus the difference of their
//!   spreads (RMS distance from the mean), capped at 1: half a frame apart scores 1.
//!
//! A set's statistics are means over its images, each image counting once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The longer side of every image as measured.
pub const ANALYSIS_SIZE: u32 = 256;
/// A pixel is ink when some channel differs from the background's by more than this (of 255).
pub const INK_THRESHOLD: i32 = 40;
/// A pixel is on an edge when the Sobel magnitude of its luminance (0..1) exceeds this: a step of
/// about 1/8 of the luminance range.
pub const EDGE_THRESHOLD: f32 = 0.5;
/// A pixel belongs to a line when its luminance (0..1) is at least this far from the
/// background's (darker or lighter): pastel fills are not lines, their outlines are.
pub const LINE_CONTRAST: f32 = 0.3;
/// Palette levels per channel (LEVELS³ bins).
const LEVELS: usize = 8;
const BINS: usize = LEVELS * LEVELS * LEVELS;

/// How far a set of images is from the reference set; every part in [0, 1], lower is closer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StyleScore {
    pub palette: f64,
    pub edge_density: f64,
    pub stroke_width: f64,
    pub composition: f64,
    /// The mean of the four parts.
    pub total: f64,
}

impl StyleScore {
    /// The parts by name, in report order (total last).
    pub fn parts(&self) -> [(&'static str, f64); 5] {
        [
            ("palette", self.palette),
            ("edge_density", self.edge_density),
            ("stroke_width", self.stroke_width),
            ("composition", self.composition),
            ("total", self.total),
        ]
    }
}

/// What one image contributes to its set.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageStats {
    /// Normalised colour histograms of the background and ink pixels (`None`: no such pixel).
    background: Option<Vec<f64>>,
    ink: Option<Vec<f64>>,
    edge_density: f64,
    /// `None`: no line pixel.
    stroke_width: Option<f64>,
    /// Centre of mass of the ink, (x, y) in [0, 1]; `None`: no ink.
    centre: Option<(f64, f64)>,
}

/// The statistics of a set of images (means over the images that have each quantity).
#[derive(Debug, Clone, PartialEq)]
pub struct SetStats {
    pub images: usize,
    background: Option<Vec<f64>>,
    ink: Option<Vec<f64>>,
    pub edge_density: f64,
    pub stroke_width: Option<f64>,
    pub centre: Option<(f64, f64)>,
    /// RMS distance of the images' centres from `centre`.
    pub spread: Option<f64>,
}

/// A set's numbers for the report and summary.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetSummary {
    pub images: usize,
    pub edge_density: f64,
    pub stroke_width: Option<f64>,
    pub centre: Option<(f64, f64)>,
    pub spread: Option<f64>,
}

/// `img` scaled so that its longer side is [`ANALYSIS_SIZE`].
fn analysis_image(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let long = w.max(h).max(1);
    if long == ANALYSIS_SIZE {
        return img.clone();
    }
    let scale = |v: u32| ((v as u64 * ANALYSIS_SIZE as u64 + long as u64 / 2) / long as u64).max(1) as u32;
    // Upscaling by nearest neighbour keeps a step a step; downscaling averages areas.
    if long < ANALYSIS_SIZE {
        image::imageops::resize(img, scale(w), scale(h), FilterType::Nearest)
    } else {
        image::imageops::thumbnail(img, scale(w), scale(h))
    }
}

fn luminance(p: [u8; 3]) -> f32 {
    (0.2126 * p[0] as f32 + 0.7152 * p[1] as f32 + 0.0722 * p[2] as f32) / 255.0
}

/// The per-channel median of the outermost ring of pixels.
fn border_median(img: &RgbImage) -> [u8; 3] {
    let (w, h) = img.dimensions();
    let mut channels: [Vec<u8>; 3] = Default::default();
    for (x, y, p) in img.enumerate_pixels() {
        if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
            channels.iter_mut().zip(p.0).for_each(|(ch, v)| ch.push(v));
        }
    }
    channels.map(|mut ch| {
        ch.sort_unstable();
        ch.get(ch.len() / 2).copied().unwrap_or(255)
    })
}

/// Adds `p` to `hist`, shared between the (up to) 8 nearest bin centres.
fn splat(hist: &mut [f64], p: [u8; 3]) {
    let step = 256.0 / LEVELS as f64;
    let mut lo = [0usize; 3];
    let mut frac = [0f64; 3];
    for c in 0..3 {
        let pos = (p[c] as f64 / step - 0.5).clamp(0.0, (LEVELS - 1) as f64);
        lo[c] = (pos.floor() as usize).min(LEVELS - 2);
        frac[c] = pos - lo[c] as f64;
    }
    for corner in 0..8 {
        let mut index = 0;
        let mut weight = 1.0;
        for c in 0..3 {
            let up = (corner >> c) & 1;
            index = index * LEVELS + lo[c] + up;
            weight *= if up == 1 { frac[c] } else { 1.0 - frac[c] };
        }
        hist[index] += weight;
    }
}

fn normalised(mut hist: Vec<f64>) -> Option<Vec<f64>> {
    let sum: f64 = hist.iter().sum();
    if sum <= 0.0 {
        return None;
    }
    hist.iter_mut().for_each(|v| *v /= sum);
    Some(hist)
}

/// The fraction of interior pixels whose Sobel gradient magnitude exceeds [`EDGE_THRESHOLD`].
fn edge_density(lum: &[f32], w: usize, h: usize) -> f64 {
    if w < 3 || h < 3 {
        return 0.0;
    }
    let at = |x: usize, y: usize| lum[y * w + x];
    let mut edges = 0usize;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let gx = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x - 1, y) - at(x - 1, y + 1);
            let gy = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x, y - 1) - at(x + 1, y - 1);
            if gx * gx + gy * gy > EDGE_THRESHOLD * EDGE_THRESHOLD {
                edges += 1;
            }
        }
    }
    edges as f64 / ((w - 2) * (h - 2)) as f64
}

/// The width of the strokes of `mask` (w x h), in pixels: a two-pass chamfer distance transform
/// (distance of each mask pixel to the nearest pixel outside, 1 next to it; outside the image
/// counts as outside the mask), then `2 × mean(ridge) − 1` over its ridge pixels (at least
/// every neighbour's value): a band of odd width w has ridge value (w + 1) / 2.
pub fn stroke_width(mask: &[bool], w: usize, h: usize) -> Option<f64> {
    if !mask.iter().any(|&m| m) {
        return None;
    }
    const DIAG: f32 = std::f32::consts::SQRT_2;
    let mut d: Vec<f32> = mask.iter().map(|&m| if m { f32::INFINITY } else { 0.0 }).collect();
    let get =
        |d: &[f32], x: isize, y: isize| if x < 0 || y < 0 || x >= w as isize || y >= h as isize { 0.0 } else { d[y as usize * w + x as usize] };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            if d[i] > 0.0 {
                let best =
                    (get(&d, x - 1, y) + 1.0).min(get(&d, x, y - 1) + 1.0).min(get(&d, x - 1, y - 1) + DIAG).min(get(&d, x + 1, y - 1) + DIAG);
                d[i] = d[i].min(best);
            }
        }
    }
    for y in (0..h as isize).rev() {
        for x in (0..w as isize).rev() {
            let i = y as usize * w + x as usize;
            if d[i] > 0.0 {
                let best =
                    (get(&d, x + 1, y) + 1.0).min(get(&d, x, y + 1) + 1.0).min(get(&d, x + 1, y + 1) + DIAG).min(get(&d, x - 1, y + 1) + DIAG);
                d[i] = d[i].min(best);
            }
        }
    }
    let (mut sum, mut n) = (0.0f64, 0usize);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let v = d[y as usize * w + x as usize];
            if v <= 0.0 {
                continue;
            }
            let ridge = (-1..=1).all(|dy| (-1..=1).all(|dx| get(&d, x + dx, y + dy) <= v));
            if ridge {
                sum += v as f64;
                n += 1;
            }
        }
    }
    Some(2.0 * sum / n as f64 - 1.0)
}

/// The statistics of one image (of any size).
pub fn image_stats(img: &RgbImage) -> ImageStats {
    let img = analysis_image(img);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let bg = border_median(&img);
    let bg_lum = luminance(bg);
    let mut background = vec![0.0; BINS];
    let mut ink = vec![0.0; BINS];
    let mut lum = Vec::with_capacity(w * h);
    let mut line = Vec::with_capacity(w * h);
    let (mut sx, mut sy, mut n_ink) = (0.0f64, 0.0f64, 0usize);
    for (x, y, p) in img.enumerate_pixels() {
        let l = luminance(p.0);
        lum.push(l);
        line.push((l - bg_lum).abs() >= LINE_CONTRAST);
        let far = (0..3).any(|c| (p.0[c] as i32 - bg[c] as i32).abs() > INK_THRESHOLD);
        if far {
            splat(&mut ink, p.0);
            sx += (x as f64 + 0.5) / w as f64;
            sy += (y as f64 + 0.5) / h as f64;
            n_ink += 1;
        } else {
            splat(&mut background, p.0);
        }
    }
    ImageStats {
        background: normalised(background),
        ink: normalised(ink),
        edge_density: edge_density(&lum, w, h),
        stroke_width: stroke_width(&line, w, h),
        centre: (n_ink > 0).then(|| (sx / n_ink as f64, sy / n_ink as f64)),
    }
}

/// The mean of the histograms that are there.
fn mean_hist<'a>(hists: impl Iterator<Item = &'a Option<Vec<f64>>>) -> Option<Vec<f64>> {
    let mut sum = vec![0.0; BINS];
    let mut n = 0;
    for h in hists.flatten() {
        sum.iter_mut().zip(h).for_each(|(s, v)| *s += v);
        n += 1;
    }
    (n > 0).then(|| sum.into_iter().map(|v| v / n as f64).collect())
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl SetStats {
    /// The statistics of a set from its images' (`None` for an empty set).
    pub fn of(images: &[ImageStats]) -> Option<SetStats> {
        if images.is_empty() {
            return None;
        }
        let widths: Vec<f64> = images.iter().filter_map(|i| i.stroke_width).collect();
        let centres: Vec<(f64, f64)> = images.iter().filter_map(|i| i.centre).collect();
        let centre = (!centres.is_empty()).then(|| {
            let n = centres.len() as f64;
            (centres.iter().map(|c| c.0).sum::<f64>() / n, centres.iter().map(|c| c.1).sum::<f64>() / n)
        });
        let spread =
            centre.map(|(mx, my)| (centres.iter().map(|(x, y)| (x - mx).powi(2) + (y - my).powi(2)).sum::<f64>() / centres.len() as f64).sqrt());
        Some(SetStats {
            images: images.len(),
            background: mean_hist(images.iter().map(|i| &i.background)),
            ink: mean_hist(images.iter().map(|i| &i.ink)),
            edge_density: images.iter().map(|i| i.edge_density).sum::<f64>() / images.len() as f64,
            stroke_width: mean(&widths),
            centre,
            spread,
        })
    }

    pub fn summary(&self) -> SetSummary {
        SetSummary {
            images: self.images,
            edge_density: self.edge_density,
            stroke_width: self.stroke_width,
            centre: self.centre,
            spread: self.spread,
        }
    }
}

/// Total variation distance (half the L1 distance) of two normalised histograms, in [0, 1]; a
/// side with no such pixels is 1 away from one that has some, 0 from another without.
fn total_variation(a: &Option<Vec<f64>>, b: &Option<Vec<f64>>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => (0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>()).min(1.0),
        (None, None) => 0.0,
        _ => 1.0,
    }
}

/// `|s − r| / max(s, r)`, in [0, 1]: 0.5 is a factor of two.
fn relative(s: f64, r: f64) -> f64 {
    let m = s.abs().max(r.abs());
    if m == 0.0 {
        0.0
    } else {
        (s - r).abs() / m
    }
}

fn relative_opt(s: Option<f64>, r: Option<f64>) -> f64 {
    match (s, r) {
        (Some(s), Some(r)) => relative(s, r),
        (None, None) => 0.0,
        _ => 1.0,
    }
}

/// How far `samples` is from `reference`.
pub fn score(samples: &SetStats, reference: &SetStats) -> StyleScore {
    let palette = 0.5 * total_variation(&samples.background, &reference.background) + 0.5 * total_variation(&samples.ink, &reference.ink);
    let edge_density = relative(samples.edge_density, reference.edge_density);
    let stroke_width = relative_opt(samples.stroke_width, reference.stroke_width);
    let composition = match (samples.centre, reference.centre) {
        (Some(s), Some(r)) => {
            let offset = ((s.0 - r.0).powi(2) + (s.1 - r.1).powi(2)).sqrt();
            let spread = (samples.spread.unwrap_or(0.0) - reference.spread.unwrap_or(0.0)).abs();
            (2.0 * (offset + spread)).min(1.0)
        }
        (None, None) => 0.0,
        _ => 1.0,
    };
    let total = (palette + edge_density + stroke_width + composition) / 4.0;
    StyleScore { palette, edge_density, stroke_width, composition, total }
}

/// Reads the images at `paths` and returns their set's statistics (`None` for no paths). An
/// unreadable image is an error naming it.
pub fn stats_of_files(paths: &[PathBuf]) -> anyhow::Result<Option<SetStats>> {
    let mut images = Vec::with_capacity(paths.len());
    for p in paths {
        let img = image::open(p).with_context(|| format!("style score: cannot read image {}", p.display()))?;
        images.push(image_stats(&img.to_rgb8()));
    }
    Ok(SetStats::of(&images))
}

/// At most `max` of `paths`, evenly spread over them (all when there are fewer).
pub fn spread_pick(paths: &[PathBuf], max: usize) -> Vec<PathBuf> {
    if paths.len() <= max || max == 0 {
        return paths.to_vec();
    }
    (0..max).map(|k| paths[k * paths.len() / max].clone()).collect()
}

/// A readable `StyleScore` for tests and logs: `total 0.123 (palette 0.1, ...)`.
pub fn describe(s: &StyleScore) -> String {
    format!(
        "total {:.3} (palette {:.3}, edge density {:.3}, stroke width {:.3}, composition {:.3})",
        s.total, s.palette, s.edge_density, s.stroke_width, s.composition
    )
}

/// Whether `path` has an image extension the dataset reads.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| graft_trainer::dataset::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    const CREAM: [u8; 3] = [251, 246, 236];
    const PINK_FILL: [u8; 3] = [246, 178, 201];
    const PINK_LINE: [u8; 3] = [176, 74, 112];
    const BLUE_FILL: [u8; 3] = [168, 206, 242];
    const BLUE_LINE: [u8; 3] = [52, 98, 160];

    /// A square outline of stroke `width` centred at (`cx`, `cy`) with half side `r`, filled
    /// with `fill` inside, on `background`, `size` x `size` pixels.
    #[allow(clippy::too_many_arguments)]
    fn square(size: u32, cx: i32, cy: i32, r: i32, width: i32, line: [u8; 3], fill: Option<[u8; 3]>, background: [u8; 3]) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let (dx, dy) = ((x as i32 - cx).abs(), (y as i32 - cy).abs());
            let d = dx.max(dy);
            if d <= r && d > r - width {
                Rgb(line)
            } else if d <= r - width {
                Rgb(fill.unwrap_or(background))
            } else {
                Rgb(background)
            }
        })
    }

    /// A set of three centred pink squares of stroke 4 (the "style").
    fn reference() -> Vec<RgbImage> {
        vec![
            square(256, 128, 128, 60, 4, PINK_LINE, Some(PINK_FILL), CREAM),
            square(256, 128, 128, 90, 4, PINK_LINE, None, CREAM),
            square(256, 128, 128, 40, 4, PINK_LINE, Some(PINK_FILL), CREAM),
        ]
    }

    fn set(images: &[RgbImage]) -> SetStats {
        SetStats::of(&images.iter().map(image_stats).collect::<Vec<_>>()).unwrap()
    }

    fn score_of(samples: &[RgbImage]) -> StyleScore {
        score(&set(samples), &set(&reference()))
    }

    #[test]
    fn a_set_against_itself_scores_zero() {
        let s = score_of(&reference());
        assert_eq!(s, StyleScore { palette: 0.0, edge_density: 0.0, stroke_width: 0.0, composition: 0.0, total: 0.0 });
    }

    #[test]
    fn stroke_width_is_the_width_of_a_band() {
        // Vertical bands of width 1 to 9 on a 64 x 64 mask (and one diagonal band).
        for width in 1..=9usize {
            let mask: Vec<bool> = (0..64 * 64).map(|i| (20..20 + width).contains(&(i % 64))).collect();
            let got = stroke_width(&mask, 64, 64).unwrap();
            // Odd widths exactly; even ones one short (the ridge is two pixels at w / 2).
            let want = if width % 2 == 1 { width as f64 } else { width as f64 - 1.0 };
            assert!((got - want).abs() < 1e-6, "width {width}: {got}");
        }
        // A diagonal band 7 pixels across horizontally is 7 / sqrt(2) ≈ 4.95 wide.
        let mask: Vec<bool> = (0..128 * 128i32).map(|i| ((i % 128) - (i / 128)).abs() <= 3).collect();
        let got = stroke_width(&mask, 128, 128).unwrap();
        assert!((got - 4.95).abs() < 1.0, "diagonal: {got}");
        assert_eq!(stroke_width(&[false; 16], 4, 4), None);
    }

    #[test]
    fn background_and_ink() {
        let img = square(64, 32, 32, 10, 2, PINK_LINE, Some(PINK_FILL), CREAM);
        assert_eq!(border_median(&img), CREAM);
        let s = image_stats(&img);
        // The ink's centre is the square's centre, in image-relative coordinates.
        let (cx, cy) = s.centre.unwrap();
        assert!((cx - 0.5).abs() < 0.01 && (cy - 0.5).abs() < 0.01, "{cx} {cy}");
        // Upscaled 4x (nearest) to 256: the outline 2 px wide at 64 is 8 px wide (7 measured).
        assert!((s.stroke_width.unwrap() - 7.0).abs() < 0.5, "{:?}", s.stroke_width);
        // A blank image has no ink, no line, no edge.
        let blank = image_stats(&RgbImage::from_pixel(32, 32, Rgb(CREAM)));
        assert_eq!((blank.ink.is_none(), blank.stroke_width, blank.centre, blank.edge_density), (true, None, None, 0.0));
    }

    #[test]
    fn shifting_the_drawing_raises_composition_only() {
        let shifted: Vec<RgbImage> = vec![
            square(256, 168, 128, 60, 4, PINK_LINE, Some(PINK_FILL), CREAM),
            square(256, 140, 128, 90, 4, PINK_LINE, None, CREAM),
            square(256, 188, 128, 40, 4, PINK_LINE, Some(PINK_FILL), CREAM),
        ];
        let s = score_of(&shifted);
        assert!(s.composition > 0.3, "{}", describe(&s));
        assert!(s.palette < 1e-9 && s.edge_density < 1e-9 && s.stroke_width < 1e-9, "{}", describe(&s));
        // In a corner, more than half a frame away: the most the part gives.
        let far = vec![square(256, 230, 230, 20, 4, PINK_LINE, Some(PINK_FILL), CREAM); 3];
        assert_eq!(score_of(&far).composition, 1.0);
    }

    #[test]
    fn recolouring_raises_palette_mostly() {
        let blue: Vec<RgbImage> = vec![
            square(256, 128, 128, 60, 4, BLUE_LINE, Some(BLUE_FILL), CREAM),
            square(256, 128, 128, 90, 4, BLUE_LINE, None, CREAM),
            square(256, 128, 128, 40, 4, BLUE_LINE, Some(BLUE_FILL), CREAM),
        ];
        let s = score_of(&blue);
        assert!(s.palette > 0.3, "{}", describe(&s));
        assert!(s.palette > 5.0 * s.edge_density.max(s.stroke_width).max(s.composition), "{}", describe(&s));
        // A slightly different cream background (4 levels) costs little: the bins are shared.
        let near: Vec<RgbImage> = reference()
            .iter()
            .map(|i| {
                RgbImage::from_fn(256, 256, |x, y| {
                    let p = i.get_pixel(x, y).0;
                    if p == CREAM {
                        Rgb([247, 242, 232])
                    } else {
                        Rgb(p)
                    }
                })
            })
            .collect();
        let s = score_of(&near);
        assert!(s.palette < 0.1 && s.palette > 0.0, "{}", describe(&s));
    }

    #[test]
    fn thicker_strokes_raise_stroke_width() {
        let thick: Vec<RgbImage> = vec![
            square(256, 128, 128, 60, 12, PINK_LINE, Some(PINK_FILL), CREAM),
            square(256, 128, 128, 90, 12, PINK_LINE, None, CREAM),
            square(256, 128, 128, 40, 12, PINK_LINE, Some(PINK_FILL), CREAM),
        ];
        let s = score_of(&thick);
        // Width 3 (4 measured as 3) against 11: relative difference 8 / 11.
        assert!((s.stroke_width - 8.0 / 11.0).abs() < 0.05, "{}", describe(&s));
        assert!(s.stroke_width > 2.0 * s.edge_density.max(s.composition), "{}", describe(&s));
    }

    #[test]
    fn more_lines_raise_edge_density() {
        // The same squares with hatching: four more lines across each.
        let hatched: Vec<RgbImage> = reference()
            .into_iter()
            .map(|mut img| {
                for x in [80u32, 110, 140, 170] {
                    for y in 90..170 {
                        for dx in 0..3 {
                            img.put_pixel(x + dx, y, Rgb(PINK_LINE));
                        }
                    }
                }
                img
            })
            .collect();
        let s = score_of(&hatched);
        assert!(s.edge_density > 0.25, "{}", describe(&s));
        assert!(s.edge_density > 2.0 * s.composition.max(s.stroke_width), "{}", describe(&s));
        // Noise everywhere: edges everywhere, and its palette is far too.
        let mut seed = 1u64;
        let noise = RgbImage::from_fn(64, 64, |_, _| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let b = (seed >> 33).to_le_bytes();
            Rgb([b[0], b[1], b[2]])
        });
        let s = score_of(&[noise]);
        assert!(s.edge_density > 0.8 && s.palette > 0.5, "{}", describe(&s));
    }

    #[test]
    fn sizes_do_not_matter() {
        // The same drawings at 64 x 64 (scaled 4x) and at 1024 (scaled down 4x) measure as at 256.
        let small: Vec<RgbImage> = vec![
            square(64, 32, 32, 15, 1, PINK_LINE, Some(PINK_FILL), CREAM),
            square(64, 32, 32, 22, 1, PINK_LINE, None, CREAM),
            square(64, 32, 32, 10, 1, PINK_LINE, Some(PINK_FILL), CREAM),
        ];
        let large: Vec<RgbImage> = vec![
            square(1024, 512, 512, 240, 16, PINK_LINE, Some(PINK_FILL), CREAM),
            square(1024, 512, 512, 360, 16, PINK_LINE, None, CREAM),
            square(1024, 512, 512, 160, 16, PINK_LINE, Some(PINK_FILL), CREAM),
        ];
        for (name, imgs) in [("64", small), ("1024", large)] {
            let s = score_of(&imgs);
            assert!(s.total < 0.08 && s.composition < 0.05, "{name}: {}", describe(&s));
        }
        // A non-square image keeps its aspect ratio.
        let wide = analysis_image(&RgbImage::new(64, 48));
        assert_eq!(wide.dimensions(), (256, 192));
    }

    /// On the demo's datasets: the styled look's other drawings are close to it, the same drawings
    /// at another size too; the plain look (what the demo model draws before training: saturated
    /// fills, no outline, five positions) is far, and noise farther.
    #[test]
    fn the_demo_style_is_close_to_itself_and_far_from_the_plain_look() {
        use crate::demo::dataset::{render, Look};
        let draw = |range: std::ops::Range<usize>, size: u32, look: Look| -> Vec<RgbImage> { range.map(|i| render(i, size, look).0).collect() };
        let reference = set(&draw(0..12, 64, Look::Styled));
        let half = score(&set(&draw(12..24, 64, Look::Styled)), &reference);
        let larger = score(&set(&draw(12..24, 192, Look::Styled)), &reference);
        let plain = score(&set(&draw(0..12, 64, Look::Plain)), &reference);
        let mut seed = 7u64;
        let noise: Vec<RgbImage> = (0..4)
            .map(|_| {
                RgbImage::from_fn(64, 64, |_, _| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let b = (seed >> 33).to_le_bytes();
                    Rgb([b[0], b[1], b[2]])
                })
            })
            .collect();
        let noise = score(&set(&noise), &reference);
        // Measured: half 0.012, larger 0.079 (edge density 0.23: anti-aliased edges are sharper
        // at 192 px), plain 0.59, noise 0.68.
        let close = half.total.max(larger.total);
        assert!(close < 0.15, "{} / {}", describe(&half), describe(&larger));
        assert!(plain.total > 2.0 * close && plain.palette > 0.3 && plain.stroke_width > 0.5, "{}", describe(&plain));
        assert!(noise.total > plain.total && noise.edge_density > 0.8, "{}", describe(&noise));
    }

    #[test]
    fn a_missing_quantity_counts_as_far() {
        let blank = vec![RgbImage::from_pixel(64, 64, Rgb(CREAM))];
        let s = score_of(&blank);
        // No ink: palette half far (the background matches), no lines, no centre.
        assert!((s.palette - 0.5).abs() < 1e-9 && s.stroke_width == 1.0 && s.composition == 1.0 && s.edge_density == 1.0, "{}", describe(&s));
        assert_eq!(SetStats::of(&[]), None);
        let paths: Vec<PathBuf> = (0..10).map(|i| PathBuf::from(i.to_string())).collect();
        assert_eq!(spread_pick(&paths, 3), [PathBuf::from("0"), PathBuf::from("3"), PathBuf::from("6")]);
        assert_eq!(spread_pick(&paths, 20).len(), 10);
    }
}
