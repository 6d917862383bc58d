//! Validation end to end on the tiny model: held-out images (`validation_split`) or a folder
//! (`validation_dir`) evaluated at fixed timesteps with fixed noise every `validate_every` steps
//! and at the end, in the loss log, the plot and compare's summary; progressive-fusion's stage
//! boundaries recorded in the log; bad settings named.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use graft_host::plugins::PluginDirArgs;
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_tests::{build_plugins, graft, graft_err, scratch, tiny_model, write_shapes_dataset};
use graft_trainer::config::TrainConfig;
use graft_trainer::losslog;
use graft_trainer::trainer::Trainer;

fn plugins() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_plugins(&["lora", "attention-gate", "progressive-fusion"])).clone()
}

fn manager() -> PluginManager {
    let mut m = PluginManager::new(vec![SearchDir { path: plugins(), origin: DirOrigin::Flag }]);
    m.scan();
    m
}

const LORA: &str = "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }";
const FUSION: &str = "plugin = \"progressive-fusion\"\n\
                      config = { stage1_steps = 4, stage2_steps = 4, stage1_lr = 0.01, stage2_lr = 0.01, stage3_lr = 0.03 }";

/// A dataset of `images` images and a config in `dir`; `extra` goes to the top-level keys.
fn setup(dir: &Path, images: usize, steps: u64, extra: &str, strategy: &str) -> PathBuf {
    write_shapes_dataset(&dir.join("data"), images, 64);
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"v\"\nseed = 3\nsteps = {steps}\nlr_schedule = \"constant\"\n{extra}\n\
         [dataset]\ndir = \"data\"\nresolution = 64\n\n[strategy]\n{strategy}\n",
        tiny_model().to_str().unwrap()
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn trainer(config: &Path) -> Trainer {
    Trainer::new(TrainConfig::from_file(config).unwrap(), manager(), &Device::Cpu).unwrap()
}

fn train(config: &Path) {
    let p = plugins();
    graft(&["train", "--config", config.to_str().unwrap(), "--plugins", p.to_str().unwrap(), "--no-default-plugins"]).unwrap();
}

fn train_err(config: &Path) -> String {
    let p = plugins();
    graft_err(&["train", "--config", config.to_str().unwrap(), "--plugins", p.to_str().unwrap(), "--no-default-plugins"])
}

/// The steps whose log entry has a validation loss.
fn validated_steps(log: &[losslog::LossEntry]) -> Vec<u64> {
    log.iter().filter(|e| e.val_loss.is_some()).map(|e| e.step).collect()
}

/// `validation_split` holds images out of training (chosen by the seed, the same every time);
/// the loss is measured every `validate_every` steps and after the last one, written on the
/// entry of the step it follows, and drawn in loss.png.
#[test]
fn split_is_held_out_and_validated_every_n_steps_and_at_the_end() {
    let dir = scratch("valid_split");
    let config = setup(&dir, 8, 5, "validation_split = 0.25\nvalidate_every = 2", LORA);
    let t = trainer(&config);
    let v = t.validation.as_ref().unwrap();
    assert_eq!((t.dataset.len(), v.len(), v.timesteps()), (6, 2, &[125, 375, 625, 875][..]));
    let keys = |d: &graft_trainer::dataset::Dataset| d.items().iter().map(|it| it.key.clone()).collect::<BTreeSet<String>>();
    let held = keys(v.dataset());
    assert!(keys(&t.dataset).is_disjoint(&held), "held-out images are not trained on: {held:?}");
    assert_eq!(keys(&t.dataset).len() + held.len(), 8);
    assert_eq!(keys(trainer(&config).validation.unwrap().dataset()), held, "the same seed holds out the same images");
    drop(t);

    train(&config);
    let log = losslog::read(&dir.join("out/loss.jsonl")).unwrap();
    // After steps 2 and 4 (entries 1 and 3) and after the last (entry 4).
    assert_eq!(validated_steps(&log), vec![1, 3, 4]);
    assert!(log.iter().filter_map(|e| e.val_loss).all(|v| v.is_finite() && v > 0.0), "{log:?}");
    assert_eq!(losslog::validation_points(&log).len(), 3);
    assert!(dir.join("out/loss.png").is_file());

    // validate_every = 0: at the end only.
    let config = setup(&dir, 8, 3, "validation_split = 0.25", LORA);
    train(&config);
    assert_eq!(validated_steps(&losslog::read(&dir.join("out/loss.jsonl")).unwrap()), vec![2]);
}

/// The same validation twice with no training in between gives the same value to the bit
/// (fixed noise and timesteps, dropout off), with and without gradient checkpointing; training
/// with validation between the steps takes exactly the steps of training without it.
#[test]
fn validation_is_fixed_and_leaves_training_unchanged() {
    let dir = scratch("valid_fixed");
    write_shapes_dataset(&dir.join("val"), 3, 64);
    let strategy = "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01, dropout = 0.1 }";
    let with = setup(&dir, 4, 4, "validation_dir = \"val\"\nvalidation_timesteps = [50, 500, 950]", strategy);
    let mut a = trainer(&with);
    assert_eq!((a.dataset.len(), a.validation.as_ref().unwrap().len()), (4, 3), "a folder takes no training image");
    let first = a.validate().unwrap().unwrap();
    assert_eq!(a.validate().unwrap().unwrap().to_bits(), first.to_bits());
    let mut a_losses = Vec::new();
    let mut vals = vec![first];
    for _ in 0..4 {
        a_losses.push(a.train_step().unwrap().loss.to_bits());
        vals.push(a.validate().unwrap().unwrap());
    }
    assert_eq!(a.validate().unwrap().unwrap().to_bits(), vals[4].to_bits());
    assert!(vals[4] != vals[0], "the validation loss follows the trained weights: {vals:?}");

    let without = setup(&dir, 4, 4, "", strategy);
    let mut b = trainer(&without);
    assert!(b.validation.is_none() && b.validate().unwrap().is_none());
    let b_losses: Vec<u64> = (0..4).map(|_| b.train_step().unwrap().loss.to_bits()).collect();
    assert_eq!(a_losses, b_losses, "validation changed the training losses");
    let params = |t: &Trainer| -> Vec<Vec<f32>> {
        t.parameters().into_iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    assert_eq!(params(&a), params(&b), "validation changed the trained parameters");

    // Gradient checkpointing runs the forward segment by segment: the same value.
    let checkpointed =
        setup(&dir, 4, 4, "validation_dir = \"val\"\nvalidation_timesteps = [50, 500, 950]\ngradient_checkpointing = true", strategy);
    let c = trainer(&checkpointed).validate().unwrap().unwrap();
    assert!((c - first).abs() <= 1e-6 * first.abs(), "{c} vs {first}");
}

/// progressive-fusion: the stage that begins at each boundary is in the loss log (from the run's
/// own steps), in the plot's data, and validation works in stage 2, where the text encoders carry
/// adapters, with gradient checkpointing on.
#[test]
fn progressive_fusion_stage_boundaries_are_logged_and_plotted() {
    let dir = scratch("valid_fusion");
    let config = setup(&dir, 6, 12, "validation_split = 0.34\nvalidate_every = 3\ngradient_checkpointing = true", FUSION);
    train(&config);
    let log = losslog::read(&dir.join("out/loss.jsonl")).unwrap();
    for e in &log {
        println!("step {} loss {:.5} val {:?} stage {:?} ({:.2} s)", e.step, e.loss, e.val_loss, e.stage, e.time);
    }
    let stages: Vec<(u64, &str)> = log.iter().filter_map(|e| e.stage.as_deref().map(|s| (e.step, s))).collect();
    assert_eq!(stages, vec![(0, "stage1"), (4, "stage2"), (8, "stage3")]);
    assert_eq!(losslog::stage_boundaries(&log), vec![(4, "stage2".to_string()), (8, "stage3".to_string())]);
    // Every 3 steps (after step 6: stage 2, text-encoder adapters) and after the last.
    assert_eq!(validated_steps(&log), vec![2, 5, 8, 11]);
    assert!(log.iter().filter_map(|e| e.val_loss).all(f64::is_finite));
    let img = image::open(dir.join("out/loss.png")).unwrap().to_rgb8();
    assert!(img.pixels().any(|p| p.0 == [150, 150, 150]), "no stage line in loss.png");
    // A plain LoRA has no stages.
    let plain = scratch("valid_fusion_plain");
    train(&setup(&plain, 4, 2, "", LORA));
    assert!(losslog::read(&plain.join("out/loss.jsonl")).unwrap().iter().all(|e| e.stage.is_none()));
}

/// Each bad setting is one error naming the option.
#[test]
fn bad_validation_settings_name_the_option() {
    let dir = scratch("valid_bad");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    for (extra, expected) in [
        ("validation_split = 1.5", "`validation_split = 1.5`: use a fraction between 0 and 1"),
        ("validation_split = 0.0", "`validation_split = 0`"),
        ("validation_split = 0.2\nvalidation_dir = \"empty\"", "`validation_dir` and `validation_split` are both set"),
        ("validate_every = 10", "`validate_every` is set but there is no validation data"),
        ("validation_dir = \"empty\"", "`validation_dir` "),
        ("validation_dir = \"missing\"", "not a folder"),
        ("validation_split = 0.9", "leaves none to train on"),
        ("validation_split = 0.5\nvalidation_timesteps = [10, 5000]", "`validation_timesteps` has 5000"),
    ] {
        let config = setup(&dir, 4, 2, extra, LORA);
        let e = train_err(&config);
        assert!(e.contains(expected), "{extra}: {e}");
    }
    let e = train_err(&setup(&dir, 4, 2, "validation_dir = \"empty\"", LORA));
    assert!(e.contains("`validation_dir`") && e.contains("empty") && e.contains("no training images"), "{e}");
}

/// compare: each strategy's last validation loss is in summary.json and the table, with seeds
/// as mean ± std in `stats`, and the validation points are in the curves it plots.
#[test]
fn compare_reports_the_validation_loss() {
    let dir = scratch("valid_compare");
    write_shapes_dataset(&dir.join("data"), 6, 64);
    let text = format!(
        "model = {:?}\noutput_dir = \"report\"\nseeds = [1, 2]\nsteps = 2\nvalidation_split = 0.34\nvalidate_every = 1\n\
         prompts = [\"a pink star --w 64 --h 48 --s 2\"]\n[dataset]\ndir = \"data\"\nresolution = 64\n\n\
         [[strategies]]\nname = \"lora\"\nplugin = \"lora\"\nconfig = {{ rank = 2, alpha = 2, unet_lr = 0.01 }}\n",
        tiny_model().to_str().unwrap()
    );
    std::fs::write(dir.join("compare.toml"), text).unwrap();
    let config = graft_host::compare::config::CompareConfig::from_file(&dir.join("compare.toml")).unwrap();
    let args = PluginDirArgs { plugins: vec![plugins()], plugin_config: None, no_default_plugins: true };
    let outcome = graft_host::compare::compare(&config, args, true).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report/summary.json")).unwrap()).unwrap();
    let row = &summary["strategies"][0];
    let r = &outcome.strategies[0];
    for run in &r.runs {
        assert_eq!(validated_steps(&run.losses), vec![0, 1]);
        assert_eq!(run.validation_loss, run.losses[1].val_loss);
    }
    let runs: Vec<f64> = r.runs.iter().map(|run| run.validation_loss.unwrap()).collect();
    assert_ne!(runs[0], runs[1], "the seeds hold out other images");
    assert_eq!(row["stats"]["validation_loss"]["n"], 2);
    assert!((row["validation_loss"].as_f64().unwrap() - (runs[0] + runs[1]) / 2.0).abs() < 1e-12);
    assert!((row["runs"][1]["validation_loss"].as_f64().unwrap() - runs[1]).abs() < 1e-12);
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(md.contains("validation loss, mean ± std"), "{md}");
}
