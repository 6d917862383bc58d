//! `cargo bench -p graft-host --bench adapters`: what adapter files cost.
//!
//! 1. An SDXL-size LoRA (rank 32 on all 722 UNet linears and the 264 text-encoder linears of
//!    SDXL base, random weights, a kohya file in float16 written to a temporary folder): reading
//!    the file's bytes, against parsing it (f16 -> f32), reading it as an adapter (key map, shape
//!    checks) and attaching it to a (shape-only) SDXL model, and fusing it into the base weights.
//!    Fusing every layer at once would hold about 11 GB of f32 weights, so it runs one
//!    transformer block (text-encoder layer) at a time, unfusing in between; the sum is the
//!    fuse time.
//! 2. The overhead of an unfused LoRA on a forward pass: the tiny fixture UNet with the fixture
//!    LoRA (rank 4 on all 192 linears), and one real-size SDXL transformer block (dim 1280,
//!    20 heads, 2 x 1024 tokens, context 2 x 77 x 2048) with a rank-32 LoRA on its 10 linears;
//!    base, unfused and fused.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use graft_formats::{AdapterFile, AdapterFormat, KohyaMetadata, LoadReport, ModuleWeights, StoreDtype};
use graft_host::adapters::files::FileAdapters;
use graft_sdxl::hooks::{BlockPosition, HookRegistry, NoHooks};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::sgm::SgmLayout;
use graft_sdxl::unet::transformer::BasicTransformerBlock;
use graft_sdxl::{LayerKind, PipelineHooks, SdxlConfig, SdxlModel};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The group a hook point is fused with: its transformer block or text-encoder layer.
fn chunk(name: &str) -> String {
    for marker in [".transformer_blocks.", ".layers."] {
        if let Some(i) = name.find(marker) {
            let rest = &name[i + marker.len()..];
            let n = rest.split('.').next().unwrap_or("");
            return format!("{}{marker}{n}", &name[..i]);
        }
    }
    name.rsplit_once('.').map(|(p, _)| p.to_string()).unwrap_or_default()
}

fn sdxl_file(dir: &Path, rank: usize) -> (PathBuf, usize) {
    let config = SdxlConfig::sdxl_base();
    let layers = graft_sdxl::model::layers_of(&config).unwrap();
    let mut rng = GraftRng::new(1);
    let mut modules = Vec::new();
    for l in layers.iter().filter(|l| l.kind == LayerKind::Linear) {
        let down = (rng.randn((rank, l.in_features), &Device::Cpu).unwrap() * 0.02).unwrap();
        let up = (rng.randn((l.out_features, rank), &Device::Cpu).unwrap() * 0.02).unwrap();
        modules.push(ModuleWeights::lora(l.name.clone(), down, up, Some(rank as f32 / 2.0)));
    }
    let path = dir.join("sdxl_rank32.safetensors");
    graft_formats::write_kohya(&path, &modules, &SgmLayout::sdxl(), &KohyaMetadata::new("bench"), StoreDtype::F16).unwrap();
    (path, modules.len())
}

fn sdxl_file_costs() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (path, n) = sdxl_file(dir.path(), 32);
    let bytes = std::fs::metadata(&path).unwrap().len();
    println!("SDXL LoRA, rank 32 on {n} linears: {:.0} MB float16 file (written in {:.1} s)", bytes as f64 / 1e6, secs(t));

    // Drop the page cache copy is not possible without root: the read is from memory, as a
    // second run of a generation would be.
    let t = Instant::now();
    let raw_bytes = std::fs::read(&path).unwrap();
    let read_s = secs(t);
    drop(raw_bytes);
    let t = Instant::now();
    let raw = graft_formats::read::read_file(&path).unwrap();
    let parse_s = secs(t);

    let t = Instant::now();
    let model = graft_host::tools::shape_model(&SdxlConfig::sdxl_base()).unwrap();
    let mut files = FileAdapters::new(&model).unwrap();
    let setup_s = secs(t);
    let t = Instant::now();
    let (file, report) = graft_formats::read_raw(&raw, files.keys()).unwrap();
    let map_s = secs(t);
    drop(raw);
    assert!(report.unmatched_keys.is_empty());
    let t = Instant::now();
    files.add("bench", &path, file, report, 1.0, 1.0).unwrap();
    let attach_s = secs(t);
    let t = Instant::now();
    let mut files2 = FileAdapters::new(&model).unwrap();
    files2.load(&path, "bench2", 1.0, 1.0).unwrap();
    let load_attach_s = secs(t);
    drop(files2);
    println!("  read the file's bytes:                    {:>7.3} s", read_s);
    println!("  parse (f16 -> f32 tensors):               {:>7.3} s", parse_s);
    println!("  key map + shape checks ({n} layers):     {:>7.3} s", map_s);
    println!("  attach (concatenate, scale):              {:>7.3} s", attach_s);
    println!("  load + attach in one call (FileAdapters::load): {:.3} s = {:.1}x the raw read", load_attach_s, load_attach_s / read_s);
    println!("  (hook-point list of a shape-only SDXL: {:.3} s; resident memory now {:.0} MB)", setup_s, rss_mb());

    // Fuse one chunk at a time (each fused chunk is unfused before the next).
    let mut chunks: Vec<String> = model.layers().iter().filter(|l| l.kind == LayerKind::Linear).map(|l| chunk(&l.name)).collect();
    chunks.dedup();
    let (mut fuse_s, mut unfuse_s, mut fused) = (0.0, 0.0, 0);
    for c in &chunks {
        let t = Instant::now();
        fused += files.fuse_where(|l| chunk(&l.name) == *c).unwrap();
        fuse_s += secs(t);
        let t = Instant::now();
        files.unfuse();
        unfuse_s += secs(t);
    }
    println!(
        "  fuse all {fused} layers (in {} chunks): {:.2} s ({:.1}x the raw read); unfuse (put the kept tensors back): {:.4} s",
        chunks.len(),
        fuse_s,
        fuse_s / read_s,
        unfuse_s
    );
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    secs(t) / reps as f64
}

fn tiny_unet_overhead() {
    let model = SdxlModel::load(&fixtures().join("tiny-sdxl"), None, &Device::Cpu).unwrap();
    let r: HashMap<String, Tensor> = candle_core::safetensors::load(fixtures().join("reference/unet.safetensors"), &Device::Cpu).unwrap();
    let run = |hooks: PipelineHooks| {
        model.unet.forward(&r["sample"], &r["timesteps"], &r["encoder_hidden_states"], &r["text_embeds"], &r["time_ids"], hooks.unet).unwrap();
    };
    let reps = 30;
    let base = time(reps, || run(PipelineHooks::none()));
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&fixtures().join("lora/kohya_sgm.safetensors"), "fixture", 1.0, 1.0).unwrap();
    let unfused = time(reps, || run(files.hooks(PipelineHooks::none()).pipeline()));
    let mut two = FileAdapters::new(&model).unwrap();
    two.load(&fixtures().join("lora/kohya_sgm.safetensors"), "a", 0.5, 0.5).unwrap();
    two.load(&fixtures().join("lora/peft_diffusers.safetensors"), "b", 0.5, 0.5).unwrap();
    let unfused_two = time(reps, || run(two.hooks(PipelineHooks::none()).pipeline()));
    drop(two);
    files.fuse().unwrap();
    let fused = time(reps, || run(files.hooks(PipelineHooks::none()).pipeline()));
    files.unfuse();
    println!("tiny UNet forward (batch 2, 12x16 latents), LoRA rank 4 on all 192 linears:");
    println!(
        "  base {:.2} ms, unfused {:.2} ms (+{:.0}%), two LoRAs unfused {:.2} ms (+{:.0}%), fused {:.2} ms",
        base * 1e3,
        unfused * 1e3,
        (unfused / base - 1.0) * 100.0,
        unfused_two * 1e3,
        (unfused_two / base - 1.0) * 100.0,
        fused * 1e3
    );
}

fn real_block_overhead() {
    let dev = Device::Cpu;
    let (dim, ctx, heads, tokens, rank) = (1280, 2048, 20, 1024, 32);
    // Learn the block's parameters, then build it from random ones.
    let (vb, requests) = graft_sdxl::varbuilder::shape_only(&dev);
    BasicTransformerBlock::new(vb, dim, ctx, heads, &mut HookRegistry::new(), BlockPosition::Down(2)).unwrap();
    let mut rng = GraftRng::new(2);
    let mut tensors = HashMap::new();
    for (name, shape) in requests.lock().unwrap().iter() {
        let fan_in = shape.last().copied().unwrap_or(1) as f64;
        let t = if name.ends_with("weight") && shape.len() == 2 {
            (rng.randn(shape.as_slice(), &dev).unwrap() / fan_in.sqrt()).unwrap()
        } else if name.contains("norm") && name.ends_with("weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &dev).unwrap()
        } else {
            (rng.randn(shape.as_slice(), &dev).unwrap() * 0.02).unwrap()
        };
        tensors.insert(name.clone(), t);
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let mut reg = HookRegistry::new();
    let block = BasicTransformerBlock::new(vb, dim, ctx, heads, &mut reg, BlockPosition::Down(2)).unwrap();
    let x = rng.randn((2, tokens, dim), &dev).unwrap();
    let c = rng.randn((2, 77, ctx), &dev).unwrap();

    let empty = HookRegistry::new();
    let mut files = FileAdapters::from_registries([&reg, &empty, &empty], &SgmLayout::sdxl(), &dev);
    let mut modules = Vec::new();
    for l in reg.layers().iter().filter(|l| l.kind == LayerKind::Linear) {
        let down = (rng.randn((rank, l.in_features), &dev).unwrap() * 0.02).unwrap();
        let up = (rng.randn((l.out_features, rank), &dev).unwrap() * 0.02).unwrap();
        modules.push(ModuleWeights::lora(l.name.clone(), down, up, None));
    }
    let n = modules.len();
    let report = LoadReport { file: PathBuf::from("random"), format: AdapterFormat::Kohya, attached: Vec::new(), unmatched_keys: Vec::new(), warnings: Vec::new(), native: None };
    let file = AdapterFile { format: AdapterFormat::Kohya, metadata: BTreeMap::new(), modules };
    files.add("random", Path::new("random"), file, report, 1.0, 1.0).unwrap();

    let reps = 3;
    let base = time(reps, || {
        block.forward(&x, &c, &NoHooks).unwrap();
    });
    let unfused = time(reps, || {
        let h = files.hooks(PipelineHooks::none());
        block.forward(&x, &c, &h.unet).unwrap();
    });
    let t = Instant::now();
    files.fuse().unwrap();
    let fuse_s = secs(t);
    let fused = time(reps, || {
        let h = files.hooks(PipelineHooks::none());
        block.forward(&x, &c, &h.unet).unwrap();
    });
    files.unfuse();
    println!("one SDXL transformer block (dim {dim}, {heads} heads, 2 x {tokens} tokens, context 2 x 77 x {ctx}), LoRA rank {rank} on its {n} linears:");
    println!(
        "  base {:.0} ms, unfused {:.0} ms (+{:.1}%), fused {:.0} ms (fusing the block: {:.0} ms)",
        base * 1e3,
        unfused * 1e3,
        (unfused / base - 1.0) * 100.0,
        fused * 1e3,
        fuse_s * 1e3
    );
}

fn main() {
    println!("threads: {} (candle CPU)", candle_core::utils::get_num_threads());
    sdxl_file_costs();
    tiny_unet_overhead();
    real_block_overhead();
}
