//! One training step of the real `lora` plugin through the host's `Trainer` against diffusers +
//! PEFT (tests/fixtures/reference/train_step.safetensors, from
//! tools/reference/make_train_fixtures.py): the v-prediction loss, the gradient of every LoRA
//! parameter, and the parameters and losses of three AdamW steps.
//!
//! The LoRA values are set from the reference (PEFT's random non-zero A and B), so the gradients
//! of both A and B are informative; the inputs (latents, noise, timesteps, text embeddings, time
//! ids) are the reference's, fed to `Trainer::loss_from`.

use crate::plugins_common as common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{lib_file, manager};
use graft_runtime::adapters::store::ParamKey;
use graft_trainer::config::TrainConfig;
use graft_trainer::trainer::Trainer;

/// Builds `plugins/lora` into the tests' plugin target (once per test process:
/// `graft_tests::build_plugins`) and copies it into the scratch folder `name` (one per test: the
/// tests run in parallel).
fn lora_plugin_dir(name: &str) -> std::path::PathBuf {
    let built = graft_tests::build_plugins(&["lora"]);
    let dir = graft_tests::scratch(&format!("train-parity-plugins/{name}"));
    let f = lib_file("lora");
    std::fs::copy(built.join(&f), dir.join(&f)).expect("copy the lora plugin");
    dir
}

/// Two small images with captions: `Trainer::new` opens a dataset, the test does not read it.
fn write_dataset(dir: &Path) {
    for (i, rgb) in [[200u8, 40, 40], [30, 90, 220]].into_iter().enumerate() {
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([rgb[0], rgb[1].wrapping_add(x as u8), rgb[2].wrapping_add(y as u8)]))
            .save(dir.join(format!("img{i}.png")))
            .expect("write image");
        std::fs::write(dir.join(format!("img{i}.txt")), ["a red fox", "a blue cat"][i]).expect("write caption");
    }
}

fn train_config(root: &Path) -> TrainConfig {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_dataset(&data);
    let text = format!(
        r#"
model = {model:?}
output_dir = {out:?}
seed = 1
steps = 3
prediction_type = "v_prediction"
min_snr_gamma = 0.0
max_grad_norm = 0.0
lr_schedule = "constant"
cache_latents = "none"

[dataset]
dir = {data:?}
resolution = 64

[strategy]
plugin = "lora"
config = {{ rank = 4, alpha = 8, unet_lr = 1e-3, weight_decay = 0.01, targets = ["unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0"] }}
"#,
        model = graft_tests::tiny_model().display().to_string(),
        out = root.join("out").display().to_string(),
        data = data.display().to_string(),
    );
    let path = root.join("train.toml");
    std::fs::write(&path, text).unwrap();
    TrainConfig::from_file(&path).expect("training config")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().reshape(()).unwrap().to_scalar::<f32>().unwrap()
}

/// PEFT's `<module>.lora_A.default.weight` -> the store key `lora:unet.<module>.down` (B -> up).
fn store_key(peft: &str) -> ParamKey {
    graft_host::device_check::store_key(peft).expect("a PEFT LoRA parameter name")
}

#[test]
fn lora_step_matches_diffusers_peft() {
    let dev = Device::Cpu;
    let reference = candle_core::safetensors::load(graft_tests::fixtures().join("reference/train_step.safetensors"), &dev)
        .expect("tests/fixtures/reference/train_step.safetensors (tools/reference/make_train_fixtures.py)");
    let get = |k: &str| reference.get(k).unwrap_or_else(|| panic!("reference key {k}")).clone();

    let root = graft_tests::scratch("train-parity");
    let config = train_config(&root);
    let plugins = manager(&lora_plugin_dir("parity"));
    let mut trainer = Trainer::new(config, plugins, &dev).expect("trainer");

    // The same LoRA parameters on both sides, set to the reference's initial values.
    let peft_names: Vec<String> = reference.keys().filter_map(|k| k.strip_prefix("init.")).map(str::to_string).collect();
    let by_key: BTreeMap<ParamKey, String> = peft_names.iter().map(|n| (store_key(n), n.clone())).collect();
    let store = trainer.set.store();
    let ours: Vec<ParamKey> = store.params(Some("lora")).into_iter().map(|(k, _)| k).collect();
    let theirs: Vec<ParamKey> = by_key.keys().cloned().collect();
    assert_eq!(ours, theirs, "the plugin's LoRA parameters and PEFT's differ");
    assert_eq!(ours.len(), 17 * 2 * 4 * 2);
    for (key, peft) in &by_key {
        store.set(key, &get(&format!("init.{peft}"))).unwrap();
    }
    // Optimizer names are ParamKey strings.
    let opt_name: HashMap<String, String> = by_key.iter().map(|(k, p)| (p.clone(), k.to_string())).collect();

    let latents = get("latents");
    let noise = get("noise");
    let timesteps: Vec<usize> =
        get("timesteps").to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|t| t as usize).collect();
    let hidden = get("prompt_embeds");
    let pooled = get("text_embeds");
    let time_ids = get("time_ids");
    let losses_ref = get("losses").to_vec1::<f32>().unwrap();
    assert_eq!(losses_ref.len(), 3);

    let mut report = Vec::new();
    for (step, &reference) in losses_ref.iter().enumerate() {
        let loss = trainer.loss_from(&latents, &noise, &timesteps, &hidden, &pooled, &time_ids).expect("loss");
        let value = scalar(&loss);
        let rel = ((value - reference) / reference).abs();
        report.push(format!("step {step}: loss {value} reference {reference} rel {rel:.2e}"));
        assert!(rel <= 1e-5, "step {step}: loss {value}, diffusers {reference} (rel {rel:.2e})");

        let grads = trainer.optimizer.gradients(&loss.backward().unwrap());
        if step == 0 {
            assert_eq!(grads.len(), by_key.len(), "every LoRA parameter gets a gradient");
            let mut worst = (0f32, String::new());
            for peft in &peft_names {
                let g = grads.get(&opt_name[peft]).unwrap_or_else(|| panic!("no gradient for {peft}"));
                let want = get(&format!("grad.{peft}"));
                let rel = max_diff(g, &want) / max_abs(&want);
                assert!(max_abs(g) > 0.0, "{peft}: zero gradient");
                if rel > worst.0 {
                    worst = (rel, peft.clone());
                }
                assert!(rel <= 1e-4, "{peft}: gradient differs by {rel:.2e} of its scale {}", max_abs(&want));
            }
            report.push(format!("gradients: worst max|diff|/max|g| {:.2e} ({})", worst.0, worst.1));
        }
        let r = trainer.optimizer.step(&grads, 1.0).expect("AdamW step");
        assert!(!r.skipped && r.updated == by_key.len(), "{r:?}");
    }

    // Adam divides by |g| + eps: where the step-0 gradient is at the round-off floor of its
    // tensor (below the gradient tolerance, |g| ~ eps), its first update lr * g / (|g| + eps) is
    // any value in [-lr, lr] on either side. Those elements are only held to 2 lr; the rest to 1e-5.
    let (mut worst, mut worst_floor, mut floor_count, mut total) = ((0f32, String::new()), 0f32, 0usize, 0usize);
    for (key, peft) in &by_key {
        let p = values(store.get(key).unwrap().var.as_tensor());
        let want = values(&get(&format!("final.{peft}")));
        let g0 = values(&get(&format!("grad.{peft}")));
        let floor = 1e-4 * g0.iter().fold(0f32, |m, g| m.max(g.abs()));
        total += p.len();
        for ((p, w), g) in p.iter().zip(&want).zip(&g0) {
            let d = (p - w).abs();
            if g.abs() < floor {
                floor_count += 1;
                worst_floor = worst_floor.max(d);
            } else if d > worst.0 {
                worst = (d, peft.clone());
            }
        }
    }
    report.push(format!("parameters after 3 steps: worst max|diff| {:.2e} ({})", worst.0, worst.1));
    report.push(format!("  {floor_count} of {total} elements with a step-0 gradient at the round-off floor: worst |diff| {worst_floor:.2e}"));
    let after = scalar(&trainer.loss_from(&latents, &noise, &timesteps, &hidden, &pooled, &time_ids).unwrap());
    let want = scalar(&get("loss_final"));
    report.push(format!("loss after 3 steps {after} reference {want} rel {:.2e}", ((after - want) / want).abs()));
    println!("{}", report.join("\n"));
    assert!(worst.0 <= 1e-5, "parameters after 3 steps differ by {:.2e} ({})", worst.0, worst.1);
    assert!(worst_floor <= 2e-3 && floor_count * 1000 < total, "{floor_count} of {total} round-off-floor elements, worst {worst_floor:.2e}");
    assert!(((after - want) / want).abs() <= 1e-5, "loss after 3 steps {after}, diffusers {want}");
}

/// A training config on the tiny model for `plugin` with its JSON `strategy` config.
fn strategy_config(root: &Path, plugin: &str, strategy: &str, extra: &str) -> TrainConfig {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_dataset(&data);
    let text = format!(
        r#"
model = {model:?}
output_dir = {out:?}
seed = 3
steps = 10
prediction_type = "v_prediction"
cache_latents = "none"
{extra}

[dataset]
dir = {data:?}
resolution = 64

[strategy]
plugin = "{plugin}"
config = {strategy}
"#,
        model = graft_tests::tiny_model().display().to_string(),
        out = root.join("out").display().to_string(),
        data = data.display().to_string(),
    );
    let path = root.join("train.toml");
    std::fs::write(&path, text).unwrap();
    TrainConfig::from_file(&path).expect("training config")
}

/// The gradients of one batch, with or without gradient checkpointing, from the same random
/// state (noise, timesteps and the adapters' dropout draws).
fn gradients_of(trainer: &mut Trainer, checkpointing: bool) -> (f32, graft_trainer::optim::Gradients) {
    let (rng, set_rng) = (trainer.rng.clone(), trainer.set.rng_state());
    let batch = trainer.dataset.epoch(3, 0).on(&Device::Cpu).batch(0).expect("batch");
    trainer.config.options.gradient_checkpointing = checkpointing;
    let (loss, grads) = trainer.loss_and_grads(&batch).expect("loss and gradients");
    trainer.rng = rng;
    trainer.set.set_rng_state(set_rng);
    (scalar(&loss), trainer.optimizer.gradients(&grads))
}

/// Gradient checkpointing gives the gradients of the plain backward, for each shipped strategy:
/// LoRA with dropout (the replay must draw the same masks), attention-gate (unfrozen base
/// weights and gates), progressive fusion in stage 2 (text-encoder adapters: the gradient leaves
/// the checkpointed UNet through the text embeddings).
#[test]
fn checkpointing_gives_the_same_gradients() {
    let plugins = graft_tests::build_plugins(&["lora", "attention-gate", "progressive-fusion"]);
    let cases = [
        ("lora", r#"{ rank = 4, alpha = 8, dropout = 0.2, module_dropout = 0.1, unet_lr = 1e-2 }"#),
        ("attention-gate", r#"{ adapter_lr = 1e-2, base_lr = 1e-3 }"#),
        ("progressive-fusion", r#"{ stage1_steps = 1, stage2_steps = 50, stage1_lr = 1e-2, stage2_lr = 1e-2 }"#),
    ];
    // Each case also with half-precision weights and activations (the GPU's code path, in fp16
    // on the CPU): checkpointing must replay it exactly too, and its gradients follow f32's.
    for (plugin, strategy) in cases {
        let f32_grads = checkpointing_case(&plugins, plugin, strategy, false);
        let half_grads = checkpointing_case(&plugins, plugin, strategy, true);
        let (mut dot, mut n1, mut n2) = (0f64, 0f64, 0f64);
        for (name, g) in f32_grads.iter() {
            let h = half_grads.get(name).unwrap_or_else(|| panic!("{plugin}: no half-precision gradient for {name}"));
            dot += (g * h).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            n1 += g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            n2 += h.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        }
        let cos = dot / (n1.sqrt() * n2.sqrt()).max(f64::MIN_POSITIVE);
        println!("{plugin}: half-precision activations vs f32, cosine of all gradients {cos:.5}");
        assert!(cos >= 0.99, "{plugin}: half-precision gradients point elsewhere (cosine {cos})");
    }
}

/// One case of [`checkpointing_gives_the_same_gradients`]; returns the plain gradients.
fn checkpointing_case(plugins: &Path, plugin: &str, strategy: &str, half: bool) -> graft_trainer::optim::Gradients {
    let root = graft_tests::scratch(&format!("train-checkpointing/{plugin}-{half}"));
    let extra = if half { r#"dtype = "fp16""# } else { "" };
    let mut trainer = Trainer::new(strategy_config(&root, plugin, strategy, extra), manager(plugins), &Device::Cpu).expect("trainer");
    if half {
        Arc::get_mut(&mut trainer.model).expect("the trainer's model is not shared").set_activations(DType::F16);
    }
    // Two plain steps first: zero-initialised factors move, and progressive fusion reaches stage 2.
    for _ in 0..2 {
        assert!(!trainer.train_step().expect("step").skipped);
    }
    trainer.set.on_step(trainer.step).expect("directives");
    let (plain_loss, plain) = gradients_of(&mut trainer, false);
    let (ckpt_loss, ckpt) = gradients_of(&mut trainer, true);
    assert_eq!(plain_loss, ckpt_loss, "{plugin}: the loss differs");
    assert!(!plain.is_empty(), "{plugin}: no gradients");
    assert_eq!(plain.len(), ckpt.len(), "{plugin}: checkpointing reached other parameters");
    // Only the order of a few sums differs (a gradient reaching a tensor from several segments),
    // rounded to half precision on the half path.
    let tol = if half { 5e-3 } else { 1e-6 };
    let scale = plain.iter().map(|(_, g)| max_abs(g)).fold(0f32, f32::max);
    let mut nonzero = 0;
    for (name, g) in plain.iter() {
        let c = ckpt.get(name).unwrap_or_else(|| panic!("{plugin}: no checkpointed gradient for {name}"));
        nonzero += (max_abs(g) > 0.0) as usize;
        assert!(max_diff(g, c) <= tol * scale, "{plugin} {name}: |diff| {} at gradient scale {scale}", max_diff(g, c));
    }
    assert!(nonzero * 2 > plain.len(), "{plugin}: only {nonzero} of {} gradients are non-zero", plain.len());
    if plugin == "progressive-fusion" {
        assert!(plain.iter().any(|(n, g)| n.contains("text_encoder") && max_abs(g) > 0.0), "stage 2 trains no text-encoder adapter");
    }
    plain
}

/// bf16 and fp16 weights against f32 on the same LoRA step (the diffusers + PEFT fixture's
/// inputs and initial values). bf16: the loss and every gradient deviate by bf16 rounding (of the
/// weights, and of the activations in the bf16 products), not more. fp16: the fixture is stored
/// in fp16 and fp16 weights are widened exactly for their products, so nothing changes. The
/// figures are in docs/PERFORMANCE.md. bf16 activations (the GPU's path: every product, norm and
/// attention on half tensors with f32 statistics, adapters in f32) deviate by their rounding too.
#[test]
fn half_precision_step_deviation() {
    let dev = Device::Cpu;
    let reference = candle_core::safetensors::load(graft_tests::fixtures().join("reference/train_step.safetensors"), &dev).unwrap();
    let get = |k: &str| reference.get(k).unwrap_or_else(|| panic!("reference key {k}")).clone();
    let timesteps: Vec<usize> =
        get("timesteps").to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|t| t as usize).collect();
    let plugins = lora_plugin_dir("precision");
    let step = |dtype: &str| {
        let root = graft_tests::scratch(&format!("train-precision/{dtype}"));
        let mut config = train_config(&root);
        // "fp16+act": fp16 weights and activations, the GPU's code path (see precision.rs; a GPU
        // runs it in bf16, candle's CPU matmul has no bf16).
        config.options.dtype = dtype.trim_end_matches("+act").parse().unwrap();
        let mut trainer = Trainer::new(config, manager(&plugins), &dev).expect("trainer");
        if dtype.ends_with("+act") {
            Arc::get_mut(&mut trainer.model).expect("the trainer's model is not shared").set_activations(DType::F16);
        }
        let store = trainer.set.store();
        for (key, _) in store.params(Some("lora")) {
            let peft = reference.keys().find(|k| k.starts_with("init.") && store_key(&k["init.".len()..]) == key).unwrap();
            store.set(&key, &get(peft)).unwrap();
        }
        let loss =
            trainer.loss_from(&get("latents"), &get("noise"), &timesteps, &get("prompt_embeds"), &get("text_embeds"), &get("time_ids")).unwrap();
        (scalar(&loss), trainer.optimizer.gradients(&loss.backward().unwrap()))
    };
    let (loss32, grads32) = step("fp32");
    for (dtype, tol) in [("bf16", 0.1f32), ("fp16", 0.0), ("fp16+act", 0.02)] {
        let (loss, grads) = step(dtype);
        let rel = ((loss - loss32) / loss32).abs();
        let mut devs: Vec<(f32, f32, String)> = grads32
            .iter()
            .map(|(n, g)| {
                let h = grads.get(n).unwrap();
                let dot = (g * h).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                let norms = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
                    * h.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
                (max_diff(g, h) / max_abs(g), dot / norms.max(f32::MIN_POSITIVE), n.clone())
            })
            .collect();
        devs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let worst = devs[0].0;
        let median = devs[devs.len() / 2].0;
        let min_cos = devs.iter().map(|d| d.1).fold(1f32, f32::min);
        println!("{dtype}: loss {loss} (f32 {loss32}, rel {rel:.2e}); gradients: median max|diff|/max|g| {median:.2e}, worst {worst:.2e} ({}), lowest cosine {min_cos:.5}", devs[0].2);
        for d in devs.iter().take(5) {
            println!("  {:.2e} cos {:.5} {}", d.0, d.1, d.2);
        }
        assert!(rel <= 1e-2, "{dtype}: loss deviates by {rel:.2e}");
        // bf16 keeps 8 significant bits of the weights and of the activations in each product.
        assert!(
            median <= tol && min_cos >= 1.0 - 2.0 * tol - 1e-6,
            "{dtype}: the gradients deviate (median {median:.2e}, lowest cosine {min_cos})"
        );
        if dtype != "fp16" {
            assert!(worst > 0.0, "bf16: no deviation at all: the weights were not kept in bf16");
        }
    }
}

/// `graft device-check` on the CPU: the same comparisons with the references as the tests above,
/// through the command that tools/gpu-check.sh runs on a GPU.
#[test]
fn device_check_passes_on_the_cpu() {
    let plugins = lora_plugin_dir("device-check");
    let out = graft_tests::scratch("device-check").join("checks.md");
    let fixtures = graft_tests::fixtures();
    graft_tests::graft(&[
        "device-check",
        "--cpu",
        "--no-default-plugins",
        "--plugins",
        plugins.to_str().unwrap(),
        "--fixtures",
        fixtures.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .expect("device-check");
    let table = std::fs::read_to_string(&out).unwrap();
    assert_eq!(table.matches("| ok |").count(), 8, "{table}");
}
