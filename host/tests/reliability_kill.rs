//! Crash safety of `graft train`, with the real `graft` binary as a child process.
//!
//! A run (tiny model, LoRA with dropout, cosine schedule with warmup, latents cached on disk, a
//! checkpoint every step) is killed with SIGKILL at seeded random moments of what is left of it:
//! during start-up and latent caching, during steps, during checkpoint and export writes. After every kill: every
//! `.safetensors` file at a final name parses whole, the latest checkpoint loads into a trainer,
//! the loss log reads, and no completed checkpoint is lost. Each time the run is resumed with
//! `--resume`; the final parameters, exports and loss log equal an uninterrupted run's bit for bit.
//!
//! Also the trust model through the binary: `graft plugins list` shows each library's path and
//! SHA-256, a plugin folder writable by everyone is refused, plugins come only from the folders
//! given.

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;
use graft_trainer::{checkpoint, losslog};

const GRAFT: &str = env!("CARGO_BIN_EXE_graft");
const STEPS: u64 = 10;
const KILLS: usize = 10;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = workspace().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lib_file(crate_name: &str) -> String {
    format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

/// Builds a workspace plugin crate into target/plugin-tests (as the graft-tests do) and copies it
/// into a folder of its own.
fn plugin_dir(crate_name: &str, test: &str) -> PathBuf {
    let target = workspace().join("target/plugin-tests");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace())
        .args(["build", "-p", crate_name, "--target-dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(out.status.success(), "building {crate_name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let dir = scratch(test);
    std::fs::copy(target.join("debug").join(lib_file(crate_name)), dir.join(lib_file(crate_name))).unwrap();
    dir
}

/// A small seeded generator for the kill points (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn setup(dir: &Path) -> PathBuf {
    graft_host::demo::dataset::write_dataset(&dir.join("data"), 4, 64).unwrap();
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"killed\"\nseed = 11\nsteps = {STEPS}\n\
         lr_schedule = \"cosine\"\nwarmup_steps = 2\nsave_every = 1\ncache_latents = \"disk\"\n\
         [dataset]\ndir = \"data\"\nresolution = 64\nflip_aug = true\n\n\
         [strategy]\nplugin = \"lora\"\nconfig = {{ rank = 4, alpha = 2, unet_lr = 0.01, dropout = 0.2 }}\n",
        workspace().join("tests/fixtures/tiny-sdxl").to_str().unwrap()
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn train_command(config: &Path, plugins: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(GRAFT);
    cmd.args(["train", "--resume", "--no-default-plugins", "--cpu", "--config"])
        .arg(config)
        .arg("--plugins")
        .arg(plugins)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap());
    cmd
}

/// Every `.safetensors` file at a final name under `dir` parses whole (temporary names start
/// with `.`). Returns how many.
fn assert_no_partial_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in rd {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            n += assert_no_partial_files(&p);
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            if let Err(e) = safetensors::SafeTensors::deserialize(&bytes) {
                panic!("{} is half-written: {e}", p.display());
            }
            n += 1;
        }
    }
    n
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect();
    out.sort();
    out
}

/// Temporary files and folders (names starting with `.`) under `dir`: something was being
/// written when the run was killed (or a kill before left them).
fn temporaries(dir: &Path, into: &mut std::collections::BTreeSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for p in rd.map(|e| e.unwrap().path()) {
        if p.file_name().unwrap().to_string_lossy().starts_with('.') {
            into.insert(p);
        } else if p.is_dir() {
            temporaries(&p, into);
        }
    }
}

fn leftovers(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut set = std::collections::BTreeSet::new();
    temporaries(dir, &mut set);
    set
}

fn completed_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("loss.jsonl")).map(|t| t.matches('\n').count()).unwrap_or(0)
}

#[test]
fn killed_training_resumes_to_the_same_parameters() {
    let plugins = plugin_dir("lora", "reliability_kill_plugins");
    let manager = || {
        let mut m = PluginManager::new(vec![SearchDir { path: plugins.clone(), origin: DirOrigin::Flag }]);
        m.scan();
        m
    };

    // The uninterrupted run.
    let ref_dir = scratch("reliability_kill_ref");
    let ref_config = setup(&ref_dir);
    let started = Instant::now();
    let mut child = train_command(&ref_config, &plugins, &ref_dir.join("stderr.log")).spawn().unwrap();
    let ref_out = ref_dir.join("out");
    let mut first_step = None;
    let status = loop {
        if first_step.is_none() && completed_steps(&ref_out) > 0 {
            first_step = Some(started.elapsed());
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "reference run failed: {}", std::fs::read_to_string(ref_dir.join("stderr.log")).unwrap());
    let full = started.elapsed();
    // Start-up (model, latents) until the first step is logged, then the time per step.
    let startup = first_step.unwrap_or(full / 2);
    let step_time = (full - startup) / STEPS as u32;

    // The run that is killed again and again.
    let dir = scratch("reliability_kill_run");
    let config = setup(&dir);
    let out = dir.join("out");
    let log = dir.join("stderr.log");
    let mut rng = Rng(0x5eed_c0de_2026);
    let mut kills = 0;
    let mut runs = 0;
    let mut last_step = 0;
    let mut landed = Vec::new();
    let mut mid_write = 0;
    let mut seen_temporaries = std::collections::BTreeSet::new();
    while kills < KILLS {
        runs += 1;
        assert!(runs <= 3 * KILLS, "only {kills} of {KILLS} kills landed in {runs} sessions: {landed:?}");
        let mut child = train_command(&config, &plugins, &log).spawn().unwrap();
        // Three kinds of kill point, in turn: a random moment of start-up (model loading, latent
        // caching); a random moment of a random later step (its forward, backward, update, loss
        // log line or checkpoint); the moment a file is being written (a checkpoint's `.partial`
        // folder, an export's or a cache entry's temporary file).
        let steps_left = STEPS - last_step;
        let kind = if kills % 3 == 1 && steps_left < 3 { 0 } else { kills % 3 };
        let target_steps = last_step as usize + 2 + rng.below(steps_left.saturating_sub(2)) as usize;
        let mut deadline = match kind {
            0 => Some(Instant::now() + Duration::from_millis(rng.below(startup.as_millis() as u64))),
            1 => None, // set once the log reaches `target_steps`
            _ => Some(Instant::now() + full * 2),
        };
        let mut finished = false;
        loop {
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    break;
                }
            } else if completed_steps(&out) >= target_steps {
                deadline = Some(Instant::now() + Duration::from_millis(rng.below(step_time.as_millis() as u64 * 3 / 2)));
            }
            if kind == 2 && !leftovers(&out).is_subset(&seen_temporaries) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(if kind == 2 { 200 } else { 1000 }));
        }
        if finished {
            // It completed before the kill: start over from a fresh run to keep killing.
            assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
            let _ = std::fs::remove_dir_all(&out);
            seen_temporaries.clear();
            last_step = 0;
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        landed.push(completed_steps(&out));
        let now = leftovers(&out);
        if !now.is_subset(&seen_temporaries) {
            mid_write += 1;
        }
        seen_temporaries.extend(now);

        // Nothing half-written, the latest checkpoint loads, the log reads, nothing lost.
        assert_no_partial_files(&out);
        if out.join("loss.jsonl").exists() {
            losslog::read(&out.join("loss.jsonl")).unwrap();
        }
        if let Some(ckpt) = checkpoint::latest(&out).unwrap() {
            // A trainer of its own (same run identity, another output folder) loads it.
            let mut c = TrainConfig::from_file(&config).unwrap();
            c.output_dir = dir.join("verify");
            let mut t = Trainer::new(c, manager(), &Device::Cpu).unwrap();
            checkpoint::load(&mut t, &ckpt).unwrap();
            assert!(t.step >= last_step, "checkpoint went back from step {last_step} to {}", t.step);
            last_step = t.step;
        }
    }
    // The last session runs to the end.
    let status = train_command(&config, &plugins, &log).status().unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap());
    println!(
        "{kills} kills landed after {landed:?} logged steps ({mid_write} while a file was being written), \
         {runs} sessions, full run {full:?}"
    );

    // Bit for bit the uninterrupted run's parameters, optimizer state, exports and losses.
    let last = format!("checkpoints/step-{STEPS:06}");
    let first_difference = || {
        (1..=STEPS).find(|s| {
            let f = format!("checkpoints/step-{s:06}/params.safetensors");
            out.join(&f).exists() && tensors(&out.join(&f)) != tensors(&ref_out.join(&f))
        })
    };
    for f in ["params.safetensors", "optimizer.safetensors"] {
        assert!(
            tensors(&out.join(&last).join(f)) == tensors(&ref_out.join(&last).join(f)),
            "{f} differs after {kills} kills (landed after {landed:?} logged steps); the first checkpoint that differs: {:?}",
            first_difference()
        );
    }
    for f in ["killed.safetensors", "killed.peft.safetensors"] {
        assert!(tensors(&out.join(f)) == tensors(&ref_out.join(f)), "{f} differs after {kills} kills");
    }
    let losses =
        |o: &Path| losslog::read(&o.join("loss.jsonl")).unwrap().iter().map(|e| (e.step, e.loss.to_bits(), e.skipped)).collect::<Vec<_>>();
    assert_eq!(losses(&out), losses(&ref_out), "the loss log differs");
    assert_eq!(losses(&out).len(), STEPS as usize);
    assert!(assert_no_partial_files(&out) >= 3 * STEPS as usize);
}

#[test]
fn plugins_list_shows_path_and_sha256_and_refuses_writable_folders() {
    use std::os::unix::fs::PermissionsExt;
    let dir = plugin_dir("lora", "reliability_trust_plugins");
    let other = plugin_dir("fault-plugin", "reliability_trust_other");
    let lib = dir.join(lib_file("lora"));
    let sha = {
        let out = Command::new("sha256sum").arg(&lib).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let list = |extra: &[&str]| {
        let out = Command::new(GRAFT)
            .args(["plugins", "list", "--no-default-plugins", "--plugins"])
            .arg(&dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (text, _) = list(&[]);
    let canonical = lib.canonicalize().unwrap();
    let row = text.lines().find(|l| l.starts_with("lora ")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("active") && row.contains(&sha[..16]) && row.contains(&canonical.display().to_string()), "{row}");
    // Only the folders given: the plugin in another folder is not there.
    assert!(!text.contains("fault-plugin") && !text.contains(&other.display().to_string()), "{text}");
    let (json, _) = list(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let entry = &v["plugins"][0];
    assert_eq!((entry["sha256"].as_str(), entry["status"].as_str()), (Some(sha.as_str()), Some("active")));

    // A folder anyone can write to: refused, with the reason, in the list and in a run.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (text, stderr) = list(&[]);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(text.contains("refused") && text.contains("writable by everyone"), "{text}");
    assert!(stderr.contains("refused"), "a warning too: {stderr}");
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(GRAFT).args(["plugins", "check"]).arg(&lib).output().unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("refused") && e.contains("chmod o-w"), "{e}");
}
