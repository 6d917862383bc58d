//! `cargo bench -p graft-sdxl`: the tiny fixture model (UNet forward, text encoders, VAE decode, a
//! 4-step generate) and one UNet forward of the real SDXL base 1.0 architecture at 512x512 with
//! random weights (skipped unless GRAFT_BENCH_REAL=1: it needs ~11 GB of memory).
//!
//! Prints one line per workload: median and min wall time over the runs.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use graft_sdxl::hooks::NoHooks;
use graft_sdxl::rng::GraftRng;
use graft_sdxl::unet::{UNet, UNetConfig};
use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel};

fn bench(name: &str, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    f()?; // warm-up
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "{name:<44} median {:>10.2} ms   min {:>10.2} ms   ({runs} runs)",
        times[runs / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
    Ok(())
}

/// Random N(0, 0.02) weights (norm weights 1) for a real-size architecture; content is irrelevant
/// to the timing.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if name.contains("norm") && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sdxl");
    let model = SdxlModel::load(&fixture, None, &dev)?;
    let mut rng = GraftRng::new(0);
    let prompt = "a red fox, watercolor painting";
    println!("graft-sdxl benchmarks, CPU, {} threads", candle_core::utils::get_num_threads());

    let emb = model.encode_prompts(&[prompt, ""], PipelineHooks::none())?;
    bench("tiny text encoders (2 prompts)", 20, || model.encode_prompts(&[prompt, ""], PipelineHooks::none()).map(|_| ()))?;
    let x = rng.randn((2, 4, 12, 16), &dev)?;
    let t = Tensor::new(&[500f32, 500.], &dev)?;
    let ids = model.time_ids(128, 96, 2)?;
    bench("tiny UNet forward (batch 2, 128x96)", 20, || model.unet.forward(&x, &t, &emb.hidden, &emb.pooled, &ids, &NoHooks).map(|_| ()))?;
    let z = rng.randn((1, 4, 12, 16), &dev)?;
    bench("tiny VAE decode (128x96)", 20, || model.decode_latents(&z).map(|_| ()))?;
    let params = GenerateParams { prompt: prompt.into(), width: 128, height: 96, steps: 4, ..Default::default() };
    bench("tiny generate, 4 steps, CFG (128x96)", 10, || model.generate(&params, PipelineHooks::none(), &mut |_, _| {}).map(|_| ()))?;

    if std::env::var("GRAFT_BENCH_REAL").as_deref() == Ok("1") {
        let config = UNetConfig::sdxl_base();
        let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights);
        let unet = UNet::new(VarBuilder::from_backend(backend, DType::F32, dev.clone()), &config)?;
        let x = Tensor::randn(0f32, 1., (1, 4, 64, 64), &dev)?;
        let ctx = Tensor::randn(0f32, 1., (1, 77, 2048), &dev)?;
        let pooled = Tensor::randn(0f32, 1., (1, 1280), &dev)?;
        let t = Tensor::new(&[500f32], &dev)?;
        let ids = Tensor::new(&[[512f32, 512., 0., 0., 512., 512.]], &dev)?;
        bench("SDXL base UNet forward (batch 1, 512x512)", 3, || unet.forward(&x, &t, &ctx, &pooled, &ids, &NoHooks).map(|_| ()))?;
    } else {
        println!("(set GRAFT_BENCH_REAL=1 for the real-size SDXL UNet forward at 512x512)");
    }
    Ok(())
}
