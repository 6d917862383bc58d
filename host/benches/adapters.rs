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

use candle_core::Module;
use candle_core::{DType, Device, Tensor};
use graft_formats::{AdapterFile, AdapterFormat, KohyaMetadata, LoadReport, ModuleWeights, StoreDtype};
use graft_runtime::adapters::files::FileAdapters;
use graft_sdxl::hooks::{AttentionKind, BlockPosition, Component, HookRegistry, Hooks, LayerInfo, NoHooks};
use graft_sdxl::nn::{HookedLinear, LayerNorm};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::sgm::SgmLayout;
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

    // Fuse one chunk at a time (each fused chunk is unfused before the next). The shape-only
    // weights are zero views; each chunk's are made real (untimed) so the timed addition is the
    // one a loaded model does.
    let mut chunks: Vec<String> = Vec::new();
    for l in model.layers().iter().filter(|l| l.kind == LayerKind::Linear) {
        let c = chunk(&l.name);
        if !chunks.contains(&c) {
            chunks.push(c);
        }
    }
    let shared: Vec<(String, graft_sdxl::hooks::SharedLinear)> = model
        .registries()
        .iter()
        .flat_map(|r| r.layers().iter().enumerate().filter_map(|(i, l)| Some((l.name.clone(), r.linear_weights(i)?.clone()))))
        .collect();
    let (mut fuse_s, mut fuse_cpu, mut unfuse_s, mut fused) = (0.0, 0.0, 0.0, 0);
    // The chunk's weights read into memory first (an override of the bench's own), so the fuse
    // times the arithmetic, not the page reads.
    let in_memory = graft_sdxl::overrides::Holder::new("bench").owner(None, graft_sdxl::overrides::OverrideKind::Fuse);
    for c in &chunks {
        for (_, w) in shared.iter().filter(|(n, _)| chunk(n) == *c) {
            let mut copy = w.current();
            copy.weight = copy.weight.contiguous().unwrap().copy().unwrap();
            w.push(in_memory.clone(), copy).unwrap();
        }
        let (t, cpu) = (Instant::now(), cpu_s());
        fused += files.fuse_where(|l| chunk(&l.name) == *c).unwrap();
        fuse_s += secs(t);
        fuse_cpu += cpu_s() - cpu;
        let t = Instant::now();
        files.unfuse();
        unfuse_s += secs(t);
        for (_, w) in shared.iter().filter(|(n, _)| chunk(n) == *c) {
            w.pop(&in_memory).unwrap();
        }
    }
    println!(
        "  fuse all {fused} layers (in {} chunks): {:.2} s wall, {:.2} s CPU ({:.1}x the raw read); unfuse (put the kept tensors back): {:.4} s",
        chunks.len(),
        fuse_s,
        fuse_cpu,
        fuse_s / read_s,
        unfuse_s
    );
}

/// CPU seconds used by the process so far (all threads; /proc/self/stat, 10 ms ticks).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Runs each closure `reps` times in turns (the machine may be shared: turns spread any
/// disturbance over all of them). Returns, per closure, the fastest wall time and the mean CPU
/// time of a run (CPU time barely moves when other processes compete for the cores).
fn race(reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<(f64, f64)> {
    for f in fs.iter_mut() {
        f(); // warm-up
    }
    let mut best = vec![f64::MAX; fs.len()];
    let mut cpu = vec![0.0; fs.len()];
    for _ in 0..reps {
        for (i, f) in fs.iter_mut().enumerate() {
            let (t, c) = (Instant::now(), cpu_s());
            f();
            best[i] = best[i].min(secs(t));
            cpu[i] += cpu_s() - c;
        }
    }
    best.into_iter().zip(cpu).map(|(b, c)| (b, c / reps as f64)).collect()
}

/// `wall ms / cpu ms` of a race entry, and its overhead over `base` in both.
fn fig(t: (f64, f64), base: Option<(f64, f64)>) -> String {
    let mut s = format!("{:.1} ms wall / {:.1} ms CPU", t.0 * 1e3, t.1 * 1e3);
    if let Some(b) = base {
        s.push_str(&format!(" ({:+.0}% wall, {:+.0}% CPU)", (t.0 / b.0 - 1.0) * 100.0, (t.1 / b.1 - 1.0) * 100.0));
    }
    s
}

fn tiny_unet_overhead() {
    let model = SdxlModel::load(&fixtures().join("tiny-sdxl"), None, &Device::Cpu).unwrap();
    let r: HashMap<String, Tensor> = candle_core::safetensors::load(fixtures().join("reference/unet.safetensors"), &Device::Cpu).unwrap();
    let run = |hooks: PipelineHooks| {
        model.unet.forward(&r["sample"], &r["timesteps"], &r["encoder_hidden_states"], &r["text_embeds"], &r["time_ids"], hooks.unet).unwrap();
    };
    let reps = 30;
    let mut files = FileAdapters::new(&model).unwrap();
    files.load(&fixtures().join("lora/kohya_sgm.safetensors"), "fixture", 1.0, 1.0).unwrap();
    let mut two = FileAdapters::new(&model).unwrap();
    two.load(&fixtures().join("lora/kohya_sgm.safetensors"), "a", 0.5, 0.5).unwrap();
    two.load(&fixtures().join("lora/peft_diffusers.safetensors"), "b", 0.5, 0.5).unwrap();
    let t = race(
        reps,
        &mut [&mut || run(PipelineHooks::none()), &mut || run(files.hooks(PipelineHooks::none()).pipeline()), &mut || {
            run(two.hooks(PipelineHooks::none()).pipeline())
        }],
    );
    let (base, unfused, unfused_two) = (t[0], t[1], t[2]);
    drop(two);
    files.fuse().unwrap();
    let fused = race(reps, &mut [&mut || run(files.hooks(PipelineHooks::none()).pipeline())])[0];
    files.unfuse();
    println!("tiny UNet forward (batch 2, 12x16 latents), LoRA rank 4 on all 192 linears:");
    println!("  base:              {}", fig(base, None));
    println!("  unfused:           {}", fig(unfused, Some(base)));
    println!("  two LoRAs unfused: {}", fig(unfused_two, Some(base)));
    println!("  fused:             {}", fig(fused, Some(base)));
}

/// diffusers' `BasicTransformerBlock` as SDXL has it (LayerNorm -> self-attention, LayerNorm ->
/// cross-attention, LayerNorm -> GEGLU feed-forward, residuals), from graft's public hooked
/// linears: the same ten hook points and the same matmuls as the UNet's block.
struct Block {
    norms: [LayerNorm; 3],
    attn: [[HookedLinear; 4]; 2],
    ff: [HookedLinear; 2],
    heads: usize,
}

impl Block {
    fn new(vb: candle_nn::VarBuilder, dim: usize, ctx: usize, heads: usize, reg: &mut HookRegistry) -> Self {
        let info = |a: Option<AttentionKind>| LayerInfo {
            name: String::new(),
            kind: LayerKind::Linear,
            component: Component::Unet,
            in_features: 0,
            out_features: 0,
            block: BlockPosition::Down(2),
            attention: a,
            conv: None,
        };
        let lin = |vb: candle_nn::VarBuilder, i: usize, o: usize, bias: bool, reg: &mut HookRegistry, a: Option<AttentionKind>| {
            HookedLinear::new(vb, i, o, bias, reg, info(a)).unwrap()
        };
        let norm = |n: &str| LayerNorm::new(vb.pp(n), dim, 1e-5).unwrap();
        let mut attn = Vec::new();
        for (name, kv, kind) in [("attn1", dim, AttentionKind::SelfAttention), ("attn2", ctx, AttentionKind::CrossAttention)] {
            let a = vb.pp(name);
            let k = Some(kind);
            attn.push([
                lin(a.pp("to_q"), dim, dim, false, reg, k),
                lin(a.pp("to_k"), kv, dim, false, reg, k),
                lin(a.pp("to_v"), kv, dim, false, reg, k),
                lin(a.pp("to_out").pp("0"), dim, dim, true, reg, k),
            ]);
        }
        let ff = [lin(vb.pp("ff.net.0.proj"), dim, 8 * dim, true, reg, None), lin(vb.pp("ff.net.2"), 4 * dim, dim, true, reg, None)];
        let attn: [[HookedLinear; 4]; 2] = attn.try_into().ok().unwrap();
        Self { norms: [norm("norm1"), norm("norm2"), norm("norm3")], attn, ff, heads }
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, hooks: &dyn Hooks) -> Tensor {
        let attend = |p: &[HookedLinear; 4], h: &Tensor, kv: &Tensor| {
            let q = p[0].forward(h, hooks).unwrap();
            let k = p[1].forward(kv, hooks).unwrap();
            let v = p[2].forward(kv, hooks).unwrap();
            p[3].forward(&graft_sdxl::nn::attention(&q, &k, &v, self.heads, false, candle_core::DType::F32).unwrap(), hooks).unwrap()
        };
        let h = self.norms[0].forward(x).unwrap();
        let x = (attend(&self.attn[0], &h, &h) + x).unwrap();
        let h = self.norms[1].forward(&x).unwrap();
        let x = (attend(&self.attn[1], &h, ctx) + &x).unwrap();
        let h = self.ff[0].forward(&self.norms[2].forward(&x).unwrap(), hooks).unwrap();
        let inner = h.dim(2).unwrap() / 2;
        let g = (h.narrow(2, 0, inner).unwrap() * h.narrow(2, inner, inner).unwrap().gelu_erf().unwrap()).unwrap();
        (self.ff[1].forward(&g, hooks).unwrap() + &x).unwrap()
    }
}

fn real_block_overhead() {
    let dev = Device::Cpu;
    let (dim, ctx, heads, tokens, rank) = (1280, 2048, 20, 1024, 32);
    // Learn the block's parameters, then build it from random ones.
    let (vb, requests) = graft_sdxl::varbuilder::shape_only(&dev);
    Block::new(vb, dim, ctx, heads, &mut HookRegistry::new());
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
    let block = Block::new(vb, dim, ctx, heads, &mut reg);
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
    let report = LoadReport {
        file: PathBuf::from("random"),
        format: AdapterFormat::Kohya,
        attached: Vec::new(),
        unmatched_keys: Vec::new(),
        warnings: Vec::new(),
        native: None,
    };
    let file = AdapterFile { format: AdapterFormat::Kohya, metadata: BTreeMap::new(), modules };
    files.add("random", Path::new("random"), file, report, 1.0, 1.0).unwrap();

    let reps = 4;
    let t = race(
        reps,
        &mut [
            &mut || {
                block.forward(&x, &c, &NoHooks);
            },
            &mut || {
                let h = files.hooks(PipelineHooks::none());
                block.forward(&x, &c, &h.unet);
            },
        ],
    );
    let (base, unfused) = (t[0], t[1]);
    let t = Instant::now();
    files.fuse().unwrap();
    let fuse_s = secs(t);
    let fused = race(
        reps,
        &mut [&mut || {
            let h = files.hooks(PipelineHooks::none());
            block.forward(&x, &c, &h.unet);
        }],
    )[0];
    files.unfuse();
    println!("one SDXL transformer block (dim {dim}, {heads} heads, 2 x {tokens} tokens, context 2 x 77 x {ctx}), LoRA rank {rank} on its {n} linears:");
    println!("  base:    {}", fig(base, None));
    println!("  unfused: {}", fig(unfused, Some(base)));
    println!("  fused:   {} (fusing the block took {:.0} ms)", fig(fused, Some(base)), fuse_s * 1e3);
}

/// The LoRA term on one real-size linear, two ways: through `nn::linear` (batched matmul with
/// broadcast, transposed weights) and as 2-D matmuls with pre-transposed factors.
fn lora_term_forms() {
    let dev = Device::Cpu;
    let mut rng = GraftRng::new(3);
    let (n, d, r) = (2048, 1280, 32);
    let x = rng.randn((2, n / 2, d), &dev).unwrap();
    let w = rng.randn((d, d), &dev).unwrap();
    let down = rng.randn((r, d), &dev).unwrap();
    let up = rng.randn((d, r), &dev).unwrap();
    let (down_t, up_t) = (down.t().unwrap().contiguous().unwrap(), up.t().unwrap().contiguous().unwrap());
    let t = race(
        5,
        &mut [
            &mut || {
                graft_sdxl::nn::linear(&x, &w, None).unwrap();
            },
            &mut || {
                let h = graft_sdxl::nn::linear(&x, &down, None).unwrap();
                graft_sdxl::nn::linear(&h, &up, None).unwrap();
            },
            &mut || {
                let x2 = x.reshape((n, d)).unwrap();
                x2.matmul(&down_t).unwrap().matmul(&up_t).unwrap().reshape((2, n / 2, d)).unwrap();
            },
            &mut || {
                let x2 = x.reshape((n, d)).unwrap();
                x2.matmul(&down.t().unwrap()).unwrap().matmul(&up.t().unwrap()).unwrap().reshape((2, n / 2, d)).unwrap();
            },
        ],
    );
    println!("one {d}x{d} linear on {n} tokens: {}", fig(t[0], None));
    println!("  its rank-{r} LoRA term via nn::linear:                 {}", fig(t[1], None));
    println!("  as 2-D matmuls with transposed copies of the factors:  {}", fig(t[2], None));
    println!("  as 2-D matmuls with transposed views (graft's form):   {}", fig(t[3], None));
}

fn main() {
    // `cargo bench --bench adapters -- block tiny`: only the sections named.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    println!("threads: {} (candle CPU)", candle_core::utils::get_num_threads());
    if want("file") {
        sdxl_file_costs();
    }
    if want("forms") {
        lora_term_forms();
    }
    if want("tiny") {
        tiny_unet_overhead();
    }
    if want("block") {
        real_block_overhead();
    }
}
