//! Does a generated image show what its prompt asked for? Measured on the pixels alone: the ink
//! (pixels far from the white paper) has a colour, the nearest of the plain dataset's named
//! colours, and a centre of mass, the nearest of the five positions.

use image::RgbImage;

use super::dataset::{plain_colors, Position, POSITIONS};

/// A pixel is ink when one of its channels is this far below white (0-255).
const INK_THRESHOLD: u8 = 60;
/// Less ink than this share of the image is no drawing.
const MIN_INK: f64 = 0.01;

/// What an image shows, as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    /// The named colour nearest the ink's mean colour.
    pub color: &'static str,
    pub position: Position,
    /// Share of the image that is ink.
    pub ink: f64,
    /// The ink's centre of mass, as a fraction of the width and height.
    pub center: (f64, f64),
    /// The ink's mean colour.
    pub mean_rgb: [f64; 3],
}

/// The drawing in `img`, or `None` when there is (almost) no ink.
pub fn judge(img: &RgbImage) -> Option<Drawn> {
    let (w, h) = img.dimensions();
    let (mut n, mut sx, mut sy, mut rgb) = (0.0, 0.0, 0.0, [0.0; 3]);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0.iter().any(|&c| c < 255 - INK_THRESHOLD) {
            n += 1.0;
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            for (sum, &c) in rgb.iter_mut().zip(&p.0) {
                *sum += c as f64;
            }
        }
    }
    let ink = n / (w as f64 * h as f64);
    if ink < MIN_INK {
        return None;
    }
    let mean_rgb = rgb.map(|c| c / n);
    let center = (sx / n / w as f64, sy / n / h as f64);
    let dist2 = |a: [f64; 3], b: [u8; 3]| (0..3).map(|k| (a[k] - b[k] as f64).powi(2)).sum::<f64>();
    let color = plain_colors().into_iter().min_by(|a, b| dist2(mean_rgb, a.1).total_cmp(&dist2(mean_rgb, b.1))).expect("colours").0;
    let position = POSITIONS
        .into_iter()
        .min_by(|a, b| {
            let d = |p: Position| (p.anchor().0 - center.0).powi(2) + (p.anchor().1 - center.1).powi(2);
            d(*a).total_cmp(&d(*b))
        })
        .expect("positions");
    Some(Drawn { color, position, ink, center, mean_rgb })
}

/// The fixed prompts the demo model is checked on: each colour at each position, the shapes in
/// turn (20 prompts), with the colour and position each asks for.
pub fn check_prompts() -> Vec<(String, &'static str, Position)> {
    let shapes = super::dataset::shape_names();
    let mut out = Vec::new();
    for (c, (color, _)) in plain_colors().into_iter().enumerate() {
        for (p, position) in POSITIONS.into_iter().enumerate() {
            let shape = shapes[(c + p) % shapes.len()];
            out.push((format!("a {color} {shape} {}", position.phrase()), color, position));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::dataset::{describe, render, Look};
    use super::*;

    /// The judge reads the plain dataset's own images right, and a blank page as nothing.
    #[test]
    fn judges_the_training_images_right() {
        for i in 0..60 {
            let (img, _) = render(i, 64, Look::Plain);
            let d = describe(i, Look::Plain);
            let j = judge(&img).expect("ink");
            assert_eq!((j.color, j.position), (d.color, d.position), "image {i}: {j:?}");
        }
        assert_eq!(judge(&RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]))), None);
        assert_eq!(check_prompts().len(), 20);
    }
}
