//! The training loop: one strategy plugin, one dataset, the base model frozen.
//!
//! Each step: the strategy's stage directives, a batch of VAE latents (cached), text embeddings
//! (cached while no adapter touches the text encoders), seeded noise and timesteps, the UNet with
//! the adapters at their hook points, an epsilon or v-prediction MSE loss (min-SNR weighted),
//! backward, then the configured optimizer (AdamW by default) over the plan's groups. Non-finite
//! losses or gradients skip the step; so does a strategy that fails (panic or error) during it:
//! it is detached, reported, its parameters are kept, and steps are skipped until a new build is
//! taken up (`poll_reloads`).
//!
//! In watch mode ([`Trainer::step_or_pause`]) a failing strategy pauses the run instead: the
//! step is rewound as if it had not been tried (step counter, data position, random streams,
//! bad-step counters), and [`Trainer::wait_for_rebuild`] waits for a new build, then the same
//! step is tried again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, TensorId, Var};
use graft_sdxl::checkpoint::{Direct, Runner, Tape};
use graft_sdxl::rng::{GraftRng, RngState};
use graft_sdxl::schedulers::training::NoiseSchedule;
use graft_sdxl::schedulers::PredictionType;
use graft_sdxl::SdxlModel;

use crate::cache::{EmbeddingCache, LatentCache};
use crate::config::TrainConfig;
use crate::dataset::{Batch, Dataset, DatasetConfig, DatasetSpec, OpenOptions, SubsetSpec};
use crate::error::{At, Error, Result};
use crate::optim::{GradAccumulator, GroupConfig, Optimizer};
use crate::options::CacheLatents;
use crate::schedule::{LrSchedule, ScheduleKind};
use crate::validation::Validation;
use graft_runtime::adapters::dispatcher::UnfrozenBase;
use graft_runtime::adapters::dispatcher::{AdapterSet, LrScale, StrategyId};
use graft_runtime::plugins::{PluginManager, ReloadEvent, StrategyInstance};

/// What the loss of one batch is computed from.
struct LossInputs<'a> {
    latents: &'a Tensor,
    noise: &'a Tensor,
    timesteps: &'a [usize],
    hidden: &'a Tensor,
    pooled: &'a Tensor,
    time_ids: &'a Tensor,
}

/// What one optimizer step did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub seconds: f64,
    /// The strategy's stage (from its plan) when one begins at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The validation loss measured after this step (set by the session when one is due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Where the data stream is: which epoch, which batch of it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub batch: usize,
}

/// Why a watch-mode run waits instead of training: its strategy failed at `step`.
#[derive(Debug, Clone)]
pub struct Pause {
    /// The step that is tried again once a rebuild is taken up.
    pub step: u64,
    /// What failed (the plugin's error).
    pub reason: String,
    /// The plugin library whose rebuild the run waits for.
    pub plugin_file: PathBuf,
}

impl Pause {
    /// One line for logs and status displays.
    pub fn message(&self) -> String {
        format!(
            "step {}: {}; the run is paused (no step used, no bad step counted) and waits for a rebuild of {}",
            self.step,
            self.reason,
            self.plugin_file.display()
        )
    }
}

/// What [`Trainer::step_or_pause`] did.
#[derive(Debug)]
pub enum StepOutcome {
    Trained(StepRecord),
    Paused(Pause),
}

/// The counters and random streams a step moves: to undo a step that did not happen, or to
/// set them from a checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct StepStart {
    pub step: u64,
    pub position: DataPosition,
    pub rng: RngState,
    pub dispatcher_rng: RngState,
    pub bad_in_row: u64,
    pub skipped_total: u64,
}

pub struct Trainer {
    pub config: TrainConfig,
    /// Shared so that `graft compare` can run several strategies on one loaded model.
    pub model: Arc<SdxlModel>,
    pub set: AdapterSet,
    pub strategy: StrategyId,
    pub optimizer: Optimizer,
    pub schedule: LrSchedule,
    pub dataset: Dataset,
    noise: NoiseSchedule,
    prediction: PredictionType,
    pub rng: GraftRng,
    latents: Option<LatentCache>,
    embeds: EmbeddingCache,
    /// Steps done (the next step's index).
    pub step: u64,
    pub position: DataPosition,
    pub bad_in_row: u64,
    pub skipped_total: u64,
    /// Learning-rate scales set by stage directives, by optimizer group.
    pub lr_scales: BTreeMap<String, f64>,
    pub plugins: PluginManager,
    /// The state right after the last good (not skipped) step: where a stop after bad steps
    /// rewinds to, so its checkpoint holds the last good parameters at the right step.
    last_good: Option<StepStart>,
    /// The plugin's private state before a step that paused the run, given to the rebuild.
    paused_plugin_state: Option<String>,
    /// The text encoders / the VAE were released at least once (for the log).
    text_encoders_were_released: bool,
    vae_was_released: bool,
    /// The validation images (`validation_dir` / `validation_split`), when there are some.
    pub validation: Option<Validation>,
}

/// The optimizer group of a strategy's plan group.
fn group_name(strategy: &str, group: &str) -> String {
    format!("{strategy}/{group}")
}

impl Trainer {
    /// Loads the model and dataset, creates the strategy from its plugin and plans it.
    pub fn new(config: TrainConfig, plugins: PluginManager, device: &Device) -> Result<Self> {
        let model = SdxlModel::load_as(&config.model, config.model_config.as_deref(), device, config.options.dtype)
            .map_err(|cause| Error::Model { path: config.model.clone(), cause })?;
        tracing::info!("{}", graft_sdxl::precision::describe(model.weight_dtype(), &model.device));
        Self::with_model(config, Arc::new(model), plugins)
    }

    /// As [`Trainer::new`] on a model already loaded (`config.model` is then only a name for the
    /// files). The model's base weights are shared: a strategy that unfreezes or folds into them
    /// overrides them for every holder until the trainer (its adapter set) is dropped; a user of
    /// the model who must not see that takes [`SdxlModel::as_loaded`].
    pub fn with_model(config: TrainConfig, model: Arc<SdxlModel>, plugins: PluginManager) -> Result<Self> {
        let mut dataset = open_dataset(&config)?;
        for w in dataset.warnings() {
            tracing::warn!("{w}");
        }
        let plugin = plugins.require(&config.strategy.plugin)?;
        let instance = StrategyInstance::new(plugin, config.strategy.name.as_deref(), &config.strategy_json()?)?;
        let mut set = AdapterSet::new(&model, config.options.seed);
        let (strategy, diff) = set.add(instance, 1.0, 1.0)?;
        tracing::info!(
            "strategy `{}` ({} {} from {}, sha256 {}): {} hook points, {} parameters created",
            set.strategies()[strategy].name(),
            plugin.manifest.id,
            plugin.manifest.version,
            plugin.source.display(),
            plugin.sha256,
            set.strategies()[strategy].plan.attachments.len(),
            diff.created.len()
        );
        let prediction = config.options.prediction_type.unwrap_or(model.config.scheduler.prediction_type);
        let noise = NoiseSchedule::new(&model.config.scheduler)?;
        // Before the latents are cached: held-out images are no training images.
        let validation = Validation::open(&config, &mut dataset, noise.num_train_timesteps())?;
        let kind = config.options.lr_schedule;
        let mut schedule = LrSchedule::new(kind, config.options.warmup_steps as usize, config.options.steps as usize);
        if let (ScheduleKind::CosineWithRestarts, Some(n)) = (kind, config.options.lr_scheduler_num_cycles) {
            schedule.num_cycles = n;
        }
        let latents = match config.options.cache_latents {
            CacheLatents::Memory => Some(LatentCache::in_memory()),
            CacheLatents::Disk => Some(LatentCache::on_disk(&config.output_dir.join("cache"), "vae")?),
            CacheLatents::None => None,
        };
        let optimizer = build_optimizer(&set, strategy, &config)?;
        let rng = GraftRng::new(config.options.seed);
        let mut trainer = Self {
            config,
            model,
            set,
            strategy,
            optimizer,
            schedule,
            dataset,
            noise,
            prediction,
            rng,
            latents,
            embeds: EmbeddingCache::in_memory(),
            step: 0,
            position: DataPosition::default(),
            bad_in_row: 0,
            skipped_total: 0,
            lr_scales: BTreeMap::new(),
            plugins,
            last_good: None,
            paused_plugin_state: None,
            text_encoders_were_released: false,
            vae_was_released: false,
            validation,
        };
        trainer.prefill_latents()?;
        if let Some(v) = trainer.validation.as_mut() {
            // Now, while the VAE is loaded (it is released for the steps once latents are cached).
            v.prepare(&*trainer.model.vae()?, trainer.model.config.vae.scaling_factor, &trainer.model.device)?;
        }
        Ok(trainer)
    }

    pub fn strategy_name(&self) -> &str {
        self.set.strategies()[self.strategy].name()
    }

    /// Encodes every image once (and its flip when flip_aug is on), each with VAE noise of its
    /// own (derived from its index and flip), so a resumed run sees the same latents, even when
    /// an earlier session was stopped part way through filling an on-disk cache.
    fn prefill_latents(&mut self) -> Result<()> {
        let Some(cache) = self.latents.as_mut() else { return Ok(()) };
        let (vae, scale) = (self.model.vae()?, self.model.config.vae.scaling_factor);
        let vae_rng = self.rng.derive(0x7ae);
        let mut work = Vec::new();
        for (i, it) in self.dataset.items().iter().enumerate() {
            work.push((i, false));
            if self.dataset.specs()[it.dataset].subsets[it.subset].flip_aug {
                work.push((i, true));
            }
        }
        let bar = graft_runtime::progress::bar(work.len() as u64, "caching latents");
        for (done, &(i, flip)) in work.iter().enumerate() {
            let mut rng = vae_rng.derive(1 + 2 * i as u64 + flip as u64);
            let mut encode = |img: &Tensor| -> candle_core::Result<Tensor> { vae.encode(img)?.sample(&mut rng)? * scale };
            cache.latent(&self.dataset, i, flip, &self.model.device, &mut encode)?;
            bar.set_position(done as u64 + 1);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Frees what the steps do not use (kohya's `cache_latents` and
    /// `cache_text_encoder_outputs`): the VAE once every latent is cached, the text encoders'
    /// weights when no adapter is in them, no base weight of theirs is trained and every
    /// caption's embeddings are cached (computed here the first time). Sample images read them
    /// back; the next step frees them again. A shared model (serve) keeps everything.
    fn release_unused_components(&mut self) -> Result<()> {
        if self.config.shared_model || self.model.text_encoder_files.is_none() {
            return Ok(());
        }
        if self.latents.is_some() && self.model.release_vae()? && !self.vae_was_released {
            self.vae_was_released = true;
            tracing::info!("VAE released for the steps (every latent is cached); it comes back for sample images");
        }
        let te_unfrozen = self.set.unfrozen().iter().any(|b| !b.layer.starts_with("unet."));
        let possible =
            self.config.options.cache_text_encoder_outputs && self.dataset.captions_are_static() && !self.text_encoders_hooked() && !te_unfrozen;
        if !possible || self.model.text_encoders_released() {
            return Ok(());
        }
        let mut captions: Vec<String> = self.dataset.items().iter().map(|it| it.caption.clone()).collect();
        captions.push(String::new()); // caption dropout
        if let Some(v) = &self.validation {
            captions.extend(v.captions().map(str::to_string));
        }
        captions.sort();
        captions.dedup();
        let model = &self.model;
        self.embeds.batch(&captions, &model.device, |c| {
            let e = model.encode_prompts(&[c], graft_sdxl::PipelineHooks::none())?;
            Ok(vec![e.hidden, e.pooled])
        })?;
        let freed = self.model.release_text_encoders()?;
        let first = !self.text_encoders_were_released;
        self.text_encoders_were_released = true;
        let text = format!(
            "text encoders released for the steps ({:.2} GB; {} captions cached); they come back for sample images",
            freed as f64 / 1e9,
            captions.len()
        );
        if first {
            tracing::info!("{text}");
        } else {
            tracing::debug!("{text}");
        }
        Ok(())
    }

    /// True while some adapter is attached inside a text encoder: embeddings are then computed
    /// every step instead of cached.
    fn text_encoders_hooked(&self) -> bool {
        self.set.any_attached(|l| l.component != graft_abi::Component::UNET)
    }

    fn next_batch(&mut self) -> Result<Batch> {
        loop {
            let mut epoch = self.dataset.epoch(self.config.options.seed, self.position.epoch).on(&self.model.device);
            if self.latents.is_some() {
                epoch = epoch.without_images();
            }
            if self.position.batch < epoch.len() {
                let batch = epoch.batch(self.position.batch)?;
                self.position.batch += 1;
                return Ok(batch);
            }
            self.position = DataPosition { epoch: self.position.epoch + 1, batch: 0 };
        }
    }

    fn batch_latents(&mut self, batch: &Batch) -> Result<Tensor> {
        let dev = self.model.device.clone();
        let scale = self.model.config.vae.scaling_factor;
        match self.latents.as_mut() {
            Some(cache) => {
                let mut fail = |_: &Tensor| -> candle_core::Result<Tensor> { candle_core::bail!("latent cache miss after prefill") };
                Ok(cache.batch_latents(&self.dataset, batch, &dev, &mut fail)?)
            }
            None => {
                let mut vae_rng = self.rng.derive(0x7ae ^ self.step);
                Ok((self.model.vae()?.encode(batch.images()?)?.sample(&mut vae_rng)? * scale)?)
            }
        }
    }

    fn text_embeddings(&mut self, captions: &[String]) -> Result<(Tensor, Tensor)> {
        if self.text_encoders_hooked() {
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            let hooks = self.set.hooks();
            let e = self.model.encode_prompts(&refs, hooks.pipeline())?;
            return Ok((e.hidden, e.pooled));
        }
        let model = &self.model;
        let out = self.embeds.batch(captions, &model.device, |c| {
            let e = model.encode_prompts(&[c], graft_sdxl::PipelineHooks::none())?;
            Ok(vec![e.hidden, e.pooled])
        })?;
        Ok((out[0].clone(), out[1].clone()))
    }

    /// The loss of one batch and its gradients: seeded noise and timesteps, then
    /// [`Trainer::loss_from`] and the backward (through the checkpointing tape when
    /// `gradient_checkpointing` is on).
    pub fn loss_and_grads(&mut self, batch: &Batch) -> Result<(Tensor, GradStore)> {
        let dev = self.model.device.clone();
        let latents = self.batch_latents(batch)?;
        let (hidden, pooled) = self.text_embeddings(&batch.captions)?;
        let (b, c, _, _) = latents.dims4()?;
        let mut noise = self.rng.randn(latents.shape(), &dev)?;
        if self.config.options.noise_offset > 0.0 {
            noise = noise.broadcast_add(&(self.rng.randn((b, c, 1, 1), &dev)? * self.config.options.noise_offset)?)?;
        }
        let timesteps = self.noise.sample_timesteps(b, &mut self.rng);
        let time_ids = batch.time_ids(&dev)?;
        let inputs =
            LossInputs { latents: &latents, noise: &noise, timesteps: &timesteps, hidden: &hidden, pooled: &pooled, time_ids: &time_ids };
        if !self.config.options.gradient_checkpointing {
            let loss = self.loss_from(&latents, &noise, &timesteps, &hidden, &pooled, &time_ids)?;
            let grads = loss.backward()?;
            return Ok((loss.detach(), grads));
        }
        let hooks = self.set.hooks();
        let mut tape = Tape::new(&hooks.unet);
        let pred = self.predict(&inputs, &hooks.unet, &mut tape)?;
        let pred_var = Var::from_tensor(&pred)?;
        let loss = self.loss_of(pred_var.as_tensor(), &inputs)?;
        let mut head = loss.backward()?;
        let trainable: HashSet<TensorId> =
            self.optimizer.groups().iter().flat_map(|g| g.params.iter().map(|(_, v)| v.as_tensor().id())).collect();
        let upstream: Vec<(&Tensor, Tensor)> = head.remove(pred_var.as_tensor()).map(|g| (&pred, g)).into_iter().collect();
        let grads = tape.backward(&upstream, &trainable)?;
        Ok((loss.detach(), grads))
    }

    /// The UNet's prediction for the noised latents, its segments run by `runner`.
    fn predict<'a>(&'a self, x: &LossInputs, hooks: &'a dyn graft_sdxl::Hooks, runner: &mut dyn Runner<'a>) -> Result<Tensor> {
        let dev = x.latents.device();
        let noisy = self.noise.add_noise(x.latents, x.noise, x.timesteps)?;
        let t: Vec<f32> = x.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, x.timesteps.len(), dev)?;
        Ok(self.model.unet.forward_with(&noisy, &t, x.hidden, x.pooled, x.time_ids, hooks, runner)?)
    }

    /// The diffusion loss for given latents, noise and timesteps: epsilon or v-prediction MSE,
    /// min-SNR weighted when configured, through the UNet with the adapters attached.
    pub fn loss_from(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
        hidden: &Tensor,
        pooled: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        let x = LossInputs { latents, noise, timesteps, hidden, pooled, time_ids };
        let pred = {
            let hooks = self.set.hooks();
            self.predict(&x, &hooks.unet, &mut Direct)?
        };
        self.loss_of(&pred, &x)
    }

    /// The loss of a prediction against the target of `x`.
    fn loss_of(&self, pred: &Tensor, x: &LossInputs) -> Result<Tensor> {
        let (dev, timesteps) = (x.latents.device(), x.timesteps);
        let b = x.latents.dim(0)?;
        let target = match self.prediction {
            PredictionType::VPrediction => self.noise.velocity(x.latents, x.noise, timesteps)?,
            _ => x.noise.clone(),
        };
        let per_sample = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let per_sample = if self.config.options.min_snr_gamma > 0.0 {
            let gamma = self.config.options.min_snr_gamma;
            let weights: Vec<f32> = self
                .noise
                .snr(timesteps)?
                .into_iter()
                .map(|snr| {
                    let w = snr.min(gamma);
                    (match self.prediction {
                        PredictionType::VPrediction => w / (snr + 1.0),
                        _ => w / snr,
                    }) as f32
                })
                .collect();
            (per_sample * Tensor::from_vec(weights, b, dev)?)?
        } else {
            per_sample
        };
        Ok(per_sample.mean_all()?)
    }

    /// A fixed evaluation loss (no gradients): the first batch of epoch 0 with noise and
    /// timesteps from `seed`, the same every call, so runs and steps can be compared.
    pub fn eval_loss(&mut self, seed: u64) -> Result<f64> {
        let dev = self.model.device.clone();
        let saved = self.position;
        self.position = DataPosition::default();
        let batch = self.next_batch();
        self.position = saved;
        let batch = batch?;
        let latents = self.batch_latents(&batch)?;
        let (hidden, pooled) = self.text_embeddings(&batch.captions)?;
        let mut rng = GraftRng::new(seed);
        let noise = rng.randn(latents.shape(), &dev)?;
        let timesteps = self.noise.sample_timesteps(latents.dim(0)?, &mut rng);
        let training = self.set_training_flag(false);
        let time_ids = batch.time_ids(&dev)?;
        let inputs =
            LossInputs { latents: &latents, noise: &noise, timesteps: &timesteps, hidden: &hidden, pooled: &pooled, time_ids: &time_ids };
        let loss = if self.config.options.gradient_checkpointing {
            // Without the graph: segment by segment, as in training.
            let hooks = self.set.hooks();
            let mut tape = Tape::new(&hooks.unet);
            self.predict(&inputs, &hooks.unet, &mut tape).and_then(|pred| self.loss_of(&pred, &inputs))
        } else {
            self.loss_from(&latents, &noise, &timesteps, &hidden, &pooled, &batch.time_ids(&dev)?)
        };
        self.set_training_flag(training);
        Ok(loss?.detach().to_scalar::<f32>()? as f64)
    }

    /// The stage of the strategy's plan that begins at `step` (the one with the latest start at
    /// or before it, when that differs from the previous step's), `None` otherwise or without
    /// stages. `on_step`'s directives switch the stage at this step.
    pub fn stage_beginning(&self, step: u64) -> Option<String> {
        let stages = &self.set.strategies()[self.strategy].plan.stages;
        let at = |s: u64| stages.iter().filter(|st| st.start_step <= s).max_by_key(|st| st.start_step).map(|st| st.name.to_string());
        let now = at(step)?;
        (step == 0 || at(step - 1).as_ref() != Some(&now)).then_some(now)
    }

    /// The validation loss now (`None` without validation data): for every validation image and
    /// timestep, the training step's loss (its prediction type and min-SNR weighting, so the
    /// values sit on the training loss's scale; no noise offset, which is a random augmentation)
    /// of the image noised with its fixed noise, adapters attached as in training, dropout off;
    /// the mean over images x timesteps. Nothing of the training state changes (data position,
    /// random streams, parameters), and no graph outlives a forward.
    pub fn validate(&mut self) -> Result<Option<f64>> {
        let Some(v) = self.validation.take() else { return Ok(None) };
        let training = self.set_training_flag(false);
        let started = Instant::now();
        let loss = self.validation_loss(&v);
        self.set_training_flag(training);
        let count = v.len() * v.timesteps().len();
        self.validation = Some(v);
        let loss = loss?;
        tracing::info!(
            "validation loss after {} steps: {loss:.5} ({count} images x timesteps, {:.1} s)",
            self.step,
            started.elapsed().as_secs_f64()
        );
        Ok(Some(loss))
    }

    fn validation_loss(&mut self, v: &Validation) -> Result<f64> {
        let mut sum = 0.0;
        let mut n = 0usize;
        for (i, (caption, latents, time_ids)) in v.items().enumerate() {
            let (hidden, pooled) = self.text_embeddings(&[caption.to_string()])?;
            for &t in v.timesteps() {
                let noise = v.noise(i, t, latents.shape(), latents.device())?;
                let timesteps = [t];
                let inputs = LossInputs { latents, noise: &noise, timesteps: &timesteps, hidden: &hidden, pooled: &pooled, time_ids };
                let loss = if self.config.options.gradient_checkpointing {
                    // Segment by segment, as the training step runs it: only segment inputs are kept.
                    let hooks = self.set.hooks();
                    let mut tape = Tape::new(&hooks.unet);
                    self.predict(&inputs, &hooks.unet, &mut tape).and_then(|pred| self.loss_of(&pred, &inputs))?
                } else {
                    self.loss_from(latents, &noise, &timesteps, &hidden, &pooled, time_ids)?
                };
                sum += loss.detach().to_scalar::<f32>()? as f64;
                n += 1;
            }
        }
        if self.strategy_failed() {
            // Its failure stays listed: the next step reports it (and skips or pauses).
            tracing::warn!("strategy `{}` failed during validation: no validation loss", self.strategy_name());
            return Ok(f64::NAN);
        }
        Ok(sum / n.max(1) as f64)
    }

    fn set_training_flag(&mut self, training: bool) -> bool {
        let was = self.set.is_training();
        self.set.set_training(training);
        was
    }

    /// One optimizer step (with gradient accumulation). Returns its record. A strategy that
    /// fails during it is detached and the step is skipped (and counted as a bad step).
    pub fn train_step(&mut self) -> Result<StepRecord> {
        match self.advance(false)? {
            StepOutcome::Trained(r) => Ok(r),
            // Not reached: advance(false) skips instead of pausing.
            StepOutcome::Paused(p) => Err(Error::Internal(p.message())),
        }
    }

    /// As [`Trainer::train_step`], for watch mode: when the strategy fails (or has failed), the
    /// step is undone as if it had not been tried and the run pauses; call
    /// [`Trainer::wait_for_rebuild`], then this again to try the same step.
    pub fn step_or_pause(&mut self) -> Result<StepOutcome> {
        self.advance(true)
    }

    fn step_start(&self) -> StepStart {
        StepStart {
            step: self.step,
            position: self.position,
            rng: self.rng.state(),
            dispatcher_rng: self.set.rng_state(),
            bad_in_row: self.bad_in_row,
            skipped_total: self.skipped_total,
        }
    }

    pub(crate) fn rewind(&mut self, to: &StepStart) {
        self.step = to.step;
        self.position = to.position;
        self.rng = GraftRng::from_state(to.rng);
        self.set.set_rng_state(to.dispatcher_rng);
        self.bad_in_row = to.bad_in_row;
        self.skipped_total = to.skipped_total;
    }

    /// Undoes the skipped steps since the last good one (or since the start of this session):
    /// the parameters and optimizer moments did not change in them, so the trainer is then
    /// exactly as right after the last good step, and a checkpoint of it resumes from there.
    /// Returns how many steps were undone.
    pub fn rewind_to_last_good(&mut self) -> u64 {
        let Some(good) = self.last_good.clone() else { return 0 };
        let undone = self.step.saturating_sub(good.step);
        self.rewind(&good);
        undone
    }

    /// Forgets the last good step and a pause (after the trainer's state was replaced, e.g. by
    /// loading a checkpoint: the next step starts from a good state again).
    pub(crate) fn forget_step_history(&mut self) {
        self.last_good = None;
        self.paused_plugin_state = None;
    }

    /// One step, undone on error (so a checkpoint saved after the error resumes exactly), or,
    /// with `pause`, undone and reported when the strategy fails.
    pub fn advance(&mut self, pause: bool) -> Result<StepOutcome> {
        self.release_unused_components()?;
        let start = self.step_start();
        if self.last_good.is_none() {
            // A session starts from a good state (fresh, or a checkpoint taken after a good step).
            self.last_good = Some(start.clone());
        }
        let plugin_state = if pause { self.set.strategies()[self.strategy].instance.save_state().ok() } else { None };
        match self.attempt(pause) {
            Ok(StepOutcome::Trained(r)) => {
                if !r.skipped {
                    self.last_good = Some(self.step_start());
                }
                Ok(StepOutcome::Trained(r))
            }
            Ok(StepOutcome::Paused(p)) => {
                self.rewind(&start);
                self.paused_plugin_state = plugin_state;
                tracing::warn!("{}", p.message());
                Ok(StepOutcome::Paused(p))
            }
            Err(e) => {
                self.rewind(&start);
                Err(e)
            }
        }
    }

    /// The pause for a failed strategy: its failures since the last call, or why it is detached.
    fn pause_now(&self) -> Pause {
        let failures: Vec<String> = self.set.take_failures().iter().map(|e| e.to_string()).collect();
        let reason = if failures.is_empty() { self.skip_reason() } else { failures.join("; ") };
        let id = &self.set.strategies()[self.strategy].instance.manifest().id;
        let plugin_file = match self.plugins.require(id) {
            Ok(p) => p.source.clone(),
            Err(_) => PathBuf::from(format!("the library of plugin `{id}`")),
        };
        Pause { step: self.step, reason, plugin_file }
    }

    fn attempt(&mut self, pause: bool) -> Result<StepOutcome> {
        if pause && self.strategy_failed() {
            return Ok(StepOutcome::Paused(self.pause_now()));
        }
        let started = Instant::now();
        self.set.set_training(true);
        let scales = self.set.on_step(self.step)?;
        if pause && self.strategy_failed() {
            return Ok(StepOutcome::Paused(self.pause_now()));
        }
        let stage = self.stage_beginning(self.step);
        if let Some(name) = &stage {
            tracing::info!("step {}: stage `{name}` of `{}` begins", self.step, self.strategy_name());
        }
        self.apply_lr_scales(&scales)?;
        self.set.set_step(self.step);

        let mut acc = GradAccumulator::new();
        let mut loss_sum = 0.0;
        let mut finite = true;
        for _ in 0..self.config.options.gradient_accumulation {
            let batch = self.next_batch()?;
            let (loss, grads) = self.loss_and_grads(&batch)?;
            if self.strategy_failed() {
                // Detached part way through the forward: the graph is not the strategy's.
                break;
            }
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                finite = false;
                loss_sum = value;
                break;
            }
            loss_sum += value;
            acc.add(&self.optimizer.gradients(&grads))?;
        }
        if pause && self.strategy_failed() {
            return Ok(StepOutcome::Paused(self.pause_now()));
        }
        for e in self.set.take_failures() {
            tracing::error!("step {}: {e}", self.step);
        }
        let failed = self.strategy_failed();
        let factor = self.schedule.factor(self.step as usize);
        let lr = self.current_lr(factor);
        let (skipped, grad_norm) = match (finite && !failed, acc.take_mean()?) {
            _ if failed => {
                tracing::warn!(
                    "step {}: strategy `{}` is detached after a failure: step skipped, its parameters are kept \
                     (fix and rebuild the plugin; with --watch the new build is taken up at the next step)",
                    self.step,
                    self.strategy_name()
                );
                loss_sum = f64::NAN;
                (true, f64::NAN)
            }
            (true, Some(grads)) => {
                let report = self.optimizer.step(&grads, factor)?;
                if report.skipped {
                    tracing::warn!("step {}: non-finite gradient in {}: step skipped", self.step, report.nonfinite.join(", "));
                }
                (report.skipped, report.grad_norm)
            }
            (true, None) => (false, 0.0),
            (false, _) => {
                tracing::warn!("step {}: non-finite loss {loss_sum}: step skipped", self.step);
                (true, f64::NAN)
            }
        };
        if skipped {
            self.bad_in_row += 1;
            self.skipped_total += 1;
        } else {
            self.bad_in_row = 0;
        }
        let record = StepRecord {
            step: self.step,
            loss: loss_sum / self.config.options.gradient_accumulation as f64,
            lr,
            grad_norm,
            skipped,
            seconds: started.elapsed().as_secs_f64(),
            stage,
            val_loss: None,
        };
        self.step += 1;
        Ok(StepOutcome::Trained(record))
    }

    /// Waits, polling for plugin reloads, until a rebuild of the failed strategy's plugin is
    /// taken up (true) or `stop` says to give up (false). The step that paused is then tried
    /// again by the next [`Trainer::step_or_pause`].
    pub fn wait_for_rebuild(&mut self, stop: &dyn Fn() -> bool) -> Result<bool> {
        loop {
            self.poll_reloads()?;
            if !self.strategy_failed() {
                tracing::info!("a new build of `{}` is taken up: the run resumes at step {}", self.strategy_name(), self.step);
                return Ok(true);
            }
            if stop() {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True while the active strategy is detached because it failed (until a reload).
    pub fn strategy_failed(&self) -> bool {
        let name = self.strategy_name();
        self.set.failed_strategies().iter().any(|s| s == name)
    }

    /// Why steps are being skipped, for the message that stops a run.
    pub fn skip_reason(&self) -> String {
        if self.strategy_failed() {
            format!("the strategy `{}` failed and is detached", self.strategy_name())
        } else {
            "non-finite loss or gradient".to_string()
        }
    }

    fn current_lr(&self, factor: f64) -> f64 {
        self.optimizer
            .groups()
            .first()
            .map(|g| g.config.lr * g.config.lr_scale * factor)
            .unwrap_or(0.0)
            // Prodigy's rates multiply its estimate d: log the step size it takes (as kohya's d*lr).
            * self.optimizer.prodigy_d().unwrap_or(1.0)
    }

    fn apply_lr_scales(&mut self, scales: &[LrScale]) -> Result<()> {
        for s in scales {
            let name = group_name(&s.strategy, &s.group);
            self.optimizer.set_lr_scale(&name, s.scale).at(|| format!("lr_scale directive for group `{}`", s.group))?;
            self.lr_scales.insert(name, s.scale);
        }
        Ok(())
    }

    /// Takes up a rebuilt strategy plugin between steps (`--watch`): its parameters with the same
    /// names and shapes are kept, the optimizer keeps their moments.
    pub fn poll_reloads(&mut self) -> Result<()> {
        let id = self.set.strategies()[self.strategy].instance.manifest().id.clone();
        for event in self.plugins.poll_reloads() {
            match &event {
                ReloadEvent::Reloaded { id: rid, .. } if *rid == id => {
                    let plugin = self.plugins.require(&id)?;
                    match self.set.reload(self.strategy, plugin) {
                        Ok(diff) => {
                            tracing::info!("{event}; parameters: {diff}");
                            if let Some(state) = self.paused_plugin_state.take() {
                                // The step that paused is tried again from the state before it.
                                let instance = &mut self.set.strategies_mut()[self.strategy].instance;
                                if let Err(e) = instance.load_state(&state) {
                                    tracing::warn!("the new build did not take the state from before step {}: {e}", self.step);
                                }
                            }
                            let state = self.optimizer.state_tensors()?;
                            let mut optimizer = build_optimizer(&self.set, self.strategy, &self.config)?;
                            optimizer.load_state_tensors(&state.into_iter().collect())?;
                            for (name, scale) in &self.lr_scales {
                                optimizer.set_lr_scale(name, *scale)?;
                            }
                            self.optimizer = optimizer;
                        }
                        Err(e) => tracing::error!("{event}, but switching to it failed: {e:#}; the previous build keeps running"),
                    }
                }
                ReloadEvent::Failed { .. } => tracing::error!("{event}"),
                _ => tracing::debug!("{event}"),
            }
        }
        Ok(())
    }

    /// Every parameter the run trains or owns, by checkpoint key.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self.set.store().params(None).into_iter().map(|(k, p)| (k.to_string(), p.var)).collect();
        for b in self.set.unfrozen() {
            out.extend(base_params(b));
        }
        out
    }

    /// How many base-model weights the run trains (unfrozen by its strategy).
    pub fn base_parameter_count(&self) -> u64 {
        self.set.unfrozen().iter().flat_map(base_params).map(|(_, v)| v.elem_count() as u64).sum()
    }
}

/// An unfrozen base weight's parameters under their checkpoint keys (`base:LAYER.weight`,
/// `base:LAYER.bias`: apart from every adapter key, which starts with a strategy name).
fn base_params(b: &UnfrozenBase) -> Vec<(String, Var)> {
    let mut params = vec![(format!("base:{}.weight", b.layer), b.weight.clone())];
    if let Some(bias) = &b.bias {
        params.push((format!("base:{}.bias", b.layer), bias.clone()));
    }
    params
}

/// The optimizer over the strategy's plan groups and its unfrozen base weights.
pub fn build_optimizer(set: &AdapterSet, s: StrategyId, config: &TrainConfig) -> Result<Optimizer> {
    let active = &set.strategies()[s];
    let name = active.name();
    let mut by_group: HashMap<String, Vec<(String, Var)>> = HashMap::new();
    for (key, p) in set.store().params(Some(name)) {
        by_group.entry(p.group.clone()).or_default().push((key.to_string(), p.var));
    }
    let mut groups = Vec::new();
    for g in active.plan.groups.iter() {
        let params = by_group.remove(g.name.as_str()).unwrap_or_default();
        let cfg = GroupConfig::new(group_name(name, &g.name), g.lr).weight_decay(g.weight_decay).clip_norm(g.clip_norm.into_option());
        groups.push((cfg, params));
    }
    if let Some((group, params)) = by_group.into_iter().next() {
        return Err(Error::Config(format!(
            "strategy `{name}` puts {} parameters (e.g. {}) in group `{group}`, which its plan does not declare",
            params.len(),
            params[0].0
        )));
    }
    for b in set.unfrozen().iter().filter(|b| b.strategy == name) {
        let cfg = GroupConfig::new(group_name(name, &format!("base:{}", b.layer)), b.lr).weight_decay(b.weight_decay);
        groups.push((cfg, base_params(b)));
    }
    let mut optimizer = Optimizer::with_spec(&config.optimizer_spec()?, groups)?;
    optimizer.max_grad_norm = (config.options.max_grad_norm > 0.0).then_some(config.options.max_grad_norm);
    Ok(optimizer)
}

pub(crate) fn open_dataset(config: &TrainConfig) -> Result<Dataset> {
    let d = &config.dataset;
    let ds_config = match (&d.dir, &d.config) {
        (_, Some(file)) => DatasetConfig::from_toml_file(file)?,
        (Some(dir), None) => {
            let mut spec = DatasetSpec::new(crate::buckets::Reso { width: d.resolution, height: d.resolution });
            spec.buckets.enable_bucket = d.enable_bucket;
            spec.buckets.min_bucket_reso = d.min_bucket_reso;
            spec.buckets.max_bucket_reso = d.max_bucket_reso;
            spec.buckets.bucket_reso_steps = d.bucket_reso_steps;
            spec.buckets.bucket_no_upscale = d.bucket_no_upscale;
            if let Some(b) = config.options.batch_size {
                spec.batch_size = b;
            }
            let mut subset = SubsetSpec::new(dir.clone());
            subset.shuffle_caption = d.shuffle_caption;
            subset.keep_tokens = d.keep_tokens;
            subset.flip_aug = d.flip_aug;
            subset.caption_dropout_rate = d.caption_dropout_rate;
            if let Some(ext) = &d.caption_extension {
                subset.caption_extension = Some(ext.clone());
            }
            DatasetConfig::from_folder(dir, &spec, &subset)?
        }
        (None, None) => return Err(Error::Config("[dataset] needs `dir` or `config`".to_string())),
    };
    Dataset::open(&ds_config, &OpenOptions { skip_bad: d.skip_bad, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, dataset_keys: &str) -> TrainConfig {
        let text = format!(
            "model = \"m\"\noutput_dir = \"o\"\nsteps = 1\n[dataset]\ndir = {:?}\nresolution = 128\nenable_bucket = true\n{dataset_keys}\n[strategy]\nplugin = \"lora\"\n",
            dir.to_str().unwrap()
        );
        toml::from_str(&text).unwrap()
    }

    /// kohya's bucket keys in `[dataset]` reach the bucketer; without them kohya's defaults
    /// (256..1024) cannot hold 128 px, and the error says which key to lower.
    #[test]
    fn dataset_bucket_keys_reach_the_buckets() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3u8 {
            let img = image::RgbImage::from_pixel(96, 96, image::Rgb([40 * i, 90, 200]));
            img.save(dir.path().join(format!("{i}.png"))).unwrap();
            std::fs::write(dir.path().join(format!("{i}.txt")), "a square").unwrap();
        }
        let keys = "min_bucket_reso = 64\nmax_bucket_reso = 256\nbucket_reso_steps = 32\nbucket_no_upscale = false";
        let ds = open_dataset(&config(dir.path(), keys)).unwrap();
        let b = &ds.specs()[0].buckets;
        assert_eq!((b.min_bucket_reso, b.max_bucket_reso, b.bucket_reso_steps, b.bucket_no_upscale), (64, 256, 32, false));
        for (reso, _) in ds.bucket_counts() {
            assert!(reso.width % 32 == 0 && (64..=256).contains(&reso.width) && (64..=256).contains(&reso.height), "{reso}");
        }
        let e = format!("{:#}", open_dataset(&config(dir.path(), "")).unwrap_err());
        assert!(e.contains("lower min_bucket_reso to 128 or less"), "{e}");
    }
}
