//! `graft train` end to end on the tiny model with the three shipped strategies: the loss goes
//! down, checkpoints resume bit-exactly, the progressive-fusion stages switch the trainable set,
//! and the run's outputs (checkpoints, samples, loss log and plot, adapter files) are written.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use graft_runtime::plugins::{DirOrigin, PluginManager, SearchDir};
use graft_tests::{build_plugins, graft, scratch, tiny_model, write_shapes_dataset};
use graft_trainer::config::TrainConfig;
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

/// Writes a dataset and a config into `dir`; `extra` is appended to the top-level keys and
/// `strategy` is the `[strategy]` table body.
fn setup(dir: &Path, steps: u64, extra: &str, strategy: &str) -> PathBuf {
    write_shapes_dataset(&dir.join("data"), 4, 64);
    std::fs::write(dir.join("prompts.txt"), "# samples\na pink circle, line art --w 64 --h 48 --d 5 --s 2\n").unwrap();
    let config = format!(
        "model = {:?}\noutput_dir = \"out\"\noutput_name = \"test-adapter\"\nseed = 3\nsteps = {steps}\n\
         lr_schedule = \"constant\"\nsample_prompts = \"prompts.txt\"\n{extra}\n\
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

fn train_steps(t: &mut Trainer, n: u64) {
    for _ in 0..n {
        let r = t.train_step().unwrap();
        assert!(!r.skipped && r.loss.is_finite(), "{r:?}");
    }
}

fn param_values(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

#[test]
fn lora_zero_init_then_loss_goes_down() {
    let dir = scratch("train_lora_down");
    let config = setup(&dir, 30, "", "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }");
    let mut t = trainer(&config);
    // Zero-initialised `up`: the adapted model is the base model at step 0.
    let with_adapter = t.eval_loss(9).unwrap();
    let base = {
        let mut set = graft_runtime::adapters::dispatcher::AdapterSet::new(&t.model, 0);
        std::mem::swap(&mut t.set, &mut set);
        let l = t.eval_loss(9).unwrap();
        std::mem::swap(&mut t.set, &mut set);
        l
    };
    assert_eq!(with_adapter, base);
    train_steps(&mut t, 30);
    let after = t.eval_loss(9).unwrap();
    println!("eval loss: {base:.5} -> {after:.5}");
    assert!(after < base * 0.95, "eval loss {base} -> {after}");
}

#[test]
fn attention_gate_trains_adapter_and_base_projections() {
    let dir = scratch("train_gate");
    let config = setup(&dir, 20, "", "plugin = \"attention-gate\"\nconfig = { adapter_lr = 0.01, base_lr = 0.001 }");
    let mut t = trainer(&config);
    let before = t.eval_loss(9).unwrap();
    let base_before: Vec<Tensor> = t.set.unfrozen().iter().map(|b| b.weight.as_tensor().copy().unwrap()).collect();
    assert!(!base_before.is_empty());
    train_steps(&mut t, 20);
    let after = t.eval_loss(9).unwrap();
    println!("eval loss: {before:.5} -> {after:.5}");
    assert!(after < before, "eval loss {before} -> {after}");
    let changed = t
        .set
        .unfrozen()
        .iter()
        .zip(&base_before)
        .filter(|(b, w)| (b.weight.as_tensor() - *w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
        .count();
    assert_eq!(changed, base_before.len(), "every unfrozen base projection is trained");
    // The base lr is 10x smaller than the adapter's, each per-parameter step at most lr.
    for b in t.set.unfrozen() {
        assert!((b.lr - 0.001).abs() < 1e-12);
    }
}

#[test]
fn progressive_fusion_switches_stages() {
    let dir = scratch("train_fusion");
    let strategy = "plugin = \"progressive-fusion\"\n\
                    config = { stage1_steps = 2, stage2_steps = 2, stage1_lr = 0.01, stage2_lr = 0.01, stage3_lr = 0.03 }";
    let config = setup(&dir, 6, "", strategy);
    let mut t = trainer(&config);
    let loss_before = t.eval_loss(9).unwrap();
    let trainable = |t: &Trainer| -> Vec<String> {
        let mut v: Vec<String> = t.set.store().trainable(None).into_iter().map(|(k, _)| k.layer).collect();
        v.sort();
        v.dedup();
        v
    };
    let snapshot = |t: &Trainer| param_values(t).into_iter().collect::<std::collections::BTreeMap<_, _>>();
    let mut stage_sets = Vec::new();
    let mut changed_sets = Vec::new();
    for _ in 0..6 {
        let before = snapshot(&t);
        train_steps(&mut t, 1);
        let after = snapshot(&t);
        let mut changed: Vec<String> = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, _)| k.split(':').nth(1).unwrap().rsplit_once('.').unwrap().0.to_string())
            .collect();
        changed.dedup();
        stage_sets.push(trainable(&t));
        changed_sets.push(changed);
    }
    let is_stage1 = |l: &String| l.starts_with("unet.mid_block") && l.ends_with("proj_out");
    let is_te = |l: &String| l.starts_with("text_encoder");
    let is_attn2 = |l: &String| l.contains(".attn2.");
    // Stage 1 (steps 0, 1): only the mid-block proj_out LoRA trains.
    for s in 0..2 {
        assert!(!stage_sets[s].is_empty() && stage_sets[s].iter().all(is_stage1), "step {s}: {:?}", stage_sets[s]);
        assert!(changed_sets[s].iter().all(is_stage1), "step {s}: {:?}", changed_sets[s]);
    }
    // Stage 2 (steps 2, 3): the text-encoder self-attention LoRAs join.
    for s in 2..4 {
        assert!(stage_sets[s].iter().any(is_te) && stage_sets[s].iter().all(|l| is_stage1(l) || is_te(l)), "step {s}: {:?}", stage_sets[s]);
        assert!(changed_sets[s].iter().any(is_te), "step {s}: {:?}", changed_sets[s]);
    }
    // Stage 3 (steps 4, 5): stages 1 and 2 frozen as the composite, attn2 LoRAs train at 0.3x.
    for s in 4..6 {
        assert!(!stage_sets[s].is_empty() && stage_sets[s].iter().all(is_attn2), "step {s}: {:?}", stage_sets[s]);
        assert!(changed_sets[s].iter().all(is_attn2), "step {s}: {:?}", changed_sets[s]);
    }
    let loss_after = t.eval_loss(9).unwrap();
    println!("eval loss: {loss_before:.5} -> {loss_after:.5}");
    assert!(loss_after < loss_before, "eval loss {loss_before} -> {loss_after}");
    let stage3 = t.optimizer.groups().iter().find(|g| g.config.name.ends_with("/stage3")).unwrap();
    assert!((stage3.config.lr_scale - 0.3).abs() < 1e-12);
    // The composite adapter exports as one kohya file with per-module ranks.
    let files = graft_trainer::session::export_for(&t).unwrap();
    let kohya = files.iter().find(|p| p.file_name().unwrap() == "test-adapter.safetensors").unwrap();
    let tensors = candle_core::safetensors::load(kohya, &Device::Cpu).unwrap();
    let ranks: std::collections::BTreeSet<usize> =
        tensors.iter().filter(|(k, _)| k.ends_with("lora_down.weight")).map(|(_, v)| v.dim(0).unwrap()).collect();
    assert_eq!(ranks, [4, 8, 12].into_iter().collect());
}

#[test]
fn interrupted_and_resumed_run_ends_with_the_same_parameters() {
    let dir_a = scratch("train_resume_a");
    let strategy = "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01, dropout = 0.1 }";
    let config_a = setup(&dir_a, 6, "save_every = 3", strategy);
    let mut a = trainer(&config_a);
    train_steps(&mut a, 6);

    let dir_b = scratch("train_resume_b");
    let config_b = setup(&dir_b, 6, "save_every = 3", strategy);
    let plugins = plugins();
    let run = |steps: &str, resume: bool| {
        let mut args = vec![
            "train",
            "--config",
            config_b.to_str().unwrap(),
            "--steps",
            steps,
            "--plugins",
            plugins.to_str().unwrap(),
            "--no-default-plugins",
        ];
        if resume {
            args.push("--resume");
        }
        graft(&args).unwrap();
    };
    run("3", false);
    run("6", true);
    let mut b = trainer(&config_b);
    let ckpt = graft_trainer::checkpoint::latest(&b.config.output_dir).unwrap().unwrap();
    assert!(ckpt.ends_with("step-000006"), "{}", ckpt.display());
    graft_trainer::checkpoint::load(&mut b, &ckpt).unwrap();
    assert_eq!(b.step, 6);
    let (pa, pb) = (param_values(&a), param_values(&b));
    assert_eq!(pa.len(), pb.len());
    for ((ka, va), (kb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka} differs after resume");
    }
}

#[test]
fn train_command_writes_checkpoints_samples_log_plot_and_adapters() {
    let dir = scratch("train_command");
    let config = setup(&dir, 4, "save_every = 2\nsample_every = 2", "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4 }");
    let plugins = plugins();
    graft(&["train", "--config", config.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"]).unwrap();
    let out = dir.join("out");
    for f in [
        "loss.jsonl",
        "loss.png",
        "test-adapter.safetensors",
        "test-adapter.peft.safetensors",
        "checkpoints/latest",
        "checkpoints/step-000002/params.safetensors",
        "checkpoints/step-000004/optimizer.safetensors",
        "samples/step000002_00_5.png",
        "samples/step000004_00_5.png",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let log = graft_trainer::losslog::read(&out.join("loss.jsonl")).unwrap();
    assert_eq!(log.iter().map(|e| e.step).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    // The kohya file carries the metadata A1111 needs.
    let bytes = std::fs::read(out.join("test-adapter.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["ss_output_name"], "test-adapter");
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(meta["ss_steps"], "4");
    // A missing config key and a broken image are named.
    std::fs::write(dir.join("data/009.png"), b"not a png").unwrap();
    std::fs::write(dir.join("data/009.txt"), "broken").unwrap();
    let e =
        graft_tests::graft_err(&["train", "--config", config.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"]);
    assert!(e.contains("009.png"), "{e}");
}

#[test]
fn non_finite_steps_are_skipped_and_counted() {
    let dir = scratch("train_nan");
    let config = setup(&dir, 10, "", "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }");
    let mut t = trainer(&config);
    train_steps(&mut t, 2);
    let good = param_values(&t);
    // A fault makes one adapter's output NaN: the loss is NaN, the step is skipped.
    let (key, p) = t.set.store().params(Some("lora")).into_iter().find(|(k, _)| k.name == "up").unwrap();
    let poisoned = (p.var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
    t.set.store().set(&key, &poisoned).unwrap();
    for n in 1..=2 {
        let r = t.train_step().unwrap();
        assert!(r.skipped && !r.loss.is_finite(), "{r:?}");
        assert_eq!((t.bad_in_row, t.skipped_total), (n, n));
    }
    // Nothing was updated by the skipped steps; repaired, training goes on.
    let key_s = key.to_string();
    for (k, v) in param_values(&t) {
        if k != key_s {
            assert_eq!(&v, &good.iter().find(|(g, _)| *g == k).unwrap().1, "{k} changed during a skipped step");
        }
    }
    t.set.store().set(&key, &p.var.as_tensor().zeros_like().unwrap()).unwrap();
    let r = t.train_step().unwrap();
    assert!(!r.skipped);
    assert_eq!((t.bad_in_row, t.skipped_total), (0, 2));
}

/// `cache_text_encoder_outputs`: with UNet-only LoRA and static captions the text encoders'
/// weights leave memory for the steps (and the VAE, every latent being cached), come back (the
/// same values) for sample images, and leave again at the next step. The samples and the losses equal a run that keeps them in memory. A
/// strategy with text-encoder adapters keeps them.
#[test]
fn text_encoders_leave_memory_during_the_steps() {
    use graft_trainer::samples::render_samples;
    let prompts = vec![graft_trainer::samples::SamplePrompt {
        prompt: "a pink circle".into(),
        negative: None,
        width: 64,
        height: 48,
        seed: 5,
        steps: 2,
        guidance: 5.0,
        scheduler: None,
    }];
    let run = |cache: bool| {
        let dir = scratch(&format!("train_te_release_{cache}"));
        let config = setup(
            &dir,
            4,
            &format!("cache_text_encoder_outputs = {cache}"),
            "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, unet_lr = 0.01 }",
        );
        let mut t = trainer(&config);
        let te_bytes = |t: &Trainer| -> usize {
            t.model.registries()[1..]
                .iter()
                .flat_map(|r| (0..r.len()).filter_map(|i| r.linear_weights(i).map(|w| w.read().unwrap().weight.elem_count())))
                .sum()
        };
        let full = te_bytes(&t);
        let mut losses = Vec::new();
        losses.push(t.train_step().unwrap().loss);
        assert_eq!(t.model.text_encoders_released(), cache);
        assert_eq!(te_bytes(&t) == 0, cache, "released weights are empty");
        assert!(t.model.vae.is_released(), "every latent is cached: the VAE is released");
        t.set.set_training(false);
        let paths = render_samples(&t.model, &t.set, &prompts, &dir.join("samples"), "s").unwrap();
        t.set.set_training(true);
        assert!(!t.model.text_encoders_released() && !t.model.vae.is_released(), "sampling reads them back");
        assert_eq!(te_bytes(&t), full);
        losses.push(t.train_step().unwrap().loss);
        assert_eq!(t.model.text_encoders_released(), cache, "the next step releases them again");
        assert!(t.model.vae.is_released());
        (losses, std::fs::read(&paths[0]).unwrap())
    };
    let (kept_losses, kept_png) = run(false);
    let (losses, png) = run(true);
    assert_eq!(losses, kept_losses);
    assert_eq!(png, kept_png, "samples are bit-identical");

    let dir = scratch("train_te_release_hooked");
    let config = setup(&dir, 2, "", "plugin = \"lora\"\nconfig = { rank = 4, alpha = 4, train_text_encoder = true }");
    let mut t = trainer(&config);
    t.train_step().unwrap();
    assert!(!t.model.text_encoders_released(), "adapters in the text encoders keep them in memory");
}

/// The kohya_ss fixture with its paths pointed at `dir` and the tiny model; the dataset in kohya's
/// `10_name` folder and the prompt file where kohya_ss writes it.
fn kohya_setup(dir: &Path, extra: &str) -> PathBuf {
    write_shapes_dataset(&dir.join("img/10_pastel"), 4, 64);
    std::fs::create_dir_all(dir.join("model/sample")).unwrap();
    std::fs::write(dir.join("model/sample/prompt.txt"), "a pink circle, line art --w 64 --h 64 --d 5 --s 2\n").unwrap();
    let fixture = graft_tests::fixtures().join("kohya/config_lora-20261206-091512.toml");
    let text = std::fs::read_to_string(fixture).unwrap();
    let text =
        text.replace("/home/user/models/sd_xl_base_1.0", tiny_model().to_str().unwrap()).replace("/home/user/kohya", dir.to_str().unwrap());
    let path = dir.join("config_lora.toml");
    std::fs::write(&path, format!("{extra}{text}")).unwrap();
    path
}

/// A kohya_ss GUI config (SDXL LoRA at dim 16 / alpha 32, UNet only, bf16, samples every 50
/// steps) trains unchanged, with every key mapped or noted.
#[test]
fn kohya_ss_config_trains_unchanged() {
    let dir = scratch("train_kohya");
    let path = kohya_setup(&dir, "");
    let cwd = std::env::current_dir().unwrap();
    let import = graft_trainer::kohya::import(&path, &cwd, false).unwrap();
    let c = &import.config;
    let lora = &c.strategy.config;
    assert_eq!((lora["rank"].as_integer(), lora["alpha"].as_float()), (Some(16), Some(32.0)));
    let targets: Vec<&str> = lora["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(targets.contains(&"unet.*.ff.net.2") && targets.iter().all(|t| t.starts_with("unet.")), "{targets:?}");
    assert_eq!(
        (c.options.steps, c.options.save_every, c.options.sample_every, c.options.batch_size, c.options.warmup_steps),
        (50, 25, 50, Some(2), 5)
    );
    assert_eq!(
        (c.options.lr_schedule.name(), c.options.cache_latents, c.options.dtype.to_string().as_str()),
        ("cosine", graft_trainer::options::CacheLatents::Disk, "bf16")
    );
    assert_eq!(
        (c.options.sample_sampler.as_deref(), c.options.prediction_type, c.options.seed),
        (Some("euler_a"), Some(graft_sdxl::schedulers::PredictionType::Epsilon), 1234)
    );
    assert_eq!(
        (c.options.noise_offset, c.options.min_snr_gamma, c.options.max_grad_norm, c.options.gradient_checkpointing),
        (0.0357, 5.0, 1.0, true)
    );
    let d = &c.dataset;
    assert_eq!((d.resolution, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps), (64, true, 32, 128, 32));
    assert_eq!((d.caption_extension.as_deref(), d.shuffle_caption, d.keep_tokens, d.bucket_no_upscale), (Some(".txt"), true, 1, true));
    for noted in ["`sdpa`", "`huber_c`", "`loss_type = \"l2\"`", "`epoch`", "`save_precision`", "`max_token_length = 75`"] {
        assert!(import.notes.iter().any(|n| n.starts_with(noted)), "{noted} not noted: {:#?}", import.notes);
    }

    let plugins = plugins();
    let args = ["train", "--kohya-config", path.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--no-default-plugins"];
    graft(&args).unwrap();
    let out = dir.join("model");
    let log = graft_trainer::losslog::read(&out.join("loss.jsonl")).unwrap();
    assert_eq!(log.len(), 50);
    assert!(log.iter().all(|e| e.loss.is_finite()));
    for f in ["pastel-style.safetensors", "checkpoints/step-000025/params.safetensors", "checkpoints/step-000050/params.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let samples: Vec<_> = std::fs::read_dir(out.join("samples")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(samples.iter().any(|n| n.to_string_lossy().contains("000050")), "no sample at step 50: {samples:?}");
    let file = graft_formats::read::read_file(&out.join("pastel-style.safetensors")).unwrap();
    assert_eq!(file.metadata.get("ss_network_dim").map(String::as_str), Some("16"), "{:?}", file.metadata);
    // The kept graft config repeats the run.
    let kept = TrainConfig::from_file(&out.join("graft-config.toml")).unwrap();
    assert_eq!((kept.options.steps, kept.strategy.config["rank"].as_integer()), (50, Some(16)));
}

/// Settings graft cannot do are refused together, each named; `--ignore-unsupported` trains
/// without them. Epoch counts become steps with the dataset's epoch length.
#[test]
fn kohya_config_unsupported_keys_and_epochs() {
    let dir = scratch("train_kohya_refused");
    let path = kohya_setup(&dir, "reg_data_dir = \"/home/user/kohya/reg\"\nloss_type = \"huber\"\nmy_own_key = 3\n");
    let text = std::fs::read_to_string(&path).unwrap().replace("loss_type = \"l2\"\n", "");
    std::fs::write(&path, text).unwrap();
    let cwd = std::env::current_dir().unwrap();
    let e = format!("{:#}", graft_trainer::kohya::import(&path, &cwd, false).unwrap_err());
    for k in [
        "`reg_data_dir = ",
        "`loss_type = \"huber\"` (losses other than l2)",
        "`my_own_key = 3` (not a setting graft knows)",
        "--ignore-unsupported",
    ] {
        assert!(e.contains(k), "{k} not in: {e}");
    }
    let import = graft_trainer::kohya::import(&path, &cwd, true).unwrap();
    assert!(import.notes.iter().any(|n| n.contains("reg_data_dir") && n.contains("left out")), "{:#?}", import.notes);

    // 4 images x 10 repeats in batches of 2: 20 steps an epoch.
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace("max_train_steps = 50\n", "max_train_epochs = 3\nsave_every_n_epochs = 1\n")
        .replace("lr_warmup_steps = 5", "lr_warmup_steps = 0.1");
    std::fs::write(&path, text).unwrap();
    let c = graft_trainer::kohya::import(&path, &cwd, true).unwrap().config;
    assert_eq!((c.options.steps, c.options.save_every, c.options.warmup_steps), (60, 20, 6));

    // LoCon and an optimizer with arguments, as kohya_ss writes them.
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("network_args = []", "network_args = [ \"conv_dim=8\", \"conv_alpha=4\",]").replace(
        "optimizer_type = \"AdamW\"",
        "optimizer_type = \"prodigy\"\noptimizer_args = [ \"decouple=True\", \"d_coef=2\", \"betas=0.9,0.99\",]",
    );
    std::fs::write(&path, text).unwrap();
    let c = graft_trainer::kohya::import(&path, &cwd, true).unwrap().config;
    assert_eq!((c.strategy.config["conv_rank"].as_integer(), c.strategy.config["conv_alpha"].as_float()), (Some(8), Some(4.0)));
    assert_eq!(c.options.optimizer, "Prodigy");
    assert_eq!(c.options.optimizer_args["betas"], toml::Value::Array(vec![0.9.into(), 0.99.into()]));
    assert_eq!((c.options.optimizer_args["decouple"].as_bool(), c.options.optimizer_args["d_coef"].as_integer()), (Some(true), Some(2)));

    // kohya's validation keys; `validation_split = 0` (its default) is off, its seed then unused.
    let text = std::fs::read_to_string(&path).unwrap();
    let with = |keys: &str| {
        std::fs::write(&path, format!("{keys}{text}")).unwrap();
        graft_trainer::kohya::import(&path, &cwd, true).unwrap()
    };
    let o = with("validation_split = 0.25\nvalidation_seed = 9\nvalidate_every_n_steps = 5\n").config.options;
    assert_eq!((o.validation_split, o.validation_seed, o.validate_every), (Some(0.25), Some(9), 5));
    let off = with("validation_split = 0.0\nvalidation_seed = 9\n");
    assert_eq!((off.config.options.validation_split, off.config.options.validation_seed), (None, None));
    assert!(!off.notes.iter().any(|n| n.contains("validation")), "{:#?}", off.notes);
}

/// Each optimizer (`optimizer` + `[optimizer_args]`) trains the tiny LoRA: finite losses, a lower
/// eval loss after 10 steps, and a checkpoint at step 5 resumed by a new trainer ends where the
/// straight run ends, bit for bit. Prints the optimizer state size per trained weight.
#[test]
fn every_optimizer_trains_and_resumes() {
    let cases = [
        ("AdamW", "", 0.01),
        // min_8bit_size 0: the tiny model's LoRA matrices are smaller than bnb's 4096.
        ("AdamW8bit", "min_8bit_size = 0", 0.01),
        ("Lion", "weight_decay = 0.1", 0.002),
        ("Prodigy", "d_coef = 1.0\nsafeguard_warmup = true\nuse_bias_correction = true", 1.0),
        ("Adafactor", "relative_step = false\nscale_parameter = false", 0.01),
    ];
    for (name, args, lr) in cases {
        let dir = scratch(&format!("train_optim_{name}"));
        let strategy = format!("plugin = \"lora\"\nconfig = {{ rank = 4, alpha = 4, unet_lr = {lr} }}");
        let extra = format!("save_every = 5\noptimizer = \"{}\"\n[optimizer_args]\n{args}\n", name.to_lowercase());
        let config = setup(&dir, 10, &extra, &strategy);
        let mut t = trainer(&config);
        assert_eq!(t.optimizer.kind().name(), name);
        let before = t.eval_loss(9).unwrap();
        let mut losses = Vec::new();
        for step in 0..10 {
            let r = t.train_step().unwrap();
            assert!(!r.skipped && r.loss.is_finite() && r.lr > 0.0, "{name}: {r:?}");
            losses.push(r.loss);
            if step == 4 {
                graft_trainer::checkpoint::save(&t).unwrap();
            }
        }
        let after = t.eval_loss(9).unwrap();
        let weights: usize = t.parameters().iter().map(|(_, v)| v.elem_count()).sum();
        println!(
            "{name}: eval loss {before:.5} -> {after:.5}; state {} bytes for {weights} weights ({:.2} bytes/weight); losses {losses:.4?}",
            t.optimizer.state_bytes(),
            t.optimizer.state_bytes() as f64 / weights as f64
        );
        assert!(after < before, "{name}: eval loss {before} -> {after}");

        let mut resumed = trainer(&config);
        let ckpt = dir.join("out/checkpoints/step-000005");
        graft_trainer::checkpoint::load(&mut resumed, &ckpt).unwrap();
        for _ in 5..10 {
            resumed.train_step().unwrap();
        }
        for ((k, a), (_, b)) in param_values(&t).iter().zip(&param_values(&resumed)) {
            assert_eq!(a, b, "{name}: {k} differs after resume");
        }
    }
}
