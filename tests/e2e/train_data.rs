//! The training data path and the optimizer, end to end: datasets from generated image folders
//! (kohya TOML and N_name folders), buckets, batches, latent caching, and AdamW and the
//! learning-rate schedules against torch / diffusers (tools/reference/make_optim_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use graft_trainer::buckets::Reso;
use graft_trainer::cache::LatentCache;
use graft_trainer::dataset::{Dataset, DatasetConfig, DatasetSpec, OpenOptions, SubsetSpec};
use graft_trainer::optim::{AdamW, Gradients, GroupConfig};
use graft_trainer::schedule::{LrSchedule, ScheduleKind};

fn reference() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference/optim.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/reference/make_optim_fixtures.py)", path.display()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

const PARAMS: [&str; 3] = ["p0", "p1", "p2"];

/// The fixture's optimizer: group a (p0, p1) with per-parameter clip 0.5, group b (p2), global clip 1.0.
fn fixture_optimizer(r: &HashMap<String, Tensor>) -> (AdamW, Vec<Var>) {
    let vars: Vec<Var> = PARAMS.iter().map(|p| Var::from_tensor(&r[&format!("init.{p}")]).unwrap()).collect();
    let a = GroupConfig::new("a", 1e-2).weight_decay(1e-2).betas(0.9, 0.999).eps(1e-8).clip_norm(Some(0.5));
    let b = GroupConfig::new("b", 5e-3).weight_decay(0.1).betas(0.8, 0.99).eps(1e-6);
    let mut opt =
        AdamW::new(vec![(a, vec![("p0".into(), vars[0].clone()), ("p1".into(), vars[1].clone())]), (b, vec![("p2".into(), vars[2].clone())])])
            .unwrap();
    opt.max_grad_norm = Some(1.0);
    (opt, vars)
}

fn fixture_grads(r: &HashMap<String, Tensor>, step: usize) -> Gradients {
    let mut g = Gradients::new();
    for p in PARAMS {
        g.insert(p, r[&format!("grad.{step}.{p}")].clone());
    }
    g
}

#[test]
fn adamw_matches_torch() {
    let r = reference();
    let factors = r["lr_factors"].to_vec1::<f64>().unwrap();
    let (mut opt, vars) = fixture_optimizer(&r);
    for (k, factor) in factors.iter().enumerate() {
        let report = opt.step(&fixture_grads(&r, k), *factor).unwrap();
        assert!(!report.skipped && report.updated == 3);
        for (p, v) in PARAMS.iter().zip(&vars) {
            let d = max_diff(v.as_tensor(), &r[&format!("param.{k}.{p}")]);
            assert!(d < 1e-6, "step {k} {p}: max diff {d}");
        }
    }
    let state = opt.state_tensors().unwrap();
    for p in PARAMS {
        for m in ["exp_avg", "exp_avg_sq"] {
            let d = max_diff(&state[&format!("{p}.{m}")], &r[&format!("{m}.{p}")]);
            assert!(d < 1e-6, "{m} of {p}: max diff {d}");
        }
        assert_eq!(opt.step_count(p), 3);
    }
}

#[test]
fn adamw_resume_is_bit_exact() {
    let r = reference();
    let factors = r["lr_factors"].to_vec1::<f64>().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("optimizer.safetensors");

    let (mut straight, straight_vars) = fixture_optimizer(&r);
    for (k, f) in factors.iter().enumerate() {
        straight.step(&fixture_grads(&r, k), *f).unwrap();
        if k == 0 {
            straight.save(&state).unwrap();
        }
    }
    // Resume after step 0: parameters as they were then, a new optimizer, the saved state.
    let (mut first, first_vars) = fixture_optimizer(&r);
    first.step(&fixture_grads(&r, 0), factors[0]).unwrap();
    let saved: Vec<Tensor> = first_vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let (mut resumed, vars) = fixture_optimizer(&r);
    for (v, t) in vars.iter().zip(&saved) {
        v.set(t).unwrap();
    }
    resumed.load(&state).unwrap();
    for (k, f) in factors.iter().enumerate().skip(1) {
        resumed.step(&fixture_grads(&r, k), *f).unwrap();
    }
    for (a, b) in straight_vars.iter().zip(&vars) {
        assert_eq!(
            a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn schedules_match_diffusers() {
    let r = reference();
    for name in ScheduleKind::NAMES {
        let kind: ScheduleKind = name.parse().unwrap();
        let mut s = LrSchedule::new(kind, 3, 15);
        if kind == ScheduleKind::CosineWithRestarts {
            s.num_cycles = 2.0;
        }
        let want = r[&format!("sched.{name}")].to_vec1::<f64>().unwrap();
        for (step, w) in want.iter().enumerate() {
            let got = s.factor(step);
            assert!((got - w).abs() < 1e-12, "{name} at step {step}: {got} vs diffusers {w}");
        }
    }
}

// ---- datasets ----

fn solid(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
}

/// A left-to-right ramp, to see flips and crops.
fn ramp(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, _| {
        let v = (x * 255 / (w - 1)) as u8;
        image::Rgb([v, v, v])
    })
    .save(path)
    .unwrap();
}

/// Folder `a` (png, jpg, webp with captions) and folder `b` (one image, class tokens).
fn make_images(root: &Path) -> (PathBuf, PathBuf) {
    let a = root.join("a");
    let b = root.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    solid(&a.join("wide.png"), 150, 100, [255, 0, 0]);
    std::fs::write(a.join("wide.txt"), "red, wide, landscape").unwrap();
    solid(&a.join("tall.jpg"), 100, 150, [0, 0, 255]);
    std::fs::write(a.join("tall.txt"), "blue, tall").unwrap();
    ramp(&a.join("square.webp"), 120, 120);
    std::fs::write(a.join("square.caption"), "ramp").unwrap();
    solid(&b.join("other.png"), 128, 128, [0, 255, 0]);
    (a, b)
}

const TOML: &str = r#"
[general]
enable_bucket = true
bucket_reso_steps = 32
min_bucket_reso = 64
max_bucket_reso = 256
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 128
batch_size = 2

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 3
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "b"
  class_tokens = "green thing"
  shuffle_caption = false
"#;

fn open_toml(root: &Path) -> Dataset {
    let toml_path = root.join("data.toml");
    std::fs::write(&toml_path, TOML).unwrap();
    let cfg = DatasetConfig::from_toml_file(&toml_path).unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    Dataset::open(&cfg, &OpenOptions::default()).unwrap()
}

#[test]
fn toml_dataset_buckets_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let ds = open_toml(dir.path());
    assert_eq!(ds.len(), 4);
    assert_eq!(ds.samples_per_epoch(), 3 * 3 + 1);
    // Buckets at area 128^2 in steps of 32: 150x100 -> 160x96, 100x150 -> 96x160, squares -> 128x128.
    let buckets: Vec<(Reso, usize)> = ds.bucket_counts();
    assert_eq!(buckets, vec![(Reso::new(96, 160), 1), (Reso::new(128, 128), 2), (Reso::new(160, 96), 1)]);
    let wide = ds.items().iter().find(|i| i.key == "wide").unwrap();
    // Cover: 150x100 scaled by 160/150 -> 160x107, crop 11 rows, 5 from the top.
    assert_eq!((wide.placement.resized, wide.placement.crop_top, wide.placement.crop_left), (Reso::new(160, 107), 5, 0));
    assert_eq!(ds.items().iter().find(|i| i.key == "other").unwrap().caption, "green thing");

    let epoch = ds.epoch(7, 0);
    // Per bucket with batch 2: wide x3 -> 2 batches, tall x3 -> 2, square x3 + other x1 -> 2.
    assert_eq!(epoch.len(), 6);
    let mut seen = HashMap::new();
    for batch in epoch {
        let batch = batch.unwrap();
        let images = batch.images().unwrap();
        let (th, tw) = batch.target_size;
        assert_eq!(images.dims(), &[batch.len(), 3, th, tw]);
        let flat = images.flatten_all().unwrap();
        let (lo, hi) = (flat.min(0).unwrap().to_scalar::<f32>().unwrap(), flat.max(0).unwrap().to_scalar::<f32>().unwrap());
        assert!(lo >= -1.0 && hi <= 1.0, "{lo} {hi}");
        assert_eq!(batch.time_ids(&Device::Cpu).unwrap().dims(), &[batch.len(), 6]);
        for (i, key) in batch.keys.iter().enumerate() {
            *seen.entry(key.clone()).or_insert(0) += 1;
            let caption = &batch.captions[i];
            match key.as_str() {
                // keep_tokens = 1 keeps the first tag in place; the rest is shuffled.
                "wide" => {
                    assert!(caption.starts_with("red, "), "{caption}");
                    assert_eq!(batch.original_sizes[i], (100, 150));
                    assert_eq!(batch.crop_coords[i], (5, 0));
                    // Solid red stays red through resize and crop.
                    let img = images.get(i).unwrap();
                    let red = img.get(0).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
                    let blue = img.get(2).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!((red - 1.0).abs() < 1e-3 && (blue + 1.0).abs() < 1e-3, "{red} {blue}");
                }
                "other" => assert_eq!(caption, "green thing"),
                "tall" => assert!(caption == "blue, tall"),
                _ => {}
            }
        }
    }
    assert_eq!(seen, HashMap::from([("wide".into(), 3), ("tall".into(), 3), ("square".into(), 3), ("other".into(), 1)]));
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn epochs_are_deterministic_and_flips_mirror() {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let ds = open_toml(dir.path());
    // (keys, captions, flips, image bits) of every batch.
    type Seen = (Vec<String>, Vec<String>, Vec<bool>, Vec<u32>);
    let run = |seed, epoch| -> Vec<Seen> {
        ds.epoch(seed, epoch)
            .map(|b| {
                let b = b.unwrap();
                (b.keys.clone(), b.captions.clone(), b.flipped.clone(), bits(b.images().unwrap()))
            })
            .collect()
    };
    let a = run(1, 0);
    assert_eq!(a, run(1, 0));
    assert_ne!(a, run(1, 1));
    assert_ne!(a, run(2, 0));

    // Any batch can be rebuilt alone (resume in the middle of an epoch).
    let mut epoch = ds.epoch(1, 0);
    epoch.seek(4);
    let b4 = epoch.next().unwrap().unwrap();
    assert_eq!((b4.keys.clone(), bits(b4.images().unwrap())), (a[4].0.clone(), a[4].3.clone()));

    // A flipped ramp is the unflipped one mirrored; over enough epochs both occur.
    let square = ds.items().iter().position(|i| i.key == "square").unwrap();
    let plain = ds.load_image(square, false).unwrap();
    let mirrored = ds.load_image(square, true).unwrap();
    let w = plain.dim(2).unwrap();
    let reversed: Vec<u32> = (0..w as u32).rev().collect();
    let index = Tensor::new(reversed.as_slice(), &Device::Cpu).unwrap();
    let (want, got) = (bits(&plain.index_select(&index, 2).unwrap()), bits(&mirrored));
    let wrong = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "flipped image differs at {wrong} of {} values: {:?} vs {:?}", want.len(), &want[..8], &got[..8]);
    let mut flips = std::collections::HashSet::new();
    for e in 0..8 {
        for b in ds.epoch(3, e).without_images() {
            let b = b.unwrap();
            assert!(b.images.is_none());
            for (k, f) in b.keys.iter().zip(&b.flipped) {
                if k == "square" {
                    flips.insert(*f);
                }
            }
        }
    }
    assert_eq!(flips.len(), 2);
}

#[test]
fn folder_dataset_with_repeat_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sub = root.join("5_sks dog");
    std::fs::create_dir_all(&sub).unwrap();
    solid(&sub.join("1.png"), 64, 64, [10, 20, 30]);
    solid(&sub.join("2.png"), 64, 64, [10, 20, 30]);
    std::fs::write(sub.join("2.txt"), "a photo of sks dog on grass").unwrap();
    let mut settings = DatasetSpec::new(Reso::new(64, 64));
    settings.batch_size = 3;
    let cfg = DatasetConfig::from_folder(root, &settings, &SubsetSpec::new("")).unwrap();
    let ds = Dataset::open(&cfg, &OpenOptions::default()).unwrap();
    assert_eq!(ds.samples_per_epoch(), 10);
    let captions: Vec<&str> = ds.items().iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(captions, vec!["sks dog", "a photo of sks dog on grass"]);
    let sizes: Vec<usize> = ds.epoch(0, 0).without_images().map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    assert_eq!(sizes.len(), 4);
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = make_images(dir.path());
    std::fs::write(a.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(a.join("broken.txt"), "x").unwrap();
    solid(&a.join("uncaptioned.png"), 64, 64, [1, 2, 3]);
    let toml_path = dir.path().join("data.toml");
    std::fs::write(&toml_path, TOML).unwrap();
    let cfg = DatasetConfig::from_toml_file(&toml_path).unwrap();
    let err = Dataset::open(&cfg, &OpenOptions::default()).unwrap_err().to_string();
    assert!(err.contains("broken.png") && err.contains("uncaptioned.png has no caption file"), "{err}");
    assert!(err.contains("--skip-bad"), "{err}");
    let ds = Dataset::open(&cfg, &OpenOptions { skip_bad: true, ..Default::default() }).unwrap();
    assert_eq!(ds.len(), 4);
    assert!(ds.warnings().iter().any(|w| w.contains("broken.png")));

    // A typo in the TOML is named, not silently ignored.
    std::fs::write(&toml_path, TOML.replace("flip_aug", "flip_agu")).unwrap();
    let cfg = DatasetConfig::from_toml_file(&toml_path).unwrap();
    assert!(cfg.warnings.iter().any(|w| w.contains("unknown key 'flip_agu'")), "{:?}", cfg.warnings);
}

/// A stand-in VAE: 8x8 average pooling, counting its calls.
fn fake_encoder(calls: &mut usize) -> impl FnMut(&Tensor) -> candle_core::Result<Tensor> + '_ {
    move |img: &Tensor| {
        *calls += 1;
        assert_eq!(img.dims()[..2], [1, 3]);
        img.avg_pool2d(8)
    }
}

#[test]
fn latent_cache_on_disk_and_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = make_images(dir.path());
    let ds = open_toml(dir.path());
    let cache_dir = dir.path().join("cache");
    let dev = Device::Cpu;

    // Prefill: 3 images of `a` with both flips + 1 of `b`.
    let mut calls = 0;
    let mut cache = LatentCache::on_disk(&cache_dir, "fake-vae").unwrap();
    let encoded = cache.prefill(&ds, &dev, &mut fake_encoder(&mut calls), |_, _| {}).unwrap();
    assert_eq!((encoded, calls), (7, 7));

    // A new cache over the same folder encodes nothing, and gives the encoder's output.
    let mut calls = 0;
    let mut cache = LatentCache::on_disk(&cache_dir, "fake-vae").unwrap();
    let batch = ds.epoch(5, 0).batch(0).unwrap();
    let latents = cache.batch_latents(&ds, &batch, &dev, &mut fake_encoder(&mut calls)).unwrap();
    assert_eq!(calls, 0);
    let (th, tw) = batch.target_size;
    assert_eq!(latents.dims(), &[batch.len(), 3, th / 8, tw / 8]);
    let direct = batch.images().unwrap().avg_pool2d(8).unwrap();
    assert_eq!(bits(&latents), bits(&direct));

    // Another namespace (another VAE) misses.
    let mut calls = 0;
    let mut other = LatentCache::on_disk(&cache_dir, "other-vae").unwrap();
    other.latent(&ds, 0, false, &dev, &mut fake_encoder(&mut calls)).unwrap();
    assert_eq!(calls, 1);

    // A changed image misses after the dataset is reopened.
    std::thread::sleep(std::time::Duration::from_millis(20));
    solid(&a.join("wide.png"), 150, 100, [250, 0, 0]);
    let ds = open_toml(dir.path());
    let mut calls = 0;
    let mut cache = LatentCache::on_disk(&cache_dir, "fake-vae").unwrap();
    cache.prefill(&ds, &dev, &mut fake_encoder(&mut calls), |_, _| {}).unwrap();
    assert_eq!(calls, 2, "only the two flips of the changed image are encoded again");

    // In memory.
    let mut calls = 0;
    let mut mem = LatentCache::in_memory();
    for _ in 0..2 {
        mem.batch_latents(&ds, &batch, &dev, &mut fake_encoder(&mut calls)).unwrap();
    }
    assert_eq!(calls, batch.len());
    assert_eq!(mem.hits(), batch.len());
}
