//! The report of a comparison: `report.md`, a self-contained `report.html` (the plot and the
//! grid inside it as base64 PNG data URIs), `loss.png`, `grid.png` and `summary.json`.
//!
//! The grid has a row per strategy under the base model's row and a column per prompt; a
//! strategy without samples (it failed) gets a row of grey cells, so rows keep their meaning.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use image::RgbImage;
use minijinja::{context, Environment, Value};

use crate::compare::memory::human_bytes;
use crate::compare::run::{CompareOutcome, StrategyResult};
use graft_trainer::losslog::{plot_many, PALETTE};
use graft_trainer::samples::{grid_image, write_rgb_png};

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
        "time / step",
        "peak memory",
        "adapter size",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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
        Some(e) => format!("failed after {} steps: {}", r.steps_done, first_line(e, 160)),
    };
    let params = match (r.trainable_params, r.base_params) {
        (Some(t), Some(b)) if b > 0 => format!("{} ({} base)", thousands(t), thousands(b)),
        (Some(t), _) => thousands(t),
        _ => "–".into(),
    };
    let eval = match (r.eval_loss_start, r.eval_loss_end) {
        (Some(a), Some(b)) => format!("{a:.4} → {b:.4}"),
        (Some(a), None) => format!("{a:.4} → –"),
        _ => "–".into(),
    };
    vec![
        r.name.clone(),
        plugin,
        r.config.clone(),
        status,
        or_dash(r.layers, |n| n.to_string()),
        params,
        or_dash(r.final_loss, |l| format!("{l:.4}")),
        or_dash(r.mean_loss, |l| format!("{l:.4}")),
        eval,
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

/// The loss curves of every strategy with a finite loss, one colour each; `false` when there
/// is none to draw.
fn write_plot(outcome: &CompareOutcome, path: &Path) -> anyhow::Result<bool> {
    let curves: Vec<(&str, [u8; 3], &[graft_trainer::losslog::LossEntry])> = outcome
        .strategies
        .iter()
        .enumerate()
        .filter(|(_, r)| r.losses.iter().any(|e| !e.skipped && e.loss.is_finite()))
        .map(|(i, r)| (r.name.as_str(), PALETTE[i % PALETTE.len()], r.losses.as_slice()))
        .collect();
    if curves.is_empty() {
        return Ok(false);
    }
    plot_many(&curves, path)?;
    Ok(true)
}

/// The grid of samples (base model first), `false` when there are no prompts.
fn write_grid(outcome: &CompareOutcome, path: &Path) -> anyhow::Result<bool> {
    if outcome.prompts.is_empty() {
        return Ok(false);
    }
    let dir = &outcome.output_dir;
    let row = |samples: &[PathBuf]| -> anyhow::Result<Vec<RgbImage>> {
        outcome
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| match samples.get(i) {
                Some(s) => Ok(image::open(dir.join(s)).with_context(|| format!("cannot read sample {}", s.display()))?.to_rgb8()),
                None => Ok(RgbImage::from_pixel(p.width as u32, p.height as u32, image::Rgb(MISSING_CELL))),
            })
            .collect()
    };
    let mut images = row(&outcome.base_samples)?;
    for r in &outcome.strategies {
        images.extend(row(&r.samples)?);
    }
    let grid = grid_image(&images, outcome.prompts.len())?;
    write_rgb_png(path, &grid, None)?;
    Ok(true)
}

fn row_names(outcome: &CompareOutcome) -> Vec<String> {
    let mut rows = vec!["base model".to_string()];
    rows.extend(outcome.strategies.iter().map(|r| if r.ok() { r.name.clone() } else { format!("{} (failed: grey)", r.name) }));
    rows
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
    format!(
        "Model `{}` on {} (loaded once in {:.1} s); seed {}, {} steps per strategy. Every strategy sees the same data \
         order, noise and timesteps; its samples use the same prompts and seeds. The eval loss is one fixed batch, \
         noise and timesteps before and after training.",
        outcome.model, outcome.device, outcome.load_seconds, outcome.seed, outcome.steps
    )
}

fn prompt_line(p: &crate::compare::run::PromptInfo) -> String {
    format!("{} (seed {}, {}x{}, {} steps)", p.prompt, p.seed, p.width, p.height, p.steps)
}

fn markdown(outcome: &CompareOutcome, has_plot: bool, has_grid: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# graft compare\n\n{}\n", summary_line(outcome));
    let header = table_header(outcome.loss_window);
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for r in &outcome.strategies {
        let cells: Vec<String> = table_row(r).iter().map(|c| md_cell(c)).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(md, "\n{}\n", memory_note(outcome));

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
        let _ = writeln!(md, "- `{}`: {}; loss log [strategies/{}/loss.jsonl](strategies/{}/loss.jsonl)", r.name, files, r.name, r.name);
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
    let ctx = context! {
        summary => summary_line(outcome),
        header => table_header(outcome.loss_window),
        rows,
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
        }
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
