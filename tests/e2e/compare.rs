//! `graft compare` and `graft demo` end to end on the tiny model: the report has every table
//! row, the loss plot and the sample grid (parsed and checked), failing strategies are reported
//! while the others run, the base weights are put back between strategies (an eject under a fuse
//! is refused, dropping a trainer takes its overrides out), and the demo's
//! dataset generator is deterministic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use graft_host::compare::config::CompareConfig;
use graft_host::compare::report::{self, MISSING_CELL};
use graft_host::compare::style;
use graft_host::plugins::PluginDirArgs;
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_tests::{base64_decode, build_plugins, graft, scratch, tiny_model, write_shapes_dataset};
use graft_trainer::trainer::Trainer;

fn plugins() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_plugins(&["lora", "attention-gate", "progressive-fusion", "fault-plugin"])).clone()
}

fn plugin_args() -> PluginDirArgs {
    PluginDirArgs { plugins: vec![plugins()], plugin_config: None, no_default_plugins: true }
}

const W: u32 = 64;
const H: u32 = 48;

/// Three strategies that run (two identical LoRAs around an attention gate, which trains base
/// weights) and four that fail: an unknown plugin, a bad plugin config, a plan the host rejects
/// (the fault plugin declares no optimizer group), and a LoRA whose learning rate makes it
/// diverge mid-run (non-finite losses, `max_bad_steps = 2`).
fn config_text() -> String {
    format!(
        "model = {model:?}\noutput_dir = \"report\"\nseed = 7\nsteps = 4\nloss_window = 2\nmax_bad_steps = 2\n\
         prompts = [\"a pink star outline, line art --w {W} --h {H} --s 2\", \"a mint green square --w {W} --h {H} --s 2 --d 99\"]\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\n\
         [[strategies]]\nname = \"lora-a\"\nplugin = \"lora\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n\n\
         [[strategies]]\nname = \"gate\"\nplugin = \"attention-gate\"\nconfig = {{ rank = 2, adapter_lr = 0.01, base_lr = 0.01 }}\n\n\
         [[strategies]]\nname = \"lora-b\"\nplugin = \"lora\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n\n\
         [[strategies]]\nname = \"missing\"\nplugin = \"no-such-plugin\"\n\n\
         [[strategies]]\nname = \"bad-config\"\nplugin = \"lora\"\nconfig = {{ rnak = 4 }}\n\n\
         [[strategies]]\nname = \"bad-plan\"\nplugin = \"fault-plugin\"\nconfig = {{ fault = \"none\" }}\n\n\
         [[strategies]]\nname = \"diverges\"\nplugin = \"lora\"\nconfig = {{ rank = 2, unet_lr = 1e30 }}\n",
        model = tiny_model().to_str().unwrap()
    )
}

/// The cells of the rows of the first markdown table in `md` (header excluded).
fn md_table(md: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let lines: Vec<&str> = md.lines().skip_while(|l| !l.starts_with("| strategy |")).take_while(|l| l.starts_with('|')).collect();
    let split = |l: &str| -> Vec<String> {
        // Split on `|` not escaped as `\|`.
        let inner = l.trim().trim_start_matches('|').trim_end_matches('|');
        let mut cells = vec![String::new()];
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    cells.last_mut().unwrap().push('|');
                    chars.next();
                }
                '|' => cells.push(String::new()),
                _ => cells.last_mut().unwrap().push(c),
            }
        }
        cells.into_iter().map(|c| c.trim().to_string()).collect()
    };
    assert!(lines.len() >= 2, "no table in the report:\n{md}");
    assert!(lines[1].starts_with("|---"), "second line is the separator: {}", lines[1]);
    (split(lines[0]), lines[2..].iter().map(|l| split(l)).collect())
}

/// The data URI image with alt text `alt` in the html, decoded.
fn html_image(html: &str, alt: &str) -> Vec<u8> {
    let tag = format!("<img alt=\"{alt}\" src=\"data:image/png;base64,");
    let start = html.find(&tag).unwrap_or_else(|| panic!("no `{alt}` data URI image in report.html")) + tag.len();
    let end = start + html[start..].find('"').unwrap();
    base64_decode(&html[start..end])
}

fn cell_of(row: &[String], header: &[String], name: &str) -> String {
    row[header.iter().position(|h| h.starts_with(name)).unwrap_or_else(|| panic!("no column `{name}`"))].clone()
}

#[test]
fn compare_reports_every_strategy_side_by_side() {
    let dir = scratch("compare_report");
    write_shapes_dataset(&dir.join("data"), 4, 64);
    let config_path = dir.join("compare.toml");
    std::fs::write(&config_path, config_text()).unwrap();
    let config = CompareConfig::from_file(&config_path).unwrap();
    let outcome = graft_host::compare::compare(&config, plugin_args(), true).unwrap();
    let out = dir.join("report");
    let names: Vec<&str> = outcome.strategies.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["lora-a", "gate", "lora-b", "missing", "bad-config", "bad-plan", "diverges"]);
    let by = |n: &str| outcome.strategies.iter().find(|r| r.name == n).unwrap();

    // The three good ones ran to the end; the failures say why.
    for n in ["lora-a", "gate", "lora-b"] {
        let r = by(n);
        assert!(r.ok(), "{n}: {:?}", r.error);
        assert_eq!((r.steps_done, r.losses.len(), r.samples.len()), (4, 4, 2), "{n}");
        assert!(r.adapter_bytes.unwrap() > 0 && !r.exports.is_empty(), "{n}");
        for f in &r.exports {
            assert!(out.join(f).is_file() && f.starts_with(format!("strategies/{n}")), "{n}: {}", f.display());
        }
    }
    let e = by("missing").error.clone().unwrap();
    assert!(e.contains("no-such-plugin") && e.contains("available"), "{e}");
    let e = by("bad-config").error.clone().unwrap();
    assert!(e.contains("rnak") && e.contains("invalid configuration"), "{e}");
    let e = by("bad-plan").error.clone().unwrap();
    assert!(e.contains("does not declare"), "{e}");
    // Diverged after its first step: what it did is kept (a partial curve), no samples or files.
    let r = by("diverges");
    let e = r.error.clone().unwrap();
    assert!(e.contains("non-finite") && e.contains("stopped at step 3"), "{e}");
    assert_eq!((r.steps_done, r.losses.len(), r.samples.len(), r.exports.len()), (3, 3, 0, 0));
    assert!(r.losses[0].loss.is_finite() && r.losses[2].skipped);
    assert!(r.layers.is_some() && r.trainable_params.is_some(), "it started before it failed");

    // Same seed, same noise, and the base weights the gate trained are put back: the second
    // LoRA retraces the first bit for bit, samples included.
    let (a, b, gate) = (by("lora-a"), by("lora-b"), by("gate"));
    assert!(gate.base_params.unwrap() > 0, "the gate trains base projections");
    assert_ne!(gate.eval_loss_end, gate.eval_loss_start);
    let without_time = |r: &graft_host::compare::StrategyResult| -> Vec<(u64, f64, f64, bool)> {
        r.losses.iter().map(|e| (e.step, e.loss, e.grad_norm, e.skipped)).collect()
    };
    assert_eq!(without_time(a), without_time(b));
    assert_eq!((a.eval_loss_start, a.eval_loss_end), (b.eval_loss_start, b.eval_loss_end));
    for (sa, sb) in a.samples.iter().zip(&b.samples) {
        let pa = image::open(out.join(sa)).unwrap().to_rgb8();
        let pb = image::open(out.join(sb)).unwrap().to_rgb8();
        assert_eq!(pa, pb, "{} vs {}", sa.display(), sb.display());
    }
    // Zero-initialised LoRA: at step 0 the model is the base model, so its eval loss is the
    // base's, and the gate (zero B) starts there too.
    assert_eq!(a.eval_loss_start, gate.eval_loss_start);

    // report.md: a row per strategy, in order, with the numbers of the outcome.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let (header, rows) = md_table(&md);
    assert_eq!(header.len(), 13, "{header:?}");
    assert_eq!(rows.len(), 7);
    for (row, r) in rows.iter().zip(&outcome.strategies) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        assert_eq!(row[0], r.name);
        let status = cell_of(row, &header, "status");
        if r.ok() {
            assert_eq!(status, "ok");
            let final_loss: f64 = cell_of(row, &header, "final loss").parse().unwrap();
            assert!((final_loss - r.final_loss.unwrap()).abs() < 1e-4);
            let mean: f64 = cell_of(row, &header, "mean loss (last 2)").parse().unwrap();
            let want = (r.losses[2].loss + r.losses[3].loss) / 2.0;
            assert!((mean - want).abs() < 1e-4, "{mean} vs {want}");
            let params = cell_of(row, &header, "trainable params");
            let n: u64 = params.split_whitespace().next().unwrap().replace(',', "").parse().unwrap();
            assert_eq!(n, r.trainable_params.unwrap());
            assert!(n > 0);
            let layers: usize = cell_of(row, &header, "layers").parse().unwrap();
            assert!(layers > 0);
            assert!(cell_of(row, &header, "time / step").ends_with(" s"));
            assert!(cell_of(row, &header, "adapter size").ends_with("B"));
            assert!(cell_of(row, &header, "peak memory").ends_with("B"));
            assert!(cell_of(row, &header, "eval loss").contains('→'));
            // No validation data: no validation loss.
            assert_eq!(cell_of(row, &header, "validation loss"), "–");
        } else {
            let steps = if r.name == "diverges" { 3 } else { 0 };
            assert!(status.starts_with(&format!("failed after {steps} steps: ")), "{status}");
        }
    }
    assert!(cell_of(&rows[0], &header, "config").contains("\"rank\":2"));
    assert!(md.contains("![loss curves](loss.png)") && md.contains("![samples](grid.png)"));
    assert!(md.contains("Rows, top to bottom: base (before), lora-a, gate, lora-b, missing (failed: grey)"), "{md}");
    assert!(md.contains("## Failures") && md.contains("- `missing`: "));

    // The plot and the grid are in report.html as data URIs, byte for byte the PNG files.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let plot = html_image(&html, "loss curves");
    assert_eq!(plot, std::fs::read(out.join("loss.png")).unwrap());
    let grid_bytes = html_image(&html, "samples");
    assert_eq!(grid_bytes, std::fs::read(out.join("grid.png")).unwrap());
    assert!(!html.contains("src=\"samples/") && !html.contains("src=\"loss.png"), "self-contained");
    for r in &outcome.strategies {
        assert!(html.contains(&format!("<tr><td>{}</td>", r.name)), "{} row in the html table", r.name);
    }
    let plot = image::load_from_memory(&plot).unwrap();
    assert_eq!((plot.width(), plot.height()), (800, 480));

    // The grid: 9 rows (base + 7 strategies + training images) by 2 prompts of 64x48, each scaled
    // 3x (192 px on the longer side) by nearest neighbour, under a header row and beside a header
    // column.
    let grid = image::load_from_memory(&grid_bytes).unwrap().to_rgb8();
    let (rows_n, cols_n) = (9, 2);
    let layout = grid_layout(&outcome, rows_n, cols_n);
    assert_eq!((layout.upscale, layout.cell_w, layout.cell_h), (3, 3 * W, 3 * H));
    assert_eq!((grid.width(), grid.height()), (layout.width(), layout.height()));
    let cell = |r: u32, c: u32| {
        let (x, y) = layout.cell(r, c);
        image::imageops::crop_imm(&grid, x, y, 3 * W, 3 * H).to_image()
    };
    for (c, sample) in outcome.base_samples.iter().enumerate() {
        assert_eq!(cell(0, c as u32), upscaled(&out.join(sample), 3), "base row, column {c}");
    }
    for (i, r) in outcome.strategies.iter().enumerate() {
        for c in 0..cols_n {
            let got = cell(i as u32 + 1, c);
            if r.ok() {
                assert_eq!(got, upscaled(&out.join(&r.samples[c as usize]), 3), "{} column {c}", r.name);
            } else {
                assert!(got.pixels().all(|p| p.0 == MISSING_CELL), "{}: grey cells", r.name);
            }
        }
    }
    assert_labelled(&grid, &layout);
    // The last row: training images (64 x 64) fitted to 48 x 48, scaled 3x, centred in the cell.
    let examples = &outcome.style_reference.as_ref().unwrap().examples;
    assert_eq!(examples.len(), 2);
    for (c, example) in examples.iter().enumerate() {
        let (x, y) = layout.cell(8, c as u32);
        let fitted = image::imageops::thumbnail(&image::open(example).unwrap().to_rgb8(), 48, 48);
        let got = image::imageops::crop_imm(&grid, x + (3 * W - 144) / 2, y, 144, 144).to_image();
        assert_eq!(got, image::RgbImage::from_fn(144, 144, |x, y| *fitted.get_pixel(x / 3, y / 3)), "training image {c}");
    }
    // The base model's samples differ from the trained ones (the adapters do something).
    assert_ne!(cell(0, 0), cell(1, 0));

    // summary.json has the same results.
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["strategies"].as_array().unwrap().len(), 7);
    assert_eq!(summary["strategies"][3]["name"], "missing");
    for f in &outcome.report_files {
        assert!(out.join(f).is_file(), "{}", f.display());
    }
    // Loss logs per strategy.
    assert_eq!(graft_trainer::losslog::read(&out.join("strategies/gate/loss.jsonl")).unwrap().len(), 4);
    assert_eq!(graft_trainer::losslog::read(&out.join("strategies/diverges/loss.jsonl")).unwrap().len(), 3);
    assert_eq!(report::REPORT_HTML, "report.html");
}

/// The grid's layout for `outcome` (its row labels), `rows` x `columns` cells of W x H samples.
fn grid_layout(outcome: &graft_host::compare::CompareOutcome, rows: u32, columns: u32) -> graft_host::compare::grid::Layout {
    let mut labels = vec![report::BASE_ROW.to_string()];
    labels.extend(outcome.strategies.iter().map(|r| if r.samples.is_empty() { format!("{} (failed)", r.name) } else { r.name.clone() }));
    labels.push(report::TRAINING_ROW.to_string());
    assert_eq!(labels.len() as u32, rows);
    graft_host::compare::grid::layout(W, H, rows as usize, columns as usize, &labels)
}

/// The sample at `path`, each pixel a `k` x `k` block.
fn upscaled(path: &Path, k: u32) -> image::RgbImage {
    let img = image::open(path).unwrap().to_rgb8();
    image::RgbImage::from_fn(img.width() * k, img.height() * k, |x, y| *img.get_pixel(x / k, y / k))
}

/// Text (dark pixels on the white background) above every column and left of every row.
fn assert_labelled(grid: &image::RgbImage, layout: &graft_host::compare::grid::Layout) {
    let dark = |x0: u32, y0: u32, w: u32, h: u32| {
        let mut n = 0;
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                if grid.get_pixel(x, y).0.iter().all(|&v| v < 80) {
                    n += 1;
                }
            }
        }
        n
    };
    for c in 0..layout.columns {
        let (x, _) = layout.cell(0, c);
        assert!(dark(x, 0, layout.cell_w, layout.top) > 50, "no header text over column {c}");
    }
    for r in 0..layout.rows {
        let (_, y) = layout.cell(r, 0);
        assert!(dark(0, y, layout.left, layout.cell_h) > 50, "no label beside row {r}");
    }
}

/// Every linear base weight the model computes with now, by name (f32 values).
fn current_weights(model: &graft_sdxl::SdxlModel) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for reg in model.registries() {
        for (i, info) in reg.layers().iter().enumerate() {
            if let Some(w) = reg.linear_weights(i) {
                out.push((info.name.clone(), w.current().weight_f32().unwrap().flatten_all().unwrap().to_vec1().unwrap()));
            }
        }
    }
    out
}

/// A strategy that trains base weights changes the shared model through overrides its trainer
/// owns; dropping the trainer takes them out: the model is as loaded, bit for bit.
#[test]
fn base_weights_are_put_back_after_a_strategy() {
    let dir = scratch("compare_restore");
    write_shapes_dataset(&dir.join("data"), 2, 64);
    std::fs::write(dir.join("compare.toml"), config_text()).unwrap();
    let config = CompareConfig::from_file(&dir.join("compare.toml")).unwrap();
    let model = Arc::new(graft_sdxl::SdxlModel::load(&tiny_model(), None, &Device::Cpu).unwrap());
    let loaded = current_weights(&model);
    assert!(model.overridden().is_empty());
    let mut manager = PluginManager::new(vec![SearchDir { path: plugins(), origin: DirOrigin::Flag }]);
    manager.scan();
    let gate = config.strategies.iter().find(|s| s.name() == "gate").unwrap();
    let mut t = Trainer::with_model(config.train_config(gate, &dir.join("gate")).unwrap(), model.clone(), manager).unwrap();
    for _ in 0..2 {
        t.train_step().unwrap();
    }
    let changed: Vec<String> =
        current_weights(&model).into_iter().zip(&loaded).filter(|((_, now), (_, was))| now != was).map(|((n, _), _)| n).collect();
    assert!(!changed.is_empty() && changed.iter().all(|l| l.contains("attn")), "{changed:?}");
    let overridden = model.overridden();
    assert!(changed.iter().all(|l| overridden.contains(l)), "every changed weight is an override: {overridden:?}");
    // A LoRA file fused on top of the trained projections: the strategy's overrides are under
    // the fuse, so ejecting it is refused (naming the layer and the owner above) and changes
    // nothing; once the file is unfused the eject goes through.
    let mut files = graft_runtime::adapters::files::FileAdapters::new(&model).unwrap();
    files.load(&graft_tests::fixtures().join("lora/kohya_sgm.safetensors"), "kohya", 1.0, 1.0).unwrap();
    assert!(files.fuse().unwrap() > 0);
    let fused = current_weights(&model);
    let e = format!("{:#}", t.set.eject(t.strategy).unwrap_err());
    assert!(e.contains("attn") && e.contains("adapter files") && e.contains("unfreeze by strategy"), "{e}");
    assert!(current_weights(&model) == fused, "a refused eject changes nothing");
    files.unfuse();
    assert!(model.overridden().iter().all(|l| overridden.contains(l)));
    t.set.eject(t.strategy).unwrap();
    assert!(model.overridden().is_empty(), "{:?}", model.overridden());
    assert!(current_weights(&model) == loaded, "eject puts the loaded weights back");
    // Dropping the trainer takes whatever it still has out (nothing here); fuse and drop a
    // second trainer's worth: dropping the file adapters unfuses them.
    files.fuse().unwrap();
    assert!(!model.overridden().is_empty());
    drop(files);
    drop(t);
    assert!(model.overridden().is_empty(), "{:?}", model.overridden());
    assert!(current_weights(&model) == loaded, "the base weights are as loaded again");
}

#[test]
fn demo_dataset_is_deterministic() {
    let a = scratch("compare_dataset_a");
    let b = scratch("compare_dataset_b");
    let pa = graft_host::demo::dataset::write_dataset(&a, 8, 48).unwrap();
    write_shapes_dataset(&b, 8, 48);
    assert_eq!(pa.len(), 8);
    let files = |d: &Path| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    let (fa, fb) = (files(&a), files(&b));
    assert_eq!(fa.len(), 16, "8 images and 8 captions");
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.file_name(), y.file_name());
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap(), "{}", x.display());
    }
    let caption = std::fs::read_to_string(a.join("003.txt")).unwrap();
    assert_eq!(caption, graft_host::demo::dataset::describe(3, graft_host::demo::dataset::Look::Styled).caption());
    assert!(caption.starts_with("a ") && caption.ends_with("in the center"), "{caption}");
    let img = image::open(a.join("000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
}

/// `graft demo` through the command line, as a newcomer runs it (its default budget): the report
/// is written, and every shipped strategy's samples are closer to the generated style than the
/// demo model's own (style score after < before, on the demo's own output).
#[test]
fn demo_runs_and_every_strategy_moves_towards_the_style() {
    let dir = scratch("compare_demo");
    let out = dir.join("demo");
    let plugins = plugins();
    graft(&["demo", "--out", out.to_str().unwrap(), "--cpu", "--no-build", "--plugins", plugins.to_str().unwrap()]).unwrap();
    for f in ["report.html", "report.md", "loss.png", "grid.png", "summary.json", "compare.toml", "prompts.txt", "data/011.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let (_, rows) = md_table(&md);
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["lora", "attention-gate", "progressive-fusion"]);
    assert!(rows.iter().all(|r| r[3] == "ok"), "{rows:?}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mut scores = Vec::new();
    for s in summary["strategies"].as_array().unwrap() {
        let (before, after) = (s["style"]["before"]["total"].as_f64().unwrap(), s["style"]["after"]["total"].as_f64().unwrap());
        scores.push(format!("{}: {before:.3} -> {after:.3}", s["name"]));
        assert!(after < before, "{}: style score {before:.3} -> {after:.3}", s["name"]);
    }
    eprintln!("demo style scores: {}", scores.join(", "));
    // The config it wrote is a valid compare config (what a user edits for a real model).
    let config = CompareConfig::from_file(&out.join("compare.toml")).unwrap();
    assert_eq!((config.options.steps, config.strategies.len(), config.prompts().unwrap().len()), (graft_host::demo::DEFAULT_STEPS, 3, 4));
}

/// Two strategies, each trained once with seed 1 and once with seed 2.
fn seeds_config_text() -> String {
    format!(
        "model = {model:?}\noutput_dir = \"report\"\nseeds = [1, 2]\nsteps = 3\nloss_window = 2\n\
         prompts = [\"a pink star outline, line art --w {W} --h {H} --s 2\"]\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\n\
         [[strategies]]\nname = \"lora\"\nplugin = \"lora\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n\n\
         [[strategies]]\nname = \"gate\"\nplugin = \"attention-gate\"\nconfig = {{ rank = 2, adapter_lr = 0.01, base_lr = 0.01 }}\n",
        model = tiny_model().to_str().unwrap()
    )
}

/// Mean and sample standard deviation (n − 1), computed here from the per-seed values.
fn mean_and_std(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (v.len() - 1) as f64;
    (mean, var.sqrt())
}

/// `0.1234 ± 0.0056` as (0.1234, 0.0056).
fn parse_pm(cell: &str) -> (f64, f64) {
    let (m, s) = cell.split_once(" ± ").unwrap_or_else(|| panic!("not `mean ± std`: {cell}"));
    (m.trim().parse().unwrap(), s.trim().parse().unwrap())
}

/// `seeds = [1, 2]`: every strategy runs once per seed into its own folders; summary.json has
/// every run's numbers and their mean and sample std, which report.md shows as mean ± std; the
/// seeds' runs differ; the grid shows the first seed's samples.
#[test]
fn compare_with_two_seeds_reports_mean_and_std() {
    let dir = scratch("compare_seeds");
    write_shapes_dataset(&dir.join("data"), 4, 64);
    std::fs::write(dir.join("compare.toml"), seeds_config_text()).unwrap();
    let config = CompareConfig::from_file(&dir.join("compare.toml")).unwrap();
    let outcome = graft_host::compare::compare(&config, plugin_args(), true).unwrap();
    let out = dir.join("report");
    assert_eq!((outcome.seeds.clone(), outcome.seed), (Some(vec![1, 2]), 1));

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["seeds"], serde_json::json!([1, 2]));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let (header, rows) = md_table(&md);
    assert_eq!(rows.len(), 2, "{md}");
    assert!(md.contains("smaller than that spread is not a difference"), "{md}");

    for (i, r) in outcome.strategies.iter().enumerate() {
        let n = r.name.as_str();
        assert!(r.ok(), "{n}: {:?}", r.error);
        assert_eq!(r.runs.iter().map(|run| run.seed).collect::<Vec<_>>(), [Some(1), Some(2)], "{n}");
        for run in &r.runs {
            let seed_dir = format!("seed-{}", run.seed.unwrap());
            assert!(run.ok(), "{n} {seed_dir}: {:?}", run.error);
            assert_eq!((run.steps_done, run.losses.len(), run.samples.len()), (3, 3, 1), "{n} {seed_dir}");
            let log = out.join("strategies").join(n).join(&seed_dir).join("loss.jsonl");
            assert_eq!(graft_trainer::losslog::read(&log).unwrap().len(), 3, "{}", log.display());
            assert!(!run.exports.is_empty());
            for f in run.exports.iter().chain(&run.samples) {
                assert!(out.join(f).is_file(), "{}", f.display());
            }
            assert!(run.exports.iter().all(|f| f.starts_with(format!("strategies/{n}/{seed_dir}"))), "{:?}", run.exports);
            assert!(run.samples[0].starts_with(format!("samples/{seed_dir}")), "{}", run.samples[0].display());
        }
        // The two seeds' runs differ: another data order, noise, timesteps and initial values.
        let (a, b) = (&r.runs[0], &r.runs[1]);
        let losses = |run: &graft_host::compare::StrategyResult| run.losses.iter().map(|e| e.loss).collect::<Vec<f64>>();
        assert_ne!(losses(a), losses(b), "{n}: the seeds' losses are identical");
        assert_ne!(a.final_loss, b.final_loss, "{n}");
        let sample = |run: &graft_host::compare::StrategyResult| image::open(out.join(&run.samples[0])).unwrap().to_rgb8();
        assert_ne!(sample(a), sample(b), "{n}: the seeds' samples are identical");

        // summary.json: per-seed values, and their mean and sample std.
        let s = &summary["strategies"][i];
        assert_eq!(s["name"], n);
        let runs = s["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for key in ["final_loss", "mean_loss", "eval_loss_end"] {
            let values: Vec<f64> = runs.iter().map(|run| run[key].as_f64().unwrap()).collect();
            let (mean, std) = mean_and_std(&values);
            assert!(std > 0.0, "{n} {key}: {values:?}");
            let stat = &s["stats"][key];
            assert!((stat["mean"].as_f64().unwrap() - mean).abs() < 1e-12, "{n} {key}: {stat} vs {mean}");
            assert!((stat["std"].as_f64().unwrap() - std).abs() < 1e-12, "{n} {key}: {stat} vs {std}");
            assert_eq!(stat["n"], 2);
            // The row's own value is the mean.
            assert!((s[key].as_f64().unwrap() - mean).abs() < 1e-12, "{n} {key}");
        }
        assert_eq!(runs.iter().map(|run| run["seed"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);

        // report.md: the same mean ± std, to the 4 decimals it prints.
        let row = &rows[i];
        assert_eq!((row[0].as_str(), cell_of(row, &header, "status").as_str()), (n, "ok"));
        for (column, key) in [("final loss", "final_loss"), ("mean loss (last 2)", "mean_loss")] {
            let values: Vec<f64> = runs.iter().map(|run| run[key].as_f64().unwrap()).collect();
            let (mean, std) = mean_and_std(&values);
            let (m, sd) = parse_pm(&cell_of(row, &header, column));
            assert!((m - mean).abs() < 1e-4 && (sd - std).abs() < 1e-4, "{n} {column}: {m} ± {sd} vs {mean} ± {std}");
        }
        let eval = cell_of(row, &header, "eval loss");
        let end: Vec<f64> = runs.iter().map(|run| run["eval_loss_end"].as_f64().unwrap()).collect();
        let (m, sd) = parse_pm(eval.split(" → ").nth(1).unwrap());
        let (mean, std) = mean_and_std(&end);
        assert!((m - mean).abs() < 1e-4 && (sd - std).abs() < 1e-4, "{n} eval end: {eval}");
    }
    // Same seed, same eval batch, latents and noise: at step 0 each strategy (zero-initialised LoRA,
    // gate with zero B) is the base model, so per seed both start at the same eval loss.
    let (lora, gate) = (&outcome.strategies[0], &outcome.strategies[1]);
    for k in 0..2 {
        assert_eq!(lora.runs[k].eval_loss_start, gate.runs[k].eval_loss_start, "seed {}", k + 1);
    }
    assert_eq!(lora.stats.as_ref().unwrap().eval_loss_start, gate.stats.as_ref().unwrap().eval_loss_start);

    // The grid: the base row and each strategy's first seed's samples.
    let grid = image::open(out.join("grid.png")).unwrap().to_rgb8();
    let layout = grid_layout(&outcome, 4, 1);
    assert_eq!((grid.width(), grid.height()), (layout.width(), layout.height()));
    let cell = |r: u32| {
        let (x, y) = layout.cell(r, 0);
        image::imageops::crop_imm(&grid, x, y, 3 * W, 3 * H).to_image()
    };
    for (i, r) in outcome.strategies.iter().enumerate() {
        assert_eq!(cell(i as u32 + 1), upscaled(&out.join(&r.runs[0].samples[0]), 3), "{}", r.name);
    }
    assert!(md.contains("first seed (1)"), "{md}");

    // The style score: every run scored after training, the row's stats the mean ± sample std of
    // the runs' parts; before is the base model's, one measurement.
    for (i, r) in outcome.strategies.iter().enumerate() {
        let s = &summary["strategies"][i];
        for part in STYLE_PARTS {
            let values: Vec<f64> = s["runs"].as_array().unwrap().iter().map(|run| run["style"]["after"][part].as_f64().unwrap()).collect();
            let (mean, std) = mean_and_std(&values);
            let stat = &s["stats"]["style_after"][part];
            assert!((stat["mean"].as_f64().unwrap() - mean).abs() < 1e-12, "{} {part}: {stat}", r.name);
            assert!((stat["std"].as_f64().unwrap() - std).abs() < 1e-12, "{} {part}: {stat}", r.name);
            assert!((s["style"]["after"][part].as_f64().unwrap() - mean).abs() < 1e-12, "{} {part}", r.name);
            assert_eq!(s["stats"]["style_before"][part]["n"], 1, "{} {part}", r.name);
            assert_eq!(s["stats"]["style_before"][part]["mean"], s["style"]["before"][part], "{} {part}", r.name);
        }
    }
    let (style_header, style_rows) = md_table_after(&md, "## Style");
    assert_eq!(style_header[1], "total");
    for row in &style_rows {
        let after = row[1].split(" → ").nth(1).unwrap();
        parse_pm(after);
    }
}

const STYLE_PARTS: [&str; 5] = ["palette", "edge_density", "stroke_width", "composition", "total"];

/// The header and rows of the first markdown table after the line `heading`.
fn md_table_after(md: &str, heading: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let start = md.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("no `{heading}` in the report:\n{md}"));
    let rest = &md[start..];
    let table = &rest[rest.find("\n| ").unwrap_or_else(|| panic!("no table under {heading}:\n{md}")) + 1..];
    // md_table finds the table by its `| strategy |` header.
    md_table(table)
}

/// The style score through a whole comparison: summary.json has `style.before` (the base model's
/// samples) and `style.after` (each strategy's) with every part finite and in [0, 1], the same
/// numbers as the style module gives on the files; a failed strategy has no `after` and says why;
/// report.md shows before → after for each.
#[test]
fn compare_scores_the_style_before_and_after_training() {
    let dir = scratch("compare_style");
    write_shapes_dataset(&dir.join("data"), 4, 64);
    let text = format!(
        "model = {model:?}\noutput_dir = \"report\"\nseed = 3\nsteps = 2\nloss_window = 2\n\
         prompts = [\"a pink star outline, line art --w {W} --h {H} --s 2\", \"a mint green square --w {W} --h {H} --s 2\"]\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\n\
         [[strategies]]\nname = \"lora\"\nplugin = \"lora\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n\n\
         [[strategies]]\nname = \"missing\"\nplugin = \"no-such-plugin\"\n",
        model = tiny_model().to_str().unwrap()
    );
    std::fs::write(dir.join("compare.toml"), text).unwrap();
    let config = CompareConfig::from_file(&dir.join("compare.toml")).unwrap();
    let outcome = graft_host::compare::compare(&config, plugin_args(), true).unwrap();
    let out = dir.join("report");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();

    // The reference: the 4 training images.
    let reference = &summary["style_reference"];
    assert_eq!((reference["found"].as_u64(), reference["stats"]["images"].as_u64()), (Some(4), Some(4)), "{reference}");
    let mut training: Vec<PathBuf> =
        std::fs::read_dir(dir.join("data")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    training.sort();
    let reference_stats = style::stats_of_files(&training).unwrap().unwrap();
    let expect = |samples: &[PathBuf]| {
        let files: Vec<PathBuf> = samples.iter().map(|p| out.join(p)).collect();
        style::score(&style::stats_of_files(&files).unwrap().unwrap(), &reference_stats)
    };
    let check = |score: &serde_json::Value, want: &style::StyleScore, what: &str| {
        for (part, value) in want.parts() {
            let got = score[part].as_f64().unwrap_or_else(|| panic!("{what}: no `{part}` in {score}"));
            assert!(got.is_finite() && (0.0..=1.0).contains(&got), "{what} {part}: {got}");
            assert!((got - value).abs() < 1e-12, "{what} {part}: {got} vs {value}");
        }
        let mean = (want.palette + want.edge_density + want.stroke_width + want.composition) / 4.0;
        assert!((want.total - mean).abs() < 1e-12, "{what}: the total is the parts' mean");
    };
    let before = expect(&outcome.base_samples);
    let lora = &summary["strategies"][0];
    assert_eq!(lora["name"], "lora");
    check(&lora["style"]["before"], &before, "lora before");
    check(&lora["style"]["after"], &expect(&outcome.strategies[0].samples), "lora after");
    assert!(lora["style"]["note"].is_null(), "{}", lora["style"]);
    // The failed strategy: the base model's score, no score after, and why.
    let missing = &summary["strategies"][1];
    check(&missing["style"]["before"], &before, "missing before");
    assert!(missing["style"]["after"].is_null(), "{}", missing["style"]);
    assert!(missing["style"]["note"].as_str().unwrap().contains("the strategy failed"), "{}", missing["style"]);

    // report.md: before → after for the total and each part, to 3 decimals.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let (header, rows) = md_table_after(&md, "## Style");
    assert_eq!(header, ["strategy", "total", "palette", "edge density", "stroke width", "composition"]);
    assert_eq!(rows.len(), 2);
    let after = outcome.strategies[0].style.after.unwrap();
    let columns = |s: &style::StyleScore| [s.total, s.palette, s.edge_density, s.stroke_width, s.composition];
    for (k, (want_before, want_after)) in columns(&before).into_iter().zip(columns(&after)).enumerate() {
        let (b, a) = rows[0][k + 1].split_once(" → ").unwrap();
        let (b, a): (f64, f64) = (b.parse().unwrap(), a.parse().unwrap());
        assert!((b - want_before).abs() < 5e-4 && (a - want_after).abs() < 5e-4, "{}: {b} → {a}", header[k + 1]);
        assert_eq!(rows[1][k + 1].split_once(" → ").unwrap().0, rows[0][k + 1].split_once(" → ").unwrap().0, "the same before");
    }
    assert!(rows[1][1].ends_with("→ –"), "{:?}", rows[1]);
    assert!(md.contains("- `missing`: ") && md.contains("STYLE_SCORE.md"), "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<h2>Style</h2>") && html.contains(&format!("<td>{}</td>", rows[0][1])), "{html}");
}

/// `seed` and `seeds` together are refused, naming both.
#[test]
fn compare_refuses_seed_with_seeds() {
    let dir = scratch("compare_seed_and_seeds");
    let text = seeds_config_text().replace("seeds = [1, 2]\n", "seed = 7\nseeds = [1, 2]\n");
    std::fs::write(dir.join("compare.toml"), text).unwrap();
    let path = dir.join("compare.toml");
    let e = graft_tests::graft_err(&["compare", "--config", path.to_str().unwrap(), "--cpu"]);
    assert!(e.contains("`seed`") && e.contains("`seeds`") && e.contains("compare.toml"), "{e}");
}
