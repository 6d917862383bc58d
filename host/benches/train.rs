//! `cargo bench -p graft-host --bench train`: time per training step and peak memory on the
//! tiny model, for each shipped strategy at batch 1 and 4 (64x64 images, latents cached).
//!
//! Peak memory is the process's resident high-water mark (Linux VmHWM), reset before each row
//! through /proc/self/clear_refs; elsewhere it reads 0.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn build_plugins() -> PathBuf {
    let target = workspace().join("target/plugin-tests");
    let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace())
        .args(["build", "-q", "--release", "-p", "lora", "-p", "attention-gate", "-p", "progressive-fusion", "--target-dir"])
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(status.success());
    target.join("release")
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let plugins = build_plugins();
    let dir = std::env::temp_dir().join(format!("graft-train-bench-{}", std::process::id()));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..8u32 {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, (i * 30) as u8]));
        img.save(data.join(format!("{i}.png"))).unwrap();
        std::fs::write(data.join(format!("{i}.txt")), format!("image {i}, pastel line art")).unwrap();
    }
    let strategies =
        [("lora", "{ rank = 8, alpha = 32 }"), ("attention-gate", "{}"), ("progressive-fusion", "{ stage1_steps = 2, stage2_steps = 2 }")];
    println!("graft training step, tiny SDXL, 64x64, CPU {} threads (median of 6 steps after 2 warm-up)", candle_core::utils::get_num_threads());
    println!("{:<20} {:>5} {:>14} {:>14}", "strategy", "batch", "ms / step", "peak RSS MB");
    for (plugin, config) in strategies {
        for batch in [1usize, 4] {
            let text = format!(
                "model = {:?}\noutput_dir = {:?}\nseed = 1\nsteps = 100\nbatch_size = {batch}\n\
                 [dataset]\ndir = {:?}\nresolution = 64\n[strategy]\nplugin = \"{plugin}\"\nconfig = {config}\n",
                workspace().join("tests/fixtures/tiny-sdxl"),
                dir.join("out"),
                data
            );
            let path = dir.join("train.toml");
            std::fs::write(&path, text).unwrap();
            let mut m = PluginManager::new(vec![SearchDir { path: plugins.clone(), origin: DirOrigin::Flag }]);
            m.scan();
            reset_peak();
            let mut t = Trainer::new(TrainConfig::from_file(&path).unwrap(), m, &Device::Cpu).unwrap();
            let mut times = Vec::new();
            for i in 0..8 {
                let start = Instant::now();
                t.train_step().unwrap();
                if i >= 2 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("{:<20} {:>5} {:>14.1} {:>14.0}", plugin, batch, times[times.len() / 2], peak_rss_mb());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
