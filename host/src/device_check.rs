//! `graft device-check`: the tiny fixture on the GPU and on the CPU, each compared with the
//! committed diffusers + PEFT references (tests/fixtures/reference, from tools/reference/): a
//! txt2img run (4 Euler steps, CFG 5, VAE decode) and one LoRA training step (loss and the
//! gradient of every LoRA parameter), in f32 and with bf16 weights. tools/gpu-check.sh runs it on
//! a lent GPU; the same checks run here as tests on the CPU.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use graft_sdxl::schedulers::SchedulerConfig;
use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel, WeightDtype};

use crate::plugins::PluginDirArgs;
use graft_runtime::adapters::store::ParamKey;
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceCheckArgs {
    /// The test fixtures folder (tiny-sdxl/ and reference/ inside). Default: tests/fixtures.
    #[arg(long, value_name = "DIR", default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// Also write the results as a Markdown table to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Check the CPU only (also what happens when no GPU is found).
    #[arg(long)]
    pub cpu: bool,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

/// One comparison: `deviation` (relative to the reference's scale) against its `limit`.
#[derive(Debug, Clone)]
pub struct Check {
    pub device: String,
    pub what: String,
    pub deviation: f32,
    pub limit: f32,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.deviation <= self.limit
    }
}

pub fn run(args: DeviceCheckArgs) -> anyhow::Result<()> {
    let gpu = graft_runtime::device::pick(args.cpu)?;
    let mut devices = vec![Device::Cpu];
    if !gpu.is_cpu() {
        devices.push(gpu);
    } else if !args.cpu {
        eprintln!("device-check: no GPU is available (see the log above): checking the CPU only");
    }
    let fixtures = args.fixtures.canonicalize().with_context(|| {
        format!("--fixtures {}: not found (run from the repository root, or pass the tests/fixtures folder)", args.fixtures.display())
    })?;
    let mut checks = Vec::new();
    let mut cpu_results: Option<Results> = None;
    for dev in &devices {
        let results = check_device(&fixtures, &args.plugins, dev, &mut checks)?;
        match &cpu_results {
            None => cpu_results = Some(results),
            Some(cpu) => compare_results(cpu, &results, &name(dev), &mut checks)?,
        }
    }
    let table = table(&checks);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("--out {}: cannot write", out.display()))?;
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.passed()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} checks failed: {}",
            failed.len(),
            checks.len(),
            failed.iter().map(|c| format!("{} {}", c.device, c.what)).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// What each device computed, kept to compare the GPU with the CPU.
pub struct Results {
    latents: Tensor,
    loss: f32,
    grads: BTreeMap<String, Tensor>,
}

fn name(dev: &Device) -> String {
    if dev.is_cpu() { "CPU" } else { "GPU" }.to_string()
}

/// Runs the checks on `dev`, pushing them to `checks`; returns the f32 results.
pub fn check_device(fixtures: &Path, plugins: &PluginDirArgs, dev: &Device, checks: &mut Vec<Check>) -> anyhow::Result<Results> {
    let on = name(dev);
    let pipeline = load_reference(&fixtures.join("reference/pipeline.safetensors"))?;
    let train = load_reference(&fixtures.join("reference/train_step.safetensors"))?;
    let model_dir = fixtures.join("tiny-sdxl");
    // On a GPU f32 products may take other summation orders (cuBLAS): a looser f32 limit there.
    let f32_limit = if dev.is_cpu() { 1e-4 } else { 1e-3 };
    let mut f32_latents = None;
    for (dtype, limit) in [(WeightDtype::Fp32, f32_limit), (WeightDtype::Bf16, 5e-2)] {
        let mut model = SdxlModel::load_as(&model_dir, None, dev, dtype).with_context(|| format!("loading {}", model_dir.display()))?;
        let (latents, decoded) = generate(&mut model, &pipeline, &fixtures.join("tiny-sdxl/scheduler/scheduler_config.json"))?;
        for (what, got) in [("latents", &latents), ("decoded", &decoded)] {
            let deviation = relative(got, &pipeline[&format!("euler.{what}")])?;
            checks.push(Check { device: on.clone(), what: format!("generate {dtype} weights: {what} vs diffusers"), deviation, limit });
        }
        if dtype == WeightDtype::Fp32 {
            f32_latents = Some(latents);
        }
    }
    let mut f32_step = None;
    // bf16: the limits of tests/e2e/train_parity.rs (half_precision_step_deviation).
    for (dtype, loss_limit, limit) in [(WeightDtype::Fp32, f32_limit, f32_limit), (WeightDtype::Bf16, 1e-2, 0.1)] {
        let (loss, grads) = train_step(fixtures, plugins, dev, dtype, &train)?;
        let want = scalar(&train["losses"].narrow(0, 0, 1)?)?;
        let deviation = ((loss - want) / want).abs();
        checks.push(Check {
            device: on.clone(),
            what: format!("train step {dtype} weights: loss vs diffusers + PEFT"),
            deviation,
            limit: loss_limit,
        });
        let mut devs = grads.iter().map(|(peft, g)| relative(g, &train[&format!("grad.{peft}")])).collect::<anyhow::Result<Vec<f32>>>()?;
        devs.sort_by(f32::total_cmp);
        // f32: every gradient; bf16: the median (single small gradients take bf16's rounding whole).
        let (which, deviation) = if dtype == WeightDtype::Fp32 { ("worst", devs[devs.len() - 1]) } else { ("median", devs[devs.len() / 2]) };
        checks.push(Check { device: on.clone(), what: format!("train step {dtype} weights: {which} LoRA gradient vs PEFT"), deviation, limit });
        if dtype == WeightDtype::Fp32 {
            f32_step = Some((loss, grads));
        }
    }
    let (loss, grads) = f32_step.expect("the f32 step ran");
    Ok(Results { latents: f32_latents.expect("the f32 run ran"), loss, grads })
}

/// The GPU's f32 results against the CPU's.
fn compare_results(cpu: &Results, gpu: &Results, on: &str, checks: &mut Vec<Check>) -> anyhow::Result<()> {
    checks.push(Check {
        device: on.into(),
        what: "generate f32: latents vs the CPU's".into(),
        deviation: relative(&gpu.latents, &cpu.latents)?,
        limit: 1e-3,
    });
    checks.push(Check {
        device: on.into(),
        what: "train step f32: loss vs the CPU's".into(),
        deviation: ((gpu.loss - cpu.loss) / cpu.loss).abs(),
        limit: 1e-3,
    });
    let mut worst = 0f32;
    for (peft, g) in &gpu.grads {
        worst = worst.max(relative(g, &cpu.grads[peft])?);
    }
    checks.push(Check { device: on.into(), what: "train step f32: worst LoRA gradient vs the CPU's".into(), deviation: worst, limit: 1e-2 });
    Ok(())
}

fn load_reference(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the reference (run from the repository root, or pass --fixtures)", path.display()))
}

/// The pipeline reference's `euler` case: 128x96, 4 steps, CFG 5, from its initial latents.
fn generate(model: &mut SdxlModel, reference: &HashMap<String, Tensor>, scheduler: &Path) -> anyhow::Result<(Tensor, Tensor)> {
    model.config.scheduler = SchedulerConfig::from_file(scheduler)?;
    let params = GenerateParams {
        prompt: "a red fox, watercolor painting".into(),
        negative_prompt: None,
        width: 128,
        height: 96,
        steps: 4,
        guidance: 5.0,
        scheduler: "euler".into(),
        seed: 0,
        init_latents: Some(reference["init_latents"].clone()),
    };
    let out = model.generate(&params, PipelineHooks::none(), &mut |_, _| {})?;
    let decoded = model.vae()?.decode(&(&out.latents / model.config.vae.scaling_factor)?)?;
    Ok((out.latents.to_device(&Device::Cpu)?, decoded.to_device(&Device::Cpu)?))
}

/// One LoRA step of the `lora` plugin from PEFT's initial values and inputs: the loss and each
/// LoRA parameter's gradient, by PEFT name, on the CPU.
fn train_step(
    fixtures: &Path,
    plugins: &PluginDirArgs,
    dev: &Device,
    dtype: WeightDtype,
    reference: &HashMap<String, Tensor>,
) -> anyhow::Result<(f32, BTreeMap<String, Tensor>)> {
    let root = std::env::temp_dir().join(format!("graft-device-check-{}", std::process::id()));
    let data = root.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    // Trainer::new opens a dataset; the step reads the reference's inputs instead.
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 40, 40])).save(data.join("a.png"))?;
    std::fs::write(data.join("a.txt"), "a red fox")?;
    let text = format!(
        "model = {model:?}\noutput_dir = {out:?}\nseed = 1\nsteps = 3\nprediction_type = \"v_prediction\"\n\
         min_snr_gamma = 0.0\nmax_grad_norm = 0.0\nlr_schedule = \"constant\"\ncache_latents = \"none\"\ndtype = \"{dtype}\"\n\
         [dataset]\ndir = {data:?}\nresolution = 64\n\
         [strategy]\nplugin = \"lora\"\nconfig = {{ rank = 4, alpha = 8, unet_lr = 1e-3, weight_decay = 0.01, \
         targets = [\"unet.*.to_q\", \"unet.*.to_k\", \"unet.*.to_v\", \"unet.*.to_out.0\"] }}\n",
        model = fixtures.join("tiny-sdxl").display().to_string(),
        out = root.join("out").display().to_string(),
        data = data.display().to_string(),
    );
    let config_path = root.join("train.toml");
    std::fs::write(&config_path, text)?;
    let trainer = Trainer::new(TrainConfig::from_file(&config_path)?, plugins.manager()?, dev)?;
    let store = trainer.set.store();
    let mut names = HashMap::new();
    for peft in reference.keys().filter_map(|k| k.strip_prefix("init.")) {
        let key = store_key(peft)?;
        store.set(&key, &reference[&format!("init.{peft}")])?;
        names.insert(key.to_string(), peft.to_string());
    }
    let get = |k: &str| -> anyhow::Result<Tensor> {
        Ok(reference.get(k).with_context(|| format!("the train reference has no `{k}`"))?.to_device(dev)?)
    };
    let timesteps: Vec<usize> = reference["timesteps"].to_dtype(DType::I64)?.to_vec1::<i64>()?.into_iter().map(|t| t as usize).collect();
    let loss =
        trainer.loss_from(&get("latents")?, &get("noise")?, &timesteps, &get("prompt_embeds")?, &get("text_embeds")?, &get("time_ids")?)?;
    let grads = trainer.optimizer.gradients(&loss.backward()?);
    let _ = std::fs::remove_dir_all(&root);
    if grads.len() != names.len() {
        bail!("{} of {} LoRA parameters got a gradient", grads.len(), names.len());
    }
    let by_peft = grads
        .iter()
        .map(|(n, g)| {
            Ok((names.get(n).with_context(|| format!("unexpected parameter {n}"))?.clone(), g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((scalar(&loss)?, by_peft))
}

/// PEFT's `<module>.lora_A.default.weight` -> the store key `lora:unet.<module>.down` (B -> up).
pub fn store_key(peft: &str) -> anyhow::Result<ParamKey> {
    let (module, name) = if let Some(m) = peft.strip_suffix(".lora_A.default.weight") {
        (m, "down")
    } else if let Some(m) = peft.strip_suffix(".lora_B.default.weight") {
        (m, "up")
    } else {
        bail!("unexpected PEFT parameter name {peft} in the train reference")
    };
    Ok(ParamKey::new("lora", &format!("unet.{module}"), name))
}

fn scalar(t: &Tensor) -> anyhow::Result<f32> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.get(0)?.to_scalar::<f32>()?)
}

/// max |got - want| over max |want|.
fn relative(got: &Tensor, want: &Tensor) -> anyhow::Result<f32> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let diff = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

pub fn table(checks: &[Check]) -> String {
    let mut s = String::from("| device | check | deviation | limit | result |\n|---|---|---|---|---|\n");
    for c in checks {
        s += &format!("| {} | {} | {:.2e} | {:.0e} | {} |\n", c.device, c.what, c.deviation, c.limit, if c.passed() { "ok" } else { "FAILED" });
    }
    s
}
