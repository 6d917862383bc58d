//! `graft bench`: the graft side of the benchmarks that `tools/bench.sh` compares with diffusers +
//! PEFT (`tools/reference/bench_reference.py` runs the same workloads in torch).
//!
//! Each workload runs in a fresh child process (`graft bench --workload NAME --in-process`), so
//! its peak memory is its own: the resident high-water mark (Linux `VmHWM`) from the start of the
//! timed part, reset through `/proc/self/clear_refs`. A workload prints one JSON object:
//!
//! ```json
//! {"workload": "tiny.unet_forward", "side": "graft", "ms": 12.3, "min_ms": 11.9, "runs": 20,
//!  "peak_mb": 210.0, "delta_mb": 35.1, "threads": 2, "extra": {...}}
//! ```
//!
//! `ms` is the median wall time of one run after warm-up; `peak_mb` the process's resident peak
//! during the timed part; `delta_mb` that peak minus the resident size just before it (what the
//! workload itself needed on top of the loaded model). See `docs/PERFORMANCE.md`.

mod adapters;
mod measure;
mod real;
mod sdxl;
mod tiny;
mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::plugins::PluginDirArgs;
pub use measure::{Measured, Record};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run only these workloads (repeat, or a prefix such as `tiny.` or `real.`). Default: all but
    /// the whole-SDXL ones (`real.load_fp16`, `real.generate_1024_1step`, `real.train_step_*`).
    #[arg(long = "workload", short = 'w', value_name = "NAME")]
    pub workloads: Vec<String>,
    /// List the workloads and exit.
    #[arg(long)]
    pub list: bool,
    /// Threads for tensor work: the size of the thread pool, and candle's count (RAYON_NUM_THREADS). Default: one per CPU.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs per workload (after warm-up). Default: each workload's own count.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Also write the JSON records (one per line) to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The tiny SDXL fixture folder. Default: tests/fixtures/tiny-sdxl of this repository.
    #[arg(long, value_name = "DIR")]
    pub fixture: Option<PathBuf>,
    /// Run the workloads in this process instead of one child process each (peak memory then
    /// carries over from one workload to the next).
    #[arg(long)]
    pub in_process: bool,
    /// Run the whole-SDXL workloads on CUDA GPU 0 (a `--features cuda` build, see
    /// tools/cuda-build.sh); `peak_mb` is then the GPU's used memory. The others stay on the CPU.
    #[arg(long)]
    pub gpu: bool,
    #[command(flatten)]
    pub plugin_dirs: PluginDirArgs,
}

/// What a workload gets.
pub struct Ctx {
    pub fixture: PathBuf,
    pub runs: Option<usize>,
    pub plugin_dirs: PluginDirArgs,
    /// A scratch folder for this process (datasets, adapter files, plugin copies).
    pub scratch: PathBuf,
    /// Where the whole-SDXL workloads run (`--gpu`).
    pub device: candle_core::Device,
}

impl Ctx {
    /// The timed-run count: `--runs` or the workload's default.
    pub fn runs(&self, default: usize) -> usize {
        self.runs.unwrap_or(default).max(1)
    }
}

type RunFn = fn(&Ctx) -> anyhow::Result<Measured>;

/// A named workload.
pub struct Workload {
    pub name: &'static str,
    pub about: &'static str,
    /// Whole-model workloads (minutes, ~16 GB): left out when no workload is named.
    pub heavy: bool,
    run: RunFn,
}

/// Every workload, in the order the table shows them.
pub fn workloads() -> Vec<Workload> {
    let w = |name, about, run| Workload { name, about, heavy: false, run };
    let heavy = |name, about, run| Workload { name, about, heavy: true, run };
    vec![
        w("tiny.text_encoders", "both text encoders, 2 prompts (tiny fixture)", tiny::text_encoders as RunFn),
        w("tiny.unet_forward", "UNet forward, batch 2, 128x96 (tiny fixture)", tiny::unet_forward),
        w("tiny.vae_decode", "VAE decode, 128x96 (tiny fixture)", tiny::vae_decode),
        w("tiny.generate_4steps", "txt2img 128x96, 4 Euler steps, CFG 5 (tiny fixture)", tiny::generate),
        w("tiny.train_step_b1", "LoRA r8 a32 q/k/v/out training step, batch 1, 128x128, v-pred, AdamW", train::tiny_b1),
        w("tiny.train_step_b4", "LoRA r8 a32 q/k/v/out training step, batch 4, 128x128, v-pred, AdamW", train::tiny_b4),
        w("tiny.lora_unfused", "UNet forward with a LoRA r8 file unfused (extra: overhead vs base)", adapters::tiny_unfused),
        w("tiny.lora_fused", "UNet forward with a LoRA r8 file fused (extra: overhead vs base)", adapters::tiny_fused),
        w("tiny.adapter_load_attach", "read a PEFT LoRA file (UNet + both TEs) and attach it", adapters::load_attach),
        w("real.transformer_block_16x16", "SDXL 1280-ch transformer block, 256 tokens (64x64 latent)", real::block_16),
        w("real.transformer_block_32x32", "SDXL 1280-ch transformer block, 1024 tokens (128x128 latent)", real::block_32),
        w("real.attention_32x32", "self-attention of 1024 tokens, 20 heads of 64: forward + backward to q, k, v", real::attention_32),
        w(
            "real.attention_64x64_bf16",
            "the 1024 px self-attention, 4096 tokens, 10 heads of 64, products in bf16: forward + backward",
            real::attention_64_bf16,
        ),
        w("real.resnet_block_16x16", "SDXL 1280-ch resnet block at 16x16 (64x64 latent)", real::resnet_16),
        w("real.resnet_block_32x32", "SDXL 1280-ch resnet block at 32x32 (128x128 latent)", real::resnet_32),
        w("real.block_lora_unfused_32x32", "transformer block 32x32 with LoRA r8 unfused (extra: overhead)", real::block_lora_unfused),
        w("real.block_lora_fused_32x32", "transformer block 32x32 with LoRA r8 fused (extra: overhead)", real::block_lora_fused),
        w("real.block_train_32x32", "transformer block 32x32, LoRA r8 plugin: forward + backward + AdamW", real::block_train),
        heavy("real.load_fp16", "load the 6.9 GB fp16 SDXL folder (random weights) as stored", sdxl::load_fp16 as RunFn),
        heavy(
            "real.generate_1024_1step",
            "full SDXL txt2img 1024x1024, 1 Euler step, CFG 5, VAE decode; bf16 weights",
            sdxl::generate_1024_1step,
        ),
        heavy(
            "real.generate_1024_30steps",
            "full SDXL txt2img 1024x1024, 30 Euler steps, CFG 5, VAE decode; bf16 weights",
            sdxl::generate_1024_30steps,
        ),
        heavy("real.train_step_512", "full SDXL LoRA r16 a16 q/k/v/out step, 512x512, batch 1, bf16 weights", sdxl::train_512),
        heavy("real.train_step_512_ckpt", "real.train_step_512 with gradient checkpointing", sdxl::train_512_ckpt),
        heavy("real.train_step_1024", "full SDXL LoRA r16 a16 q/k/v/out step, 1024x1024, batch 1, bf16 weights", sdxl::train_1024),
        heavy("real.train_step_1024_ckpt", "real.train_step_1024 with gradient checkpointing", sdxl::train_1024_ckpt),
        w("hot_swap", "strategy hot swap over SDXL's hook points: load + check a build, re-plan, reconcile", adapters::hot_swap),
    ]
}

fn select(args: &BenchArgs) -> anyhow::Result<Vec<Workload>> {
    let all = workloads();
    if args.workloads.is_empty() {
        return Ok(all.into_iter().filter(|w| !w.heavy).collect());
    }
    for w in &args.workloads {
        if !all.iter().any(|x| x.name == w || x.name.starts_with(w.as_str())) {
            let names: Vec<&str> = all.iter().map(|x| x.name).collect();
            bail!("unknown workload `{w}`; the workloads are: {}", names.join(", "));
        }
    }
    // A full name selects that workload alone (`real.train_step_512` is also a prefix of
    // `real.train_step_512_ckpt`); anything else is a prefix.
    let matches = |name: &str, w: &str| name == w || (!all.iter().any(|x| x.name == w) && name.starts_with(w));
    let keep: Vec<bool> = all.iter().map(|x| args.workloads.iter().any(|w| matches(x.name, w))).collect();
    Ok(all.into_iter().zip(keep).filter(|(_, k)| *k).map(|(x, _)| x).collect())
}

/// The tiny fixture: `--fixture`, else tests/fixtures/tiny-sdxl under the current folder or this
/// source tree.
fn fixture(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(f) = &args.fixture {
        if !f.is_dir() {
            bail!("--fixture {}: not a folder (expected the tiny SDXL fixture, tests/fixtures/tiny-sdxl)", f.display());
        }
        return Ok(f.clone());
    }
    let local = PathBuf::from("tests/fixtures/tiny-sdxl");
    if local.is_dir() {
        return Ok(local);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sdxl");
    if built.is_dir() {
        return Ok(built);
    }
    bail!("no tiny SDXL fixture found: run from the repository root or pass --fixture tests/fixtures/tiny-sdxl")
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let selected = select(&args)?;
    if args.list {
        for w in &selected {
            println!("{:<32} {}", w.name, w.about);
        }
        return Ok(());
    }
    match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        // `graft` sizes its pool (and candle's count) before it starts; a caller of this
        // library whose pool differs gets a pool of the size asked for.
        Some(n) if rayon::current_num_threads() != n => {
            let pool = crate::runtime::pool_builder().num_threads(n).build()?;
            pool.install(|| run_selected(&args, &selected))
        }
        _ => run_selected(&args, &selected),
    }
}

fn run_selected(args: &BenchArgs, selected: &[Workload]) -> anyhow::Result<()> {
    let fixture = fixture(args)?;
    let mut out = match &args.json {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("--json {}: cannot create", p.display()))?),
        None => None,
    };
    let only_one = selected.len() == 1;
    for w in selected {
        let record = if args.in_process || only_one { run_here(w, args, &fixture)? } else { run_child(w, args, &fixture)? };
        let line = serde_json::to_string(&record)?;
        println!("{line}");
        if let Some(f) = out.as_mut() {
            writeln!(f, "{line}")?;
        }
    }
    Ok(())
}

fn run_here(w: &Workload, args: &BenchArgs, fixture: &Path) -> anyhow::Result<Record> {
    let scratch = std::env::temp_dir().join(format!("graft-bench-{}-{}", std::process::id(), w.name));
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let device = if args.gpu && w.heavy { graft_runtime::device::pick(false)? } else { candle_core::Device::Cpu };
    if args.gpu && w.heavy && device.is_cpu() {
        bail!("--gpu: no CUDA GPU is available to this build (see the log above)");
    }
    let ctx = Ctx { fixture: fixture.to_path_buf(), runs: args.runs, plugin_dirs: args.plugin_dirs.clone(), scratch: scratch.clone(), device };
    let result = (w.run)(&ctx).with_context(|| format!("workload {}", w.name));
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(result?.record(w.name))
}

/// Runs one workload in a child process of this same binary and reads its JSON line.
fn run_child(w: &Workload, args: &BenchArgs, fixture: &Path) -> anyhow::Result<Record> {
    let exe = std::env::current_exe().context("cannot find the graft executable to run a workload")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--in-process", "--workload", w.name]).arg("--fixture").arg(fixture);
    if let Some(n) = args.threads {
        cmd.args(["--threads", &n.to_string()]);
    }
    if let Some(r) = args.runs {
        cmd.args(["--runs", &r.to_string()]);
    }
    if args.gpu {
        cmd.arg("--gpu");
    }
    for d in &args.plugin_dirs.plugins {
        cmd.arg("--plugins").arg(d);
    }
    if let Some(c) = &args.plugin_dirs.plugin_config {
        cmd.arg("--plugin-config").arg(c);
    }
    if args.plugin_dirs.no_default_plugins {
        cmd.arg("--no-default-plugins");
    }
    let output = cmd.stderr(std::process::Stdio::inherit()).output().context("cannot run a bench child process")?;
    if !output.status.success() {
        bail!("workload {} failed ({})", w.name, output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("workload {}: no JSON output", w.name))?;
    serde_json::from_str(line).with_context(|| format!("workload {}: bad JSON output", w.name))
}
