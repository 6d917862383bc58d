//! The loss log of a run and its plots.
//!
//! The log is JSON Lines, one object a step, appended as the step ends:
//!
//! ```text
//! {"step":12,"loss":0.0831,"lr":0.0001,"grad_norm":0.42,"skipped":false,"time":0.35}
//! ```
//!
//! `step` is the trainer's step index (from 0), `time` the seconds that step took. Two keys are
//! there only on some steps: `val_loss`, the validation loss measured after the step, and
//! `stage`, the name of the strategy's stage that begins at the step (staged strategies such as
//! progressive-fusion); logs without them read as before, and older readers ignore them. A NaN or
//! infinite loss or gradient norm is written as `null` (JSON has no NaN) and read back as NaN.
//! Each line goes to the file in one write, so a crash leaves at most a torn last line, which
//! [`read`] skips; [`LossLog::open`] drops the entries of the steps a resumed run redoes.
//!
//! The plots are drawn here with a small rasteriser on an `image` buffer: axes, a light grid with
//! numbered ticks (a built-in 5x7 bitmap font), the raw loss as a thin light line and its
//! exponential moving average as a thick line; [`plot_many`] draws several runs with a legend
//! (colour swatch and name; the font has capitals, digits and `. - + : _ / ( )`, lower case is
//! drawn as capitals, anything else as `?`). Validation losses are square markers joined by a
//! dark line in the curve's colour, on the same axes; a stage that begins after a run's first step
//! is a dashed vertical line labelled with its name.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};

/// One optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossEntry {
    pub step: u64,
    #[serde(with = "nan_as_null")]
    pub loss: f64,
    pub lr: f64,
    #[serde(with = "nan_as_null")]
    pub grad_norm: f64,
    /// The step was skipped (NaN / inf loss or gradient): no update was made.
    pub skipped: bool,
    /// Seconds the step took.
    pub time: f64,
    /// The validation loss measured after this step (only on steps where one was due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The strategy's stage that begins at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl From<crate::trainer::StepRecord> for LossEntry {
    fn from(r: crate::trainer::StepRecord) -> Self {
        Self {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            time: r.seconds,
            // JSON has no NaN: a failed validation is left out.
            val_loss: r.val_loss.filter(|v| v.is_finite()),
            stage: r.stage,
        }
    }
}

mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// An open loss log: each [`LossLog::append`] writes one line and hands it to the OS.
pub struct LossLog {
    path: PathBuf,
    file: File,
}

impl LossLog {
    /// A new, empty log for a fresh run (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(format!("cannot create folder {}", dir.display()), dir))?;
        }
        let file = File::create(path).map_err(io(format!("{}: cannot create the loss log", path.display()), path))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Opens the log of a run that has done `steps_done` steps: keeps the entries of those steps
    /// (entries are numbered from 0, as the trainer numbers its steps: `step < steps_done`),
    /// drops the later ones, which a resumed run redoes, by rewriting the file atomically, and
    /// appends from there. `steps_done = 0` (a fresh run) starts an empty log; so does a missing
    /// file.
    pub fn open(path: &Path, steps_done: u64) -> Result<Self> {
        if steps_done == 0 || !path.exists() {
            return Self::create(path);
        }
        let mut kept = read(path)?;
        kept.retain(|e| e.step < steps_done);
        let mut text = String::new();
        for e in &kept {
            text.push_str(&line(e)?);
        }
        graft_formats::write::write_atomic(path, text.as_bytes()).map_err(|e| Error::State(e.to_string()))?;
        let file =
            std::fs::OpenOptions::new().append(true).open(path).map_err(io(format!("{}: cannot open the loss log", path.display()), path))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry (one write of one line).
    pub fn append(&mut self, entry: &LossEntry) -> Result<()> {
        self.file
            .write_all(line(entry)?.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(io(format!("{}: cannot write the loss log", self.path.display()), &self.path))
    }

    /// Makes the lines written so far durable (call it with each checkpoint, not each step).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(format!("{}: cannot sync the loss log", self.path.display()), &self.path))
    }
}

fn line(e: &LossEntry) -> Result<String> {
    let json = serde_json::to_string(e).map_err(|e| Error::Internal(format!("a loss log entry as JSON: {e}")))?;
    Ok(format!("{json}\n"))
}

/// Reads a loss log. A torn last line (a crash during its write) is skipped; any other bad line
/// is an error naming the file and the line.
pub fn read(path: &Path) -> Result<Vec<LossEntry>> {
    let text = std::fs::read_to_string(path).map_err(io(format!("{}: cannot read the loss log", path.display()), path))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LossEntry>(l) {
            Ok(e) => out.push(e),
            Err(_) if i + 1 == lines.len() && !complete => {
                tracing::warn!("{}: line {} is incomplete (the run stopped while writing it); skipped", path.display(), i + 1);
            }
            Err(e) => return Err(Error::State(format!("{}:{}: not a loss log entry ({e}): {l}", path.display(), i + 1))),
        }
    }
    Ok(out)
}

/// The smoothing factor of the moving average for curves of `n` points: a span of about a
/// twentieth of the run (5 to 200 steps), `beta = 1 - 2 / (span + 1)`.
pub fn ema_beta(n: usize) -> f64 {
    let span = (n as f64 / 20.0).clamp(5.0, 200.0);
    1.0 - 2.0 / (span + 1.0)
}

/// The bias-corrected exponential moving average (as TensorBoard smooths): the first values are
/// not pulled towards zero.
pub fn ema(values: &[f64], beta: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|v| {
            acc = beta * acc + (1.0 - beta) * v;
            weight = beta * weight + (1.0 - beta);
            acc / weight
        })
        .collect()
}

/// The matplotlib blue of a single curve.
pub const DEFAULT_COLOR: [u8; 3] = [31, 119, 180];

/// A palette for [`plot_many`] callers (matplotlib's tab10).
pub const PALETTE: [[u8; 3]; 8] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127]];

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;
/// Plot area: left, top, right, bottom edges.
const LEFT: f64 = 64.0;
const TOP: f64 = 24.0;
const RIGHT: f64 = WIDTH as f64 - 16.0;
const BOTTOM: f64 = HEIGHT as f64 - 36.0;
const GRID: [u8; 3] = [225, 225, 225];
const AXIS: [u8; 3] = [60, 60, 60];
const TEXT: [u8; 3] = [40, 40, 40];
/// Stage boundaries of a single run.
const STAGE: [u8; 3] = [150, 150, 150];

/// Draws the loss curve of one run: the raw loss (thin, light) and its moving average (thick).
/// Skipped steps and non-finite losses are left out.
pub fn plot_loss_png(entries: &[LossEntry], path: &Path) -> Result<()> {
    plot_many(&[("loss", DEFAULT_COLOR, entries)], path)
}

/// Draws several runs in one plot, each in its colour, with a legend of swatches and names.
pub fn plot_many(curves: &[(&str, [u8; 3], &[LossEntry])], path: &Path) -> Result<()> {
    let img = render(curves)?;
    crate::samples::write_rgb_png(path, &img, None)
}

/// The points (step, loss) a plot uses.
fn points(entries: &[LossEntry]) -> Vec<(f64, f64)> {
    entries.iter().filter(|e| !e.skipped && e.loss.is_finite()).map(|e| (e.step as f64, e.loss)).collect()
}

/// The validation losses of a log, as (step, loss): the points of its validation curve.
pub fn validation_points(entries: &[LossEntry]) -> Vec<(u64, f64)> {
    entries.iter().filter_map(|e| e.val_loss.filter(|v| v.is_finite()).map(|v| (e.step, v))).collect()
}

/// The stage boundaries of a log, as (step, stage name): the stages that begin after its first
/// step (the first stage needs no line).
pub fn stage_boundaries(entries: &[LossEntry]) -> Vec<(u64, String)> {
    let first = entries.iter().map(|e| e.step).min().unwrap_or(0);
    entries.iter().filter(|e| e.step > first).filter_map(|e| e.stage.clone().map(|s| (e.step, s))).collect()
}

/// The plot as an image (what [`plot_many`] writes).
pub fn render(curves: &[(&str, [u8; 3], &[LossEntry])]) -> Result<RgbImage> {
    // (name, colour, plotted points) of each curve.
    type Series<'a> = (&'a str, [u8; 3], Vec<(f64, f64)>);
    let series: Vec<Series> = curves.iter().map(|(n, c, e)| (*n, *c, points(e))).collect();
    let validation: Vec<Series> =
        curves.iter().map(|(n, c, e)| (*n, *c, validation_points(e).into_iter().map(|(s, v)| (s as f64, v)).collect())).collect();
    let all: Vec<(f64, f64)> = series.iter().chain(&validation).flat_map(|s| s.2.iter().copied()).collect();
    if all.is_empty() {
        return Err(Error::State("no finite loss to plot (every step was skipped, or the log is empty)".to_string()));
    }
    let (mut x0, mut x1) = min_max(all.iter().map(|p| p.0));
    let (mut y0, mut y1) = min_max(all.iter().map(|p| p.1));
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 <= y0 {
        let pad = y0.abs() * 0.1 + 1e-3;
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);
    let to_px = |(x, y): (f64, f64)| (LEFT + (x - x0) / (x1 - x0) * (RIGHT - LEFT), BOTTOM - (y - y0) / (y1 - y0) * (BOTTOM - TOP));

    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    // Grid and tick labels.
    for v in ticks(y0, y1, 6) {
        let (_, py) = to_px((x0, v));
        hline(&mut img, LEFT, RIGHT, py, GRID);
        let label = tick_label(v, tick_step(y0, y1, 6));
        text(&mut img, &label, LEFT - 6.0 - text_width(&label) as f64, py - 3.0, TEXT);
    }
    for v in ticks(x0, x1, 8) {
        let (px, _) = to_px((v, y0));
        vline(&mut img, px, TOP, BOTTOM, GRID);
        let label = tick_label(v, tick_step(x0, x1, 8).max(1.0));
        text(&mut img, &label, px - text_width(&label) as f64 / 2.0, BOTTOM + 6.0, TEXT);
    }
    // Axes.
    hline(&mut img, LEFT, RIGHT, BOTTOM, AXIS);
    vline(&mut img, LEFT, TOP, BOTTOM, AXIS);
    text(&mut img, "STEP", RIGHT - text_width("STEP") as f64, BOTTOM + 20.0, TEXT);
    text(&mut img, "LOSS", 6.0, 8.0, TEXT);

    // Raw losses first (under every average), then the averages with one smoothing for all.
    let beta = ema_beta(series.iter().map(|s| s.2.len()).max().unwrap_or(0));
    for (_, color, pts) in &series {
        let light = blend(*color, [255, 255, 255], 0.6);
        let px: Vec<(f64, f64)> = pts.iter().map(|p| to_px(*p)).collect();
        polyline(&mut img, &px, light, 0.5);
    }
    for (_, color, pts) in &series {
        let smooth = ema(&pts.iter().map(|p| p.1).collect::<Vec<_>>(), beta);
        let px: Vec<(f64, f64)> = pts.iter().zip(&smooth).map(|(p, s)| to_px((p.0, *s))).collect();
        polyline(&mut img, &px, *color, 1.5);
    }

    // Stage boundaries under the validation curves, which are drawn last.
    let single = curves.len() == 1;
    for (_, color, entries) in curves {
        let line = if single { STAGE } else { blend(*color, [255, 255, 255], 0.3) };
        for (step, name) in stage_boundaries(entries) {
            let (px, _) = to_px((step as f64, y0));
            if !(LEFT..=RIGHT).contains(&px) {
                continue;
            }
            dashed_vline(&mut img, px, TOP, BOTTOM, line);
            text(&mut img, &name, (px + 3.0).min(RIGHT - text_width(&name) as f64), TOP + 2.0, line);
        }
    }
    let has_validation = validation.iter().any(|v| !v.2.is_empty());
    for (_, color, pts) in &validation {
        let dark = blend(*color, [0, 0, 0], 0.35);
        let px: Vec<(f64, f64)> = pts.iter().map(|p| to_px(*p)).collect();
        polyline(&mut img, &px, dark, 0.5);
        for (x, y) in &px {
            fill_rect(&mut img, x - 3.0, y - 3.0, x + 4.0, y + 4.0, dark);
        }
    }

    // Summary of a single run, legend of several.
    if single && has_validation {
        let pts = &validation[0].2;
        let (_, last) = pts[pts.len() - 1];
        let summary = format!("TRAIN (LINE)   VALIDATION (SQUARES): LAST {}", short(last));
        text(&mut img, &summary, LEFT + 8.0, 8.0, TEXT);
    } else if series.len() == 1 {
        let pts = &series[0].2;
        let (i, min) = pts.iter().enumerate().fold((0, f64::INFINITY), |acc, (i, p)| if p.1 < acc.1 { (i, p.1) } else { acc });
        let summary = format!("MIN {} AT STEP {}   MAX {}", short(min), pts[i].0, short(y1 - pad));
        text(&mut img, &summary, LEFT + 8.0, 8.0, TEXT);
    } else {
        let mut y = TOP + 8.0;
        let w = series.iter().map(|s| text_width(s.0)).max().unwrap_or(0) as f64;
        let x = RIGHT - 8.0 - w - 18.0;
        fill_rect(&mut img, x - 6.0, y - 4.0, RIGHT - 4.0, y + 12.0 * series.len() as f64, [255, 255, 255]);
        for (name, color, _) in &series {
            fill_rect(&mut img, x, y, x + 12.0, y + 7.0, *color);
            text(&mut img, name, x + 18.0, y, TEXT);
            y += 12.0;
        }
        if has_validation {
            text(&mut img, "SQUARES: VALIDATION", LEFT + 8.0, 8.0, TEXT);
        }
    }
    Ok(img)
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over [lo, hi].
fn tick_step(lo: f64, hi: f64, n: usize) -> f64 {
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let step = tick_step(lo, hi, n);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + step * 1e-9 && out.len() < 50 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    if step < 1e-4 || v.abs() >= 1e6 {
        return format!("{v:.1e}").to_uppercase();
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Four significant digits.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        return format!("{v:.3e}").to_uppercase();
    }
    let decimals = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

fn blend(a: [u8; 3], b: [u8; 3], t: f64) -> [u8; 3] {
    let m = |x: u8, y: u8| (x as f64 * (1.0 - t) + y as f64 * t).round() as u8;
    [m(a[0], b[0]), m(a[1], b[1]), m(a[2], b[2])]
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

fn hline(img: &mut RgbImage, x0: f64, x1: f64, y: f64, c: [u8; 3]) {
    let y = y.round() as i64;
    for x in x0.round() as i64..=x1.round() as i64 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: f64, y0: f64, y1: f64, c: [u8; 3]) {
    let x = x.round() as i64;
    for y in y0.round() as i64..=y1.round() as i64 {
        put(img, x, y, c);
    }
}

/// A vertical line of 4-pixel dashes.
fn dashed_vline(img: &mut RgbImage, x: f64, y0: f64, y1: f64, c: [u8; 3]) {
    let x = x.round() as i64;
    for y in y0.round() as i64..=y1.round() as i64 {
        if (y / 4) % 2 == 0 {
            put(img, x, y, c);
        }
    }
}

fn fill_rect(img: &mut RgbImage, x0: f64, y0: f64, x1: f64, y1: f64, c: [u8; 3]) {
    for y in y0.round() as i64..y1.round() as i64 {
        for x in x0.round() as i64..x1.round() as i64 {
            put(img, x, y, c);
        }
    }
}

/// A line through the points, `radius` pixels either side of its centre (0.5: one pixel wide),
/// clipped to the plot area.
fn polyline(img: &mut RgbImage, pts: &[(f64, f64)], c: [u8; 3], radius: f64) {
    let r = radius.ceil() as i64;
    let mut dot = |x: f64, y: f64| {
        for dy in -r..=r {
            for dx in -r..=r {
                let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
                let inside = (px as f64) >= LEFT && (px as f64) <= RIGHT && (py as f64) >= TOP && (py as f64) <= BOTTOM;
                if inside && ((px as f64 - x).powi(2) + (py as f64 - y).powi(2)).sqrt() <= radius + 0.25 {
                    put(img, px, py, c);
                }
            }
        }
    };
    if let [only] = pts {
        dot(only.0, only.1);
    }
    for w in pts.windows(2) {
        let ((ax, ay), (bx, by)) = (w[0], w[1]);
        let n = ((bx - ax).abs().max((by - ay).abs()) * 2.0).ceil().max(1.0) as usize;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            dot(ax + (bx - ax) * t, ay + (by - ay) * t);
        }
    }
}

/// Width in pixels of a text in the 5x7 font (6 pixels a character).
fn text_width(s: &str) -> usize {
    s.chars().count() * 6
}

/// Draws text with its top-left corner at (x, y).
fn text(img: &mut RgbImage, s: &str, x: f64, y: f64, c: [u8; 3]) {
    let (x, y) = (x.round() as i64, y.round() as i64);
    for (i, ch) in s.chars().enumerate() {
        let rows = glyph(ch);
        for (ry, bits) in rows.iter().enumerate() {
            for rx in 0..5 {
                if bits & (0b10000 >> rx) != 0 {
                    put(img, x + i as i64 * 6 + rx, y + ry as i64, c);
                }
            }
        }
    }
}

/// The 5x7 glyph of a character (rows top to bottom, bit 4 the leftmost pixel).
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        'A' => [0b01110, 0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001],
        'B' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110],
        'C' => [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110],
        'D' => [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100],
        'E' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111],
        'F' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000],
        'G' => [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111],
        'H' => [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'I' => [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'J' => [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100],
        'K' => [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'N' => [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001],
        'O' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'P' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000],
        'Q' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101],
        'R' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001],
        'S' => [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110],
        'T' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        'U' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'V' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'W' => [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010],
        'X' => [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001],
        'Y' => [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100],
        'Z' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111],
        '.' => [0, 0, 0, 0, 0, 0b01100, 0b01100],
        '-' => [0, 0, 0, 0b11111, 0, 0, 0],
        '+' => [0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0],
        ':' => [0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0b11111],
        '/' => [0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0],
        '(' => [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010],
        ')' => [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000],
        ' ' => [0; 7],
        _ => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0, 0b00100],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u64, loss: f64) -> LossEntry {
        LossEntry { step, loss, lr: 1e-4, grad_norm: 0.5, skipped: false, time: step as f64 * 0.25, ..Default::default() }
    }

    #[test]
    fn appends_reads_back_and_keeps_nan_as_null() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/loss.jsonl");
        let mut log = LossLog::create(&path).unwrap();
        let bad = LossEntry { loss: f64::NAN, grad_norm: f64::INFINITY, skipped: true, ..entry(2, 0.0) };
        for e in [entry(1, 0.5), bad, entry(3, 0.25)] {
            log.append(&e).unwrap();
        }
        log.sync().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).unwrap().contains(r#""loss":null"#), "{text}");
        assert!(text.lines().next().unwrap().starts_with(r#"{"step":1,"loss":0.5,"lr":0.0001,"grad_norm":0.5"#), "{text}");
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], entry(1, 0.5));
        assert!(back[1].loss.is_nan() && back[1].grad_norm.is_nan() && back[1].skipped);
        assert_eq!(back[2], entry(3, 0.25));
    }

    #[test]
    fn open_drops_later_steps_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.jsonl");
        let mut log = LossLog::open(&path, 0).unwrap();
        for s in 0..6 {
            log.append(&entry(s, 1.0 / (s + 1) as f64)).unwrap();
        }
        drop(log);
        // A crash in the middle of a line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"step":6,"lo"#).unwrap();
        drop(f);
        assert_eq!(read(&path).unwrap().len(), 6, "the torn last line is skipped");

        // Resumed after 4 steps (0..=3): steps 4, 5 and the torn line go.
        let mut log = LossLog::open(&path, 4).unwrap();
        assert_eq!(log.path(), path.as_path());
        log.append(&entry(4, 0.3)).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.iter().map(|e| e.step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(back[4].loss, 0.3);

        // A fresh run replaces the old log; resuming without a log starts an empty one.
        drop(LossLog::open(&path, 0).unwrap());
        assert!(read(&path).unwrap().is_empty());
        LossLog::open(&dir.path().join("new.jsonl"), 10).unwrap();
        assert!(read(&dir.path().join("new.jsonl")).unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5,\"lr\":0.1,\"grad_norm\":1,\"skipped\":false,\"time\":0}\nnot json\n{}\n").unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("loss.jsonl:2") && e.contains("not json"), "{e}");
        let e = format!("{:#}", read(&dir.path().join("none.jsonl")).unwrap_err());
        assert!(e.contains("none.jsonl") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn ema_is_debiased_and_smooths() {
        let v = ema(&[2.0, 2.0, 2.0], 0.9);
        assert!(v.iter().all(|x| (x - 2.0).abs() < 1e-12), "{v:?}");
        let v = ema(&[0.0, 1.0, 0.0, 1.0, 0.0, 1.0], 0.8);
        assert_eq!(v[0], 0.0);
        assert!(v[5] > 0.3 && v[5] < 0.7, "{v:?}");
        assert!(ema_beta(10) < ema_beta(1000) && ema_beta(1000) < ema_beta(100_000));
        assert!((ema_beta(100_000) - (1.0 - 2.0 / 201.0)).abs() < 1e-12);
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = ticks(0.012, 0.087, 6);
        assert_eq!(tick_step(0.012, 0.087, 6), 0.01);
        assert_eq!(t.len(), 7);
        assert_eq!(tick_label(t[0], 0.01), "0.02");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(2e-5, 1e-5), "2.0E-5");
        assert_eq!(short(0.123456), "0.1235");
        assert_eq!(short(12.5), "12.50");
    }

    /// The curve of a falling loss is drawn in the plot area: dark pixels of the average where it
    /// must be, light pixels of the raw loss, and the grid.
    #[test]
    fn draws_one_curve() {
        let entries: Vec<LossEntry> = (1..=200).map(|s| entry(s, 1.0 / (1.0 + s as f64 * 0.05) + 0.02 * ((s % 7) as f64 - 3.0))).collect();
        let img = render(&[("loss", DEFAULT_COLOR, &entries)]).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        let light = blend(DEFAULT_COLOR, [255, 255, 255], 0.6);
        assert!(count(DEFAULT_COLOR) > 700, "thick average line: {}", count(DEFAULT_COLOR));
        assert!(count(light) > 200, "thin raw line: {}", count(light));
        assert!(count(GRID) > 1000 && count(AXIS) > 1000);
        // The average starts high on the left and ends low on the right.
        let rows_with = |x: u32| (0..HEIGHT).filter(|&y| img.get_pixel(x, y).0 == DEFAULT_COLOR).collect::<Vec<_>>();
        let left = rows_with(LEFT as u32 + 3);
        let right = rows_with(RIGHT as u32 - 3);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(left[0] < right[0], "falling loss: {left:?} {right:?}");
        // Nothing is drawn outside the plot area but text and axes.
        assert_eq!(img.get_pixel(WIDTH - 2, HEIGHT / 2).0, [255, 255, 255]);
    }

    #[test]
    fn draws_several_curves_with_a_legend_and_writes_png() {
        let a: Vec<LossEntry> = (0..50).map(|s| entry(s, 1.0 - s as f64 * 0.01)).collect();
        let mut b: Vec<LossEntry> = (0..80).map(|s| entry(s, 0.8 - s as f64 * 0.005)).collect();
        b[10].skipped = true;
        b[10].loss = f64::NAN;
        let img = render(&[("lora", PALETTE[0], &a), ("attention-gate", PALETTE[1], &b)]).unwrap();
        for c in [PALETTE[0], PALETTE[1]] {
            assert!(img.pixels().filter(|p| p.0 == c).count() > 300);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plots/compare.png");
        plot_many(&[("lora", PALETTE[0], &a), ("gate", PALETTE[1], &b)], &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!((back.width(), back.height()), (WIDTH, HEIGHT));
        plot_loss_png(&a, &dir.path().join("one.png")).unwrap();
        // One point, a flat line, nothing at all.
        render(&[("x", DEFAULT_COLOR, &a[..1])]).unwrap();
        render(&[("x", DEFAULT_COLOR, &[entry(1, 0.5), entry(2, 0.5)])]).unwrap();
        let e = render(&[("x", DEFAULT_COLOR, &[])]).unwrap_err().to_string();
        assert!(e.contains("no finite loss"), "{e}");
    }

    /// Validation losses and stage starts are written only where present, read back, and logs
    /// written before them still read.
    #[test]
    fn validation_and_stage_keys_round_trip_and_old_lines_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.jsonl");
        let mut log = LossLog::create(&path).unwrap();
        let with = LossEntry { val_loss: Some(0.125), stage: Some("stage2".into()), ..entry(4, 0.5) };
        for e in [entry(3, 0.5), with.clone()] {
            log.append(&e).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.lines().next().unwrap().contains("val_loss") && !text.lines().next().unwrap().contains("stage"), "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with(r#""val_loss":0.125,"stage":"stage2"}"#), "{text}");
        assert_eq!(read(&path).unwrap(), vec![entry(3, 0.5), with]);
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5,\"lr\":0.1,\"grad_norm\":1,\"skipped\":false,\"time\":0}\n").unwrap();
        let old = read(&path).unwrap();
        assert_eq!((old[0].val_loss, old[0].stage.as_deref()), (None, None));
    }

    /// The validation curve (dark squares on the same axes) and the stage boundaries (dashed
    /// lines at the steps where stages begin) are in the plot's data and drawn.
    #[test]
    fn draws_validation_points_and_stage_boundaries() {
        let mut entries: Vec<LossEntry> = (0..120).map(|s| entry(s, 0.3 - s as f64 * 0.001)).collect();
        for s in [19usize, 39, 59, 79, 99, 119] {
            entries[s].val_loss = Some(0.35 - s as f64 * 0.0015);
        }
        entries[0].stage = Some("stage1".into());
        entries[40].stage = Some("stage2".into());
        entries[80].stage = Some("stage3".into());
        assert_eq!(validation_points(&entries).len(), 6);
        assert_eq!(validation_points(&entries)[0], (19, 0.35 - 19.0 * 0.0015));
        assert_eq!(stage_boundaries(&entries), vec![(40, "stage2".to_string()), (80, "stage3".to_string())]);

        let img = render(&[("loss", DEFAULT_COLOR, &entries)]).unwrap();
        let dark = blend(DEFAULT_COLOR, [0, 0, 0], 0.35);
        assert!(img.pixels().filter(|p| p.0 == dark).count() >= 6 * 49, "six 7x7 squares");
        // A dashed line in the column of step 40 and of step 80, none at step 60.
        let x = |step: f64| (LEFT + step / 119.0 * (RIGHT - LEFT)).round() as u32;
        let in_column = |col: u32| (TOP as u32..BOTTOM as u32).filter(|&y| img.get_pixel(col, y).0 == STAGE).count();
        assert!(in_column(x(40.0)) > 100 && in_column(x(80.0)) > 100, "{} {}", in_column(x(40.0)), in_column(x(80.0)));
        assert_eq!(in_column(x(60.0)), 0);
        // The y range holds the validation points above the training loss.
        let highest = (0..HEIGHT).find(|&y| (0..WIDTH).any(|x| img.get_pixel(x, y).0 == dark)).unwrap();
        let highest_train = (0..HEIGHT).find(|&y| (0..WIDTH).any(|x| img.get_pixel(x, y).0 == DEFAULT_COLOR)).unwrap();
        assert!(highest < highest_train && highest as f64 >= TOP - 4.0, "{highest} {highest_train}");
        // Without them, no square and no stage line.
        let plain: Vec<LossEntry> = entries.iter().map(|e| LossEntry { val_loss: None, stage: None, ..e.clone() }).collect();
        let img = render(&[("loss", DEFAULT_COLOR, &plain)]).unwrap();
        assert_eq!(img.pixels().filter(|p| p.0 == dark || p.0 == STAGE).count(), 0);
    }

    #[test]
    fn the_font_draws_every_character_it_knows() {
        let known = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-+:_/()";
        for c in known.chars() {
            assert_ne!(glyph(c), glyph('?'), "{c}");
            assert_ne!(glyph(c), [0; 7], "{c}");
        }
        assert_eq!(glyph('a'), glyph('A'));
        let mut img = RgbImage::from_pixel(40, 10, Rgb([255, 255, 255]));
        text(&mut img, "L1", 1.0, 1.0, [0, 0, 0]);
        // 'L': a vertical bar in the first column, a full bottom row.
        assert!((1..8).all(|y| img.get_pixel(1, y).0 == [0, 0, 0]));
        assert!((1..6).all(|x| img.get_pixel(x, 7).0 == [0, 0, 0]));
    }
}
