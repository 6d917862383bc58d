//! The report of a comparison: `report.md`, a self-contained `report.html` (the plot and the
//! grid inside it as base64 PNG data URIs), `loss.png`, `grid.png` and `summary.json`.
//!
//! The grid has a row per strategy under the base model's row and a column per prompt, with the
//! prompts and row names drawn in ([`crate::compare::grid`]); a strategy without samples (it
//! failed) gets a row of grey cells, so rows keep their meaning.
//!
//! The style table gives each strategy's style score before and after training, and its parts
//! ([`crate::compare::style`]).
//!
//! With `seeds`, the loss cells are mean ± sample std over the seeds, a table below gives every
//! run's numbers, the plot has a curve per run and the grid shows each strategy's first seed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use image::RgbImage;
use minijinja::{context, Environment, Value};

use crate::compare::memory::human_bytes;
use crate::compare::run::{seed_dir, CompareOutcome, StrategyResult};
use crate::compare::stats::MeanStd;
use graft_trainer::losslog::{plot_many, PALETTE};
use graft_trainer::samples::write_rgb_png;

/// The colour of a failed strategy's grid cells.
pub const MISSING_CELL: [u8; 3] = [214, 214, 214];

pub const REPORT_MD: &str = "report.md";
pub const REPORT_HTML: &str = "report.html";
pub const LOSS_PNG: &str = "loss.png";
pub const GRID_PNG: &str = "grid.png";
pub const SUMMARY_JSON: &str = "summary.json";

/// The table's header cells, in order.
pub fn table_header(loss_window: u64) -> Vec<String> {
    [
        "strategy",
        "plugin",
        "config",
        "status",
        "layers",
        "trainable params",
        "final loss",
        &format!("mean loss (last {loss_window})"),
        "eval loss (start → end)",
        "validation loss",
        "time / step",
        "peak memory",
        "adapter size",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The table's header cells of `outcome`: with `seeds`, the loss columns say they are mean ± std.
pub fn header_of(outcome: &CompareOutcome) -> Vec<String> {
    let mut header = table_header(outcome.loss_window);
    if outcome.seeds.is_some() {
        for h in header.iter_mut().filter(|h| h.contains("loss")) {
            h.push_str(", mean ± std");
        }
    }
    header
}

/// The header of the per-seed table.
pub const SEED_HEADER: [&str; 7] = ["strategy", "seed", "status", "final loss", "mean loss", "eval loss (start → end)", "validation loss"];

/// The per-seed table's rows: every run of every strategy (empty without `seeds`).
pub fn seed_rows(outcome: &CompareOutcome) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for r in &outcome.strategies {
        for run in &r.runs {
            let status = match &run.error {
                None => "ok".to_string(),
                Some(e) => format!("failed after {} steps: {}", run.steps_done, first_line(e, 160)),
            };
            rows.push(vec![
                r.name.clone(),
                or_dash(run.seed, |s| s.to_string()),
                status,
                or_dash(run.final_loss, |l| format!("{l:.4}")),
                or_dash(run.mean_loss, |l| format!("{l:.4}")),
                eval_cell(run.eval_loss_start.map(one), run.eval_loss_end.map(one)),
                or_dash(run.validation_loss, |l| format!("{l:.4}")),
            ]);
        }
    }
    rows
}

/// A single value as a [`MeanStd`] (no spread).
fn one(v: f64) -> MeanStd {
    MeanStd { mean: v, std: None, n: 1 }
}

fn eval_cell(start: Option<MeanStd>, end: Option<MeanStd>) -> String {
    match (start, end) {
        (Some(a), Some(b)) => format!("{} → {}", a.format(4), b.format(4)),
        (Some(a), None) => format!("{} → –", a.format(4)),
        _ => "–".into(),
    }
}

fn or_dash<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

/// `12,345,678`.
pub fn thousands(n: u64) -> String {
    let digits: Vec<char> = n.to_string().chars().collect();
    let groups: Vec<String> = digits.rchunks(3).rev().map(|g| g.iter().collect()).collect();
    groups.join(",")
}

/// The table cells of one strategy (plain text, not escaped).
pub fn table_row(r: &StrategyResult) -> Vec<String> {
    let plugin = match &r.plugin_version {
        Some(v) => format!("{} {v}", r.plugin),
        None => r.plugin.clone(),
    };
    let status = match &r.error {
        None => "ok".to_string(),
        Some(e) if !r.runs.is_empty() => {
            let failed = r.runs.iter().filter(|run| !run.ok()).count();
            format!("{failed} of {} seeds failed: {}", r.runs.len(), first_line(e, 160))
        }
        Some(e) => format!("failed after {} steps: {}", r.steps_done, first_line(e, 160)),
    };
    let params = match (r.trainable_params, r.base_params) {
        (Some(t), Some(b)) if b > 0 => format!("{} ({} base)", thousands(t), thousands(b)),
        (Some(t), _) => thousands(t),
        _ => "–".into(),
    };
    let eval = match &r.stats {
        Some(s) => eval_cell(s.eval_loss_start, s.eval_loss_end),
        None => eval_cell(r.eval_loss_start.map(one), r.eval_loss_end.map(one)),
    };
    // With seeds: mean ± std over the runs that finished.
    let loss = |plain: Option<f64>, spread: Option<Option<MeanStd>>| match spread {
        Some(m) => or_dash(m, |m| m.format(4)),
        None => or_dash(plain, |l| format!("{l:.4}")),
    };
    vec![
        r.name.clone(),
        plugin,
        r.config.clone(),
        status,
        or_dash(r.layers, |n| n.to_string()),
        params,
        loss(r.final_loss, r.stats.as_ref().map(|s| s.final_loss)),
        loss(r.mean_loss, r.stats.as_ref().map(|s| s.mean_loss)),
        eval,
        loss(r.validation_loss, r.stats.as_ref().map(|s| s.validation_loss)),
        or_dash(r.seconds_per_step, |s| format!("{s:.3} s")),
        or_dash(r.peak_memory, |p| human_bytes(p.bytes)),
        or_dash(r.adapter_bytes, human_bytes),
    ]
}

/// The message's first line, at most `max` characters.
fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() > max {
        format!("{}…", line.chars().take(max).collect::<String>())
    } else {
        line.to_string()
    }
}

fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn data_uri(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("data:image/png;base64,{}", STANDARD.encode(&bytes)))
}

/// The loss curves of every strategy with a finite loss, one colour each (with `seeds`, a curve
/// per run in its strategy's colour); `false` when there is none to draw.
fn write_plot(outcome: &CompareOutcome, path: &Path) -> anyhow::Result<bool> {
    let mut named: Vec<(String, [u8; 3], &[graft_trainer::losslog::LossEntry])> = Vec::new();
    for (i, r) in outcome.strategies.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        named.push((r.name.clone(), colour, r.losses.as_slice()));
        for run in &r.runs {
            named.push((format!("{} seed {}", r.name, run.seed.unwrap_or_default()), colour, run.losses.as_slice()));
        }
    }
    let curves: Vec<(&str, [u8; 3], &[graft_trainer::losslog::LossEntry])> =
        named.iter().filter(|(_, _, l)| l.iter().any(|e| !e.skipped && e.loss.is_finite())).map(|(n, c, l)| (n.as_str(), *c, *l)).collect();
    if curves.is_empty() {
        return Ok(false);
    }
    plot_many(&curves, path)?;
    Ok(true)
}

/// The grid of samples (base model first) with its header row and column, `false` when there
/// are no prompts.
fn write_grid(outcome: &CompareOutcome, path: &Path) -> anyhow::Result<bool> {
    if outcome.prompts.is_empty() {
        return Ok(false);
    }
    let dir = &outcome.output_dir;
    let row = |samples: &[PathBuf]| -> anyhow::Result<Vec<Option<RgbImage>>> {
        (0..outcome.prompts.len())
            .map(|i| match samples.get(i) {
                Some(s) => Ok(Some(image::open(dir.join(s)).with_context(|| format!("cannot read sample {}", s.display()))?.to_rgb8())),
                None => Ok(None),
            })
            .collect()
    };
    let labels = grid_row_labels(outcome);
    let mut rows = vec![(labels[0].clone(), row(&outcome.base_samples)?)];
    for (r, label) in outcome.strategies.iter().zip(&labels[1..]) {
        rows.push((label.clone(), row(&r.samples)?));
    }
    // The style to reach: training images, each fitted into the samples' size.
    if let Some(reference) = outcome.style_reference.as_ref().filter(|r| !r.examples.is_empty()) {
        let w = outcome.prompts.iter().map(|p| p.width as u32).max().unwrap_or(64);
        let h = outcome.prompts.iter().map(|p| p.height as u32).max().unwrap_or(64);
        let fitted = (0..outcome.prompts.len())
            .map(|i| {
                let path = reference.examples.get(i)?;
                match image::open(path) {
                    Ok(img) => Some(fit(&img.to_rgb8(), w, h)),
                    Err(e) => {
                        tracing::warn!("grid: training image {} left grey: {e}", path.display());
                        None
                    }
                }
            })
            .collect();
        rows.push((TRAINING_ROW.to_string(), fitted));
    }
    let headers: Vec<String> = outcome.prompts.iter().enumerate().map(|(i, p)| format!("{} {}", i + 1, p.prompt)).collect();
    let grid = crate::compare::grid::labelled_grid(&headers, &rows, MISSING_CELL);
    write_rgb_png(path, &grid, None)?;
    Ok(true)
}

/// The name of the base model's row.
pub const BASE_ROW: &str = "base (before)";
/// The name of the grid's last row: training images, the style to reach.
pub const TRAINING_ROW: &str = "training (style)";

/// `img` scaled to fit in `w` x `h`, keeping its aspect ratio (area averages down, nearest up).
fn fit(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let scale = (w as f64 / img.width().max(1) as f64).min(h as f64 / img.height().max(1) as f64);
    let (nw, nh) = (((img.width() as f64 * scale).round() as u32).max(1), ((img.height() as f64 * scale).round() as u32).max(1));
    if scale < 1.0 {
        image::imageops::thumbnail(img, nw, nh)
    } else {
        image::imageops::resize(img, nw, nh, image::imageops::FilterType::Nearest)
    }
}

/// Whether a row's samples are in the grid (a row of seeds shows its first seed's samples,
/// there when that run got to them).
fn shown(r: &StrategyResult) -> bool {
    if r.runs.is_empty() {
        r.ok()
    } else {
        !r.samples.is_empty()
    }
}

fn row_names(outcome: &CompareOutcome) -> Vec<String> {
    let mut rows = vec![BASE_ROW.to_string()];
    rows.extend(outcome.strategies.iter().map(|r| if shown(r) { r.name.clone() } else { format!("{} (failed: grey)", r.name) }));
    if outcome.style_reference.as_ref().is_some_and(|r| !r.examples.is_empty()) {
        rows.push(format!("{TRAINING_ROW}: training images, not matched to the prompts"));
    }
    rows
}

/// The row labels drawn into the grid.
fn grid_row_labels(outcome: &CompareOutcome) -> Vec<String> {
    let mut rows = vec![BASE_ROW.to_string()];
    rows.extend(outcome.strategies.iter().map(|r| if shown(r) { r.name.clone() } else { format!("{} (failed)", r.name) }));
    rows
}

/// The style table's header cells.
pub const STYLE_HEADER: [&str; 6] = ["strategy", "total", "palette", "edge density", "stroke width", "composition"];

/// The style table's rows: each strategy's score before → after training, total first, then
/// each part (with `seeds`, `after` is mean ± std over the runs that finished); a missing
/// score is `–`, and the row's note says why.
pub fn style_rows(outcome: &CompareOutcome) -> Vec<(Vec<String>, Option<String>)> {
    let mut rows = Vec::new();
    for r in &outcome.strategies {
        let before = r.style.before.map(|s| s.parts());
        let after_spread = r.stats.as_ref().and_then(|s| s.style_after.as_ref()).map(|s| s.parts());
        let after = r.style.after.map(|s| s.parts());
        let mut cells = vec![r.name.clone()];
        // Total first, then the parts.
        for k in [4, 0, 1, 2, 3] {
            let b = before.map(|p| format!("{:.3}", p[k].1)).unwrap_or_else(|| "–".into());
            let a = match (&after_spread, after) {
                (Some(p), _) => p[k].1.map(|m| m.format(3)).unwrap_or_else(|| "–".into()),
                (None, Some(p)) => format!("{:.3}", p[k].1),
                (None, None) => "–".into(),
            };
            cells.push(format!("{b} → {a}"));
        }
        rows.push((cells, r.style.note.clone()));
    }
    rows
}

/// What the style table is measured against, and how to read it.
fn style_intro(outcome: &CompareOutcome) -> String {
    let Some(reference) = &outcome.style_reference else {
        return outcome.style_note.clone().unwrap_or_else(|| "No style score.".into());
    };
    let st = &reference.stats;
    let used = if st.images < reference.found {
        format!("{} of the {} training images", st.images, reference.found)
    } else {
        format!("the {} training images", st.images)
    };
    let lines = match st.stroke_width {
        Some(w) => format!("lines {w:.1} px wide at {} px", crate::compare::style::ANALYSIS_SIZE),
        None => "no line pixels".into(),
    };
    let centre = match (st.centre, st.spread) {
        (Some((x, y)), Some(s)) => format!("ink centred at ({x:.2}, {y:.2}) of the frame, spread {s:.2}"),
        _ => "no ink".into(),
    };
    let seeds = if outcome.seeds.is_some() {
        " With seeds, after is the mean ± std over the runs that finished; before is one measurement (the base model's samples \
         use the same prompts and sample seeds for every run)."
    } else {
        ""
    };
    format!(
        "How far each strategy's samples are from the style of {used} in `{}` (edge density {:.3}, {lines}, {centre}), \
         before training (the base model's samples, the same prompts and sample seeds) → after. Each part is in [0, 1], \
         lower is closer; the total is their mean. No pretrained network: palette is the distance between colour \
         histograms, edge density and stroke width the relative difference of the line statistics, composition the \
         offset of the ink's centre of mass. What each part misses (photos, busy or dark backgrounds, text): \
         docs/STYLE_SCORE.md.{seeds}",
        reference.source, st.edge_density
    )
}

fn memory_note(outcome: &CompareOutcome) -> &'static str {
    if outcome.strategies.iter().all(|r| r.peak_memory.is_none()) {
        "Peak memory: not measured on this system (it reads Linux's /proc/self/status)."
    } else if outcome.peak_per_strategy {
        "Peak memory: the process's peak resident set (VmHWM), reset before each strategy; it includes the model, \
         loaded once for all. GPU memory is not measured."
    } else {
        "Peak memory: the process's peak resident set (VmHWM) since it started: resetting it between strategies \
         (/proc/self/clear_refs) was not allowed, so later rows include earlier strategies' peaks. GPU memory is not measured."
    }
}

fn summary_line(outcome: &CompareOutcome) -> String {
    if let Some(seeds) = &outcome.seeds {
        let list: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        return format!(
            "Model `{}` on {} (loaded once in {:.1} s); seeds {}: every strategy is trained once per seed, {} steps \
             each run. With one seed, every strategy sees the same data order, noise and timesteps. The eval loss is \
             one fixed batch, noise and timesteps before and after training; which batch, and its latents, follow \
             the run's seed, so its spread includes the data's. Losses are the mean ± sample standard \
             deviation (n − 1) over the seeds whose run finished: a difference between strategies smaller than that \
             spread is not a difference.",
            outcome.model,
            outcome.device,
            outcome.load_seconds,
            list.join(", "),
            outcome.steps
        );
    }
    format!(
        "Model `{}` on {} (loaded once in {:.1} s); seed {}, {} steps per strategy. Every strategy sees the same data \
         order, noise and timesteps; its samples use the same prompts and seeds. The eval loss is one fixed batch, \
         noise and timesteps before and after training.",
        outcome.model, outcome.device, outcome.load_seconds, outcome.seed, outcome.steps
    )
}

/// Which run of each strategy the grid shows (empty without `seeds`).
fn samples_note(outcome: &CompareOutcome) -> String {
    match &outcome.seeds {
        Some(seeds) if seeds.len() > 1 => format!(
            "Each strategy's row shows its run with the first seed ({}); every run's samples are in samples/seed-N/ \
             (same prompts and sample seeds).",
            outcome.seed
        ),
        _ => String::new(),
    }
}

/// The loss logs of a strategy, relative to the report folder.
fn loss_logs(r: &StrategyResult) -> Vec<String> {
    if r.runs.is_empty() {
        return vec![format!("strategies/{}/loss.jsonl", r.name)];
    }
    r.runs.iter().map(|run| format!("strategies/{}/{}/loss.jsonl", r.name, seed_dir(run.seed.unwrap_or_default()))).collect()
}

fn prompt_line(p: &crate::compare::run::PromptInfo) -> String {
    format!("{} (seed {}, {}x{}, {} steps)", p.prompt, p.seed, p.width, p.height, p.steps)
}

fn markdown(outcome: &CompareOutcome, has_plot: bool, has_grid: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# graft compare\n\n{}\n", summary_line(outcome));
    let header = header_of(outcome);
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for r in &outcome.strategies {
        let cells: Vec<String> = table_row(r).iter().map(|c| md_cell(c)).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(md, "\n{}\n", memory_note(outcome));
    let seeds = seed_rows(outcome);
    if !seeds.is_empty() {
        md.push_str("## Seeds\n\nEvery run, the numbers the table's mean ± std is made of:\n\n");
        let _ = writeln!(md, "| {} |", SEED_HEADER.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(SEED_HEADER.len()));
        for row in seeds {
            let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
        md.push('\n');
    }

    md.push_str("## Style\n\n");
    let _ = writeln!(md, "{}\n", style_intro(outcome));
    if outcome.style_reference.is_some() {
        let _ = writeln!(md, "| {} |", STYLE_HEADER.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(STYLE_HEADER.len()));
        let mut notes = Vec::new();
        for (cells, note) in style_rows(outcome) {
            let cells: Vec<String> = cells.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(md, "| {} |", cells.join(" | "));
            if let Some(n) = note {
                notes.push(format!("- `{}`: {}", cells[0], n.replace('\n', " ")));
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(md, "\n{}", notes.join("\n"));
        }
        md.push('\n');
    }

    md.push_str("## Loss\n\n");
    if has_plot {
        let _ = writeln!(md, "![loss curves]({LOSS_PNG})\n\nThin light lines: the loss of each step; thick lines: its moving average.\n");
    } else {
        md.push_str("No strategy completed a step: nothing to plot.\n\n");
    }

    md.push_str("## Samples\n\n");
    if has_grid {
        let _ = writeln!(md, "![samples]({GRID_PNG})\n");
        let _ = writeln!(md, "Rows, top to bottom: {}.\n", row_names(outcome).join(", "));
        let note = samples_note(outcome);
        if !note.is_empty() {
            let _ = writeln!(md, "{note}\n");
        }
        md.push_str("Columns, left to right:\n\n");
        for (i, p) in outcome.prompts.iter().enumerate() {
            let _ = writeln!(md, "{}. {}", i + 1, md_cell(&prompt_line(p)));
        }
        md.push('\n');
    } else {
        md.push_str("No sample prompts (set `sample_prompts` or `prompts` in the config).\n\n");
    }

    let failed: Vec<&StrategyResult> = outcome.strategies.iter().filter(|r| !r.ok()).collect();
    if !failed.is_empty() {
        md.push_str("## Failures\n\n");
        for r in failed {
            let _ = writeln!(md, "- `{}`: {}", r.name, r.error.as_deref().unwrap_or_default().replace('\n', " "));
        }
        md.push('\n');
    }

    md.push_str("## Files\n\n");
    for r in &outcome.strategies {
        let files: Vec<String> = r.exports.iter().map(|p| format!("[{}]({})", p.display(), p.display())).collect();
        let files = if files.is_empty() { "no adapter".to_string() } else { files.join(", ") };
        let logs: Vec<String> = loss_logs(r).iter().map(|l| format!("[{l}]({l})")).collect();
        let what = if logs.len() == 1 { "loss log" } else { "loss logs" };
        let _ = writeln!(md, "- `{}`: {}; {what} {}", r.name, files, logs.join(", "));
    }
    let _ = writeln!(md, "- every number above: [{SUMMARY_JSON}]({SUMMARY_JSON})");
    md
}

/// report.html from its template (report.html.jinja), which escapes every value it prints.
fn html(outcome: &CompareOutcome, plot: Option<String>, grid: Option<String>) -> anyhow::Result<String> {
    let rows: Vec<Value> = outcome.strategies.iter().map(|r| context! { cells => table_row(r), ok => r.ok() }).collect();
    let failures: Vec<Value> = outcome
        .strategies
        .iter()
        .filter(|r| !r.ok())
        .map(|r| context! { name => r.name, error => r.error.as_deref().unwrap_or_default() })
        .collect();
    let files: Vec<Value> = outcome
        .strategies
        .iter()
        .map(|r| context! { name => r.name, exports => r.exports.iter().map(|p| p.display().to_string()).collect::<Vec<_>>() })
        .collect();
    // The data URIs are ours (base64 of our PNGs): not escaped, so they stay byte for byte.
    let uri = |u: Option<String>| u.map(Value::from_safe_string).unwrap_or_default();
    let style = style_rows(outcome);
    let style_notes: Vec<Value> = style.iter().filter_map(|(c, n)| Some(context! { name => c[0], note => n.as_ref()? })).collect();
    let style: Vec<Value> = style.into_iter().map(|(cells, _)| context! { cells }).collect();
    let ctx = context! {
        summary => summary_line(outcome),
        style_intro => style_intro(outcome).replace('`', ""),
        style_header => STYLE_HEADER,
        style_rows => if outcome.style_reference.is_some() { style } else { Vec::new() },
        style_notes => if outcome.style_reference.is_some() { style_notes } else { Vec::new() },
        header => header_of(outcome),
        rows,
        seed_header => SEED_HEADER,
        seed_rows => seed_rows(outcome),
        samples_note => samples_note(outcome),
        memory_note => memory_note(outcome),
        plot => uri(plot),
        grid => uri(grid),
        row_names => row_names(outcome),
        prompts => outcome.prompts.iter().map(prompt_line).collect::<Vec<_>>(),
        failures,
        files,
    };
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.add_template(REPORT_HTML, include_str!("report.html.jinja")).context("the report.html template")?;
    env.get_template(REPORT_HTML)?.render(ctx).context("cannot render report.html")
}

/// Writes the report files into the outcome's folder and records them in
/// `outcome.report_files`; returns the path of `report.html`.
pub fn write(outcome: &mut CompareOutcome) -> anyhow::Result<PathBuf> {
    let dir = outcome.output_dir.clone();
    let plot_path = dir.join(LOSS_PNG);
    let grid_path = dir.join(GRID_PNG);
    let has_plot = write_plot(outcome, &plot_path)?;
    let has_grid = write_grid(outcome, &grid_path)?;
    let mut files: Vec<PathBuf> = Vec::new();
    if has_plot {
        files.push(LOSS_PNG.into());
    }
    if has_grid {
        files.push(GRID_PNG.into());
    }
    files.extend([REPORT_MD, REPORT_HTML, SUMMARY_JSON].map(PathBuf::from));
    outcome.report_files = files;

    let write_file = |name: &str, text: &str| -> anyhow::Result<()> {
        graft_formats::write::write_atomic(&dir.join(name), text.as_bytes())
            .with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    write_file(REPORT_MD, &markdown(outcome, has_plot, has_grid))?;
    let plot = if has_plot { Some(data_uri(&plot_path)?) } else { None };
    let grid = if has_grid { Some(data_uri(&grid_path)?) } else { None };
    write_file(REPORT_HTML, &html(outcome, plot, grid)?)?;
    write_file(SUMMARY_JSON, &serde_json::to_string_pretty(outcome)?)?;
    Ok(dir.join(REPORT_HTML))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_escaped() {
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }

    #[test]
    fn failed_row_keeps_what_it_had() {
        let r = StrategyResult {
            name: "x".into(),
            plugin: "nope".into(),
            config: "{}".into(),
            error: Some("no plugin with id `nope`\nmore".into()),
            ..Default::default()
        };
        let row = table_row(&r);
        assert_eq!(row.len(), table_header(10).len());
        assert_eq!(row[3], "failed after 0 steps: no plugin with id `nope`");
        assert_eq!(row[6], "–");
    }

    fn outcome() -> CompareOutcome {
        CompareOutcome {
            output_dir: "out".into(),
            model: "m<1>".into(),
            seed: 1,
            seeds: None,
            steps: 2,
            loss_window: 2,
            device: "cpu".into(),
            load_seconds: 0.5,
            base_samples: vec![],
            prompts: vec![crate::compare::run::PromptInfo { prompt: "a <b>cat</b> & \"dog\"".into(), seed: 3, width: 64, height: 64, steps: 2 }],
            strategies: vec![
                StrategyResult {
                    name: "ok".into(),
                    plugin: "lora".into(),
                    config: "{\"rank\":2}".into(),
                    exports: vec!["strategies/ok/ok.safetensors".into(), "strategies/ok/ok.peft.safetensors".into()],
                    ..Default::default()
                },
                StrategyResult {
                    name: "bad".into(),
                    plugin: "nope".into(),
                    config: "{}".into(),
                    error: Some("<script>x</script>".into()),
                    ..Default::default()
                },
            ],
            peak_per_strategy: false,
            report_files: vec![],
            style_reference: None,
            style_note: None,
        }
    }

    /// With seeds: the loss cells are mean ± sample std of the runs that finished, the header
    /// says so, every run has a row of its own, and the text says what the spread means.
    #[test]
    fn seeded_rows_show_mean_and_spread() {
        let entry: crate::compare::config::StrategyEntry = toml::from_str("name = \"l\"\nplugin = \"lora\"").unwrap();
        let run = |seed: u64, loss: f64, eval_end: f64| StrategyResult {
            seed: Some(seed),
            final_loss: Some(loss),
            mean_loss: Some(loss),
            eval_loss_start: Some(0.5),
            eval_loss_end: Some(eval_end),
            validation_loss: Some(loss + 0.125),
            steps_done: 4,
            samples: vec![format!("samples/seed-{seed}/l_00_1.png").into()],
            ..Default::default()
        };
        let failed = StrategyResult { seed: Some(3), steps_done: 2, error: Some("boom".into()), ..Default::default() };
        let row = crate::compare::run::aggregate(&entry, vec![run(1, 0.25, 0.4), run(2, 0.35, 0.2), failed]);
        let mut o = outcome();
        o.seeds = Some(vec![1, 2, 3]);
        o.strategies = vec![row];
        let header = header_of(&o);
        assert_eq!(header[6], "final loss, mean ± std");
        let cells = table_row(&o.strategies[0]);
        // 0.25 and 0.35: mean 0.3, std |a − b| / sqrt(2) = 0.0707; the failed seed does not count.
        assert_eq!(cells[6], "0.3000 ± 0.0707");
        assert_eq!(cells[7], "0.3000 ± 0.0707");
        assert_eq!(cells[8], "0.5000 ± 0.0000 → 0.3000 ± 0.1414");
        assert_eq!((header[9].as_str(), cells[9].as_str()), ("validation loss, mean ± std", "0.4250 ± 0.0707"));
        assert_eq!(o.strategies[0].validation_loss, Some(0.425));
        assert_eq!(cells[3], "1 of 3 seeds failed: seed 3 (after 2 steps): boom");
        let s = o.strategies[0].stats.clone().unwrap();
        assert_eq!((s.final_loss.unwrap().n, o.strategies[0].samples[0].to_str().unwrap()), (2, "samples/seed-1/l_00_1.png"));
        let seeds = seed_rows(&o);
        assert_eq!(seeds.len(), 3);
        assert_eq!(seeds[1], ["l", "2", "ok", "0.3500", "0.3500", "0.5000 → 0.2000", "0.4750"]);
        assert!(seeds[2][2].starts_with("failed after 2 steps: "), "{:?}", seeds[2]);
        let md = markdown(&o, false, true);
        assert!(md.contains("smaller than that spread is not a difference"), "{md}");
        assert!(md.contains("## Seeds") && md.contains("| l | 1 | ok | 0.2500 |"), "{md}");
        assert!(md.contains("first seed (1)") && md.contains("Rows, top to bottom: base (before), l."), "{md}");
        assert!(md.contains("[strategies/l/seed-3/loss.jsonl](strategies/l/seed-3/loss.jsonl)"), "{md}");
        let h = html(&o, None, Some("data:image/png;base64,AAAA".into())).unwrap();
        assert!(h.contains("<h2>Seeds</h2>") && h.contains("<td>0.3000 ± 0.0707</td>") && h.contains("not a difference"), "{h}");
    }

    /// The style table: before → after for the total and each part; with seeds, after is
    /// mean ± std; a missing score is a dash and its reason is listed.
    #[test]
    fn style_rows_show_before_and_after() {
        use crate::compare::run::{Style, StyleReference};
        use crate::compare::style::{SetSummary, StyleScore};
        let score = |v: f64| StyleScore { palette: v, edge_density: v + 0.1, stroke_width: v + 0.2, composition: v + 0.3, total: v + 0.15 };
        let mut o = outcome();
        o.style_reference = Some(StyleReference {
            source: "data".into(),
            found: 300,
            stats: SetSummary { images: 256, edge_density: 0.05, stroke_width: Some(3.0), centre: Some((0.5, 0.45)), spread: Some(0.1) },
            examples: vec!["data/a.png".into()],
        });
        o.strategies[0].style = Style { before: Some(score(0.5)), after: Some(score(0.25)), note: None };
        o.strategies[1].style = Style { before: Some(score(0.5)), after: None, note: Some("no samples: the strategy failed".into()) };
        let rows = style_rows(&o);
        assert_eq!(rows[0].0, ["ok", "0.650 → 0.400", "0.500 → 0.250", "0.600 → 0.350", "0.700 → 0.450", "0.800 → 0.550"]);
        assert_eq!(rows[1].0[1], "0.650 → –");
        assert_eq!(rows[1].1.as_deref(), Some("no samples: the strategy failed"));
        let md = markdown(&o, false, false);
        assert!(md.contains("## Style") && md.contains("256 of the 300 training images in `data`"), "{md}");
        assert!(md.contains("| ok | 0.650 → 0.400 | 0.500 → 0.250 |") && md.contains("- `bad`: no samples: the strategy failed"), "{md}");
        let with_grid = markdown(&o, false, true);
        assert!(
            with_grid.contains("Rows, top to bottom: base (before), ok, bad (failed: grey), training (style): training images"),
            "{with_grid}"
        );
        let h = html(&o, None, None).unwrap();
        assert!(h.contains("<td>0.650 → 0.400</td>") && h.contains("<li><code>bad</code>: no samples: the strategy failed</li>"), "{h}");
        // With seeds: after is mean ± std of the runs'.
        let entry: crate::compare::config::StrategyEntry = toml::from_str("name = \"l\"\nplugin = \"lora\"").unwrap();
        let run = |seed: u64, v: f64| StrategyResult {
            seed: Some(seed),
            samples: vec!["x.png".into()],
            style: Style { before: Some(score(0.5)), after: Some(score(v)), note: None },
            ..Default::default()
        };
        let row = crate::compare::run::aggregate(&entry, vec![run(1, 0.2), run(2, 0.3)]);
        assert_eq!(row.style.after.map(|s| (s.palette * 1e9).round() / 1e9), Some(0.25));
        let st = row.stats.as_ref().unwrap();
        assert_eq!((st.style_before.as_ref().unwrap().total.unwrap().n, st.style_after.as_ref().unwrap().total.unwrap().n), (1, 2));
        o.seeds = Some(vec![1, 2]);
        o.strategies = vec![row];
        assert_eq!(style_rows(&o)[0].0[2], "0.500 → 0.250 ± 0.071");
        // No reference: the reason instead of a table.
        o.style_reference = None;
        o.style_note = Some("no style score: no training images".into());
        let md = markdown(&o, false, false);
        assert!(md.contains("## Style\n\nno style score: no training images\n\n## Loss"), "{md}");
    }

    #[test]
    fn training_images_fit_the_sample_cells() {
        let img = RgbImage::from_fn(128, 128, |x, _| image::Rgb([if x < 64 { 0 } else { 200 }, 0, 0]));
        let f = fit(&img, 64, 48);
        assert_eq!(f.dimensions(), (48, 48));
        assert_eq!((f.get_pixel(0, 0).0[0], f.get_pixel(47, 47).0[0]), (0, 200));
        assert_eq!(fit(&RgbImage::new(32, 16), 64, 48).dimensions(), (64, 32));
    }

    /// Every value is escaped, the data URIs are not; failed cells get their class.
    #[test]
    fn html_escapes_every_value_but_the_data_uris() {
        let h = html(&outcome(), Some("data:image/png;base64,iVBO+/=".into()), None).unwrap();
        assert!(h.starts_with("<!DOCTYPE html>\n<html lang=\"en\">\n"), "{h}");
        assert!(h.contains("<img alt=\"loss curves\" src=\"data:image/png;base64,iVBO+/=\">\n"), "{h}");
        assert!(h.contains("<p>No sample prompts.</p>"), "{h}");
        assert!(h.contains("<tr><td>ok</td><td>lora</td><td><code>{&quot;rank&quot;:2}</code></td><td>ok</td>"), "{h}");
        assert!(h.contains("<td class=\"failed\">failed after 0 steps: &lt;script&gt;x&lt;&#x2f;script&gt;</td>"), "{h}");
        assert!(h.contains("<li><code>bad</code>: &lt;script&gt;"), "{h}");
        assert!(h.contains("<li><code>bad</code>: no adapter</li>"), "{h}");
        assert!(h.contains("<li><code>ok</code>: <code>strategies&#x2f;ok&#x2f;ok.safetensors</code>, <code>strategies&#x2f;ok&#x2f;ok.peft.safetensors</code></li>"), "{h}");
        assert!(!h.contains("<script>") && !h.contains("<1>"), "{h}");
        assert_eq!(h.matches("<tr>").count(), 3);
        assert!(h.ends_with("</ul>\n</body>\n</html>\n"), "{h}");
        let h = html(&outcome(), None, Some("data:image/png;base64,AAAA".into())).unwrap();
        assert!(h.contains("<li>a &lt;b&gt;cat&lt;&#x2f;b&gt; &amp; &quot;dog&quot; (seed 3, 64x64, 2 steps)</li>"), "{h}");
        assert!(h.contains("<p>No strategy completed a step: nothing to plot.</p>"), "{h}");
    }
}
