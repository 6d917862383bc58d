//! The labelled sample grid of a comparison: a column per prompt under a header row of the
//! prompts (shortened), a row per model (the base model, then each strategy) beside a header
//! column of their names. Samples smaller than [`MIN_CELL`] are scaled up by a whole factor with
//! nearest neighbour (every sample pixel a square block, nothing invented), so a 64 px sample
//! shows its style at 192 px. The labels are drawn with the built-in font ([`crate::compare::font`]).

use image::{Rgb, RgbImage};

use crate::compare::font::{draw_text, text_width, wrap, ADVANCE, GLYPH_H};

/// The longer side of a cell is at least this (when the samples are smaller).
pub const MIN_CELL: u32 = 192;
/// Gap between cells and around the grid.
pub const GAP: u32 = 4;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [34, 34, 34];
/// Lines of a column's header, and the most characters of a row's label line.
const HEADER_LINES: usize = 3;
const LABEL_CHARS: usize = 18;

/// Where everything is in the grid image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Whole factor each sample is scaled up by.
    pub upscale: u32,
    /// Cell size (the largest sample, scaled).
    pub cell_w: u32,
    pub cell_h: u32,
    /// The font's pixel size.
    pub font_scale: u32,
    /// Width of the header column and height of the header row (gaps included).
    pub left: u32,
    pub top: u32,
    pub rows: u32,
    pub columns: u32,
}

impl Layout {
    /// The top-left corner of the cell of `row` (0: the first model) and `column`.
    pub fn cell(&self, row: u32, column: u32) -> (u32, u32) {
        (self.left + column * (self.cell_w + GAP), self.top + row * (self.cell_h + GAP))
    }

    pub fn width(&self) -> u32 {
        self.left + self.columns * (self.cell_w + GAP)
    }

    pub fn height(&self) -> u32 {
        self.top + self.rows * (self.cell_h + GAP)
    }

    fn line_height(&self) -> u32 {
        (GLYPH_H + 1) * self.font_scale
    }

    /// Characters that fit on a line `width` pixels wide.
    fn chars_in(&self, width: u32) -> usize {
        ((width + self.font_scale) / (ADVANCE * self.font_scale)) as usize
    }
}

/// The layout of `rows` rows of `columns` samples of at most `sample_w` x `sample_h`, labelled
/// with `row_labels`.
pub fn layout(sample_w: u32, sample_h: u32, rows: usize, columns: usize, row_labels: &[String]) -> Layout {
    let long = sample_w.max(sample_h).max(1);
    let upscale = MIN_CELL.div_ceil(long).max(1);
    let (cell_w, cell_h) = (sample_w.max(1) * upscale, sample_h.max(1) * upscale);
    // Text grows with the cells: 2 (12 px a character) up to 192 px cells, 8 at 1024.
    let font_scale = (cell_w.max(cell_h) / 128).clamp(2, 8);
    let mut l = Layout { upscale, cell_w, cell_h, font_scale, left: 0, top: 0, rows: rows as u32, columns: columns as u32 };
    let label_chars = row_labels.iter().map(|s| s.chars().count()).max().unwrap_or(0).min(LABEL_CHARS) as u32;
    l.left = GAP + label_chars * ADVANCE * font_scale + 2 * GAP;
    l.top = GAP + HEADER_LINES as u32 * l.line_height() + GAP;
    l
}

/// The grid of `rows` (label, samples in column order; `None`: a missing sample, drawn as a
/// cell of `missing`) under the `headers` of the columns.
pub fn labelled_grid(headers: &[String], rows: &[(String, Vec<Option<RgbImage>>)], missing: [u8; 3]) -> RgbImage {
    let columns = headers.len().max(rows.iter().map(|r| r.1.len()).max().unwrap_or(0));
    let images = rows.iter().flat_map(|r| r.1.iter().flatten());
    let sample_w = images.clone().map(|i| i.width()).max().unwrap_or(64);
    let sample_h = images.map(|i| i.height()).max().unwrap_or(64);
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let l = layout(sample_w, sample_h, rows.len(), columns, &labels);
    let mut out = RgbImage::from_pixel(l.width(), l.height(), Rgb(BACKGROUND));

    let header_chars = l.chars_in(l.cell_w);
    for (c, text) in headers.iter().enumerate() {
        let (x, _) = l.cell(0, c as u32);
        for (k, line) in wrap(text, header_chars, HEADER_LINES).iter().enumerate() {
            draw_text(&mut out, x, GAP + k as u32 * l.line_height(), line, l.font_scale, TEXT);
        }
    }
    let label_chars = l.chars_in(l.left - 3 * GAP);
    let label_lines = (l.cell_h / l.line_height()).max(1) as usize;
    for (r, (label, samples)) in rows.iter().enumerate() {
        let (_, y) = l.cell(r as u32, 0);
        for (k, line) in wrap(label, label_chars, label_lines).iter().enumerate() {
            // Right-aligned against the first column.
            let x = (l.left - 2 * GAP).saturating_sub(text_width(line, l.font_scale));
            draw_text(&mut out, x, y + k as u32 * l.line_height(), line, l.font_scale, TEXT);
        }
        for c in 0..columns {
            let (x, y) = l.cell(r as u32, c as u32);
            let cell = match samples.get(c).and_then(|s| s.as_ref()) {
                Some(img) => {
                    image::imageops::resize(img, img.width() * l.upscale, img.height() * l.upscale, image::imageops::FilterType::Nearest)
                }
                None => RgbImage::from_pixel(l.cell_w, l.cell_h, Rgb(missing)),
            };
            // Centred in its cell (samples of other sizes than the largest).
            let (dx, dy) = ((l.cell_w - cell.width().min(l.cell_w)) / 2, (l.cell_h - cell.height().min(l.cell_h)) / 2);
            image::imageops::replace(&mut out, &cell, (x + dx) as i64, (y + dy) as i64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dark(img: &RgbImage, x0: u32, y0: u32, w: u32, h: u32) -> usize {
        let mut n = 0;
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                if img.get_pixel(x, y).0 == TEXT {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn small_samples_are_scaled_up_by_a_whole_factor() {
        assert_eq!(layout(64, 48, 1, 1, &[]).upscale, 3);
        assert_eq!(layout(64, 64, 1, 1, &[]).cell_w, 192);
        assert_eq!(layout(100, 100, 1, 1, &[]).upscale, 2);
        let big = layout(1024, 1024, 1, 1, &[]);
        assert_eq!((big.upscale, big.cell_w, big.font_scale), (1, 1024, 8));
    }

    #[test]
    fn cells_hold_the_scaled_samples_and_labels_are_drawn() {
        let a = RgbImage::from_fn(4, 3, |x, y| Rgb([x as u8 * 50, y as u8 * 80, 7]));
        let rows =
            vec![("base (before)".to_string(), vec![Some(a.clone()), Some(a.clone())]), ("lora".to_string(), vec![None, Some(a.clone())])];
        let headers = vec!["1 a pink star".to_string(), "2 a mint square".to_string()];
        let g = labelled_grid(&headers, &rows, [214, 214, 214]);
        let l = layout(4, 3, 2, 2, &["base (before)".to_string(), "lora".to_string()]);
        assert_eq!((l.upscale, l.cell_w, l.cell_h), (48, 192, 144));
        assert_eq!(g.dimensions(), (l.width(), l.height()));
        // Every sample pixel is a 48 x 48 block.
        let (x, y) = l.cell(0, 1);
        for (sx, sy, p) in a.enumerate_pixels() {
            for (dx, dy) in [(0, 0), (47, 47), (20, 31)] {
                assert_eq!(g.get_pixel(x + sx * 48 + dx, y + sy * 48 + dy), p, "sample pixel ({sx}, {sy})");
            }
        }
        let (x, y) = l.cell(1, 0);
        assert_eq!(g.get_pixel(x + 100, y + 100).0, [214, 214, 214], "a missing sample is grey");
        // The header row has text over each column, the header column beside each row.
        for c in 0..2 {
            let (x, _) = l.cell(0, c);
            assert!(dark(&g, x, 0, l.cell_w, l.top) > 20, "header {c}");
        }
        for r in 0..2 {
            let (_, y) = l.cell(r, 0);
            assert!(dark(&g, 0, y, l.left, l.cell_h) > 20, "label {r}");
        }
        // `base (before)` is 13 characters: the header column fits it on one line.
        assert_eq!(l.left, GAP + 13 * ADVANCE * 2 + 2 * GAP);
    }
}
