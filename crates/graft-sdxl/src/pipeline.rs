//! Text to image, as diffusers' `StableDiffusionXLPipeline` does it: both text encoders
//! (penultimate hidden states concatenated, TE2's projected pooled output), zeroed unconditional
//! embeddings for an empty negative prompt, time ids from the size, classifier-free guidance, the
//! scheduler loop, and the VAE decode.

use candle_core::{DType, Device, Result, Tensor};

use crate::hooks::{Hooks, NoHooks};
use crate::model::SdxlModel;
use crate::rng::GraftRng;
use crate::schedulers::build_scheduler;

/// The hooks of each hooked component for one forward.
#[derive(Clone, Copy)]
pub struct PipelineHooks<'a> {
    pub unet: &'a dyn Hooks,
    pub text_encoder: &'a dyn Hooks,
    pub text_encoder_2: &'a dyn Hooks,
}

impl PipelineHooks<'static> {
    pub fn none() -> Self {
        Self { unet: &NoHooks, text_encoder: &NoHooks, text_encoder_2: &NoHooks }
    }
}

/// What one image is made from.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// `None` or empty: zeroed unconditional embeddings where the model's
    /// `force_zeros_for_empty_prompt` says so (SDXL's default), else the empty prompt encoded.
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: String,
    pub seed: u64,
    /// Unit-normal noise [1, 4, h/8, w/8]; multiplied by the scheduler's init sigma, like
    /// diffusers' `latents=` argument. Drawn from the seed when `None`.
    pub init_latents: Option<Tensor>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            width: 1024,
            height: 1024,
            steps: 30,
            guidance: 5.0,
            scheduler: "euler".into(),
            seed: 0,
            init_latents: None,
        }
    }
}

/// Prompt embeddings: [b, 77, te1 + te2 hidden] and pooled [b, te2 projection].
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub hidden: Tensor,
    pub pooled: Tensor,
}

/// The result of a generation.
pub struct Generated {
    /// [1, 3, h, w] in [0, 1].
    pub image: Tensor,
    /// The final latents, unscaled by the VAE factor: [1, 4, h/8, w/8].
    pub latents: Tensor,
}

/// True when two parameter sets can share a batch ([`SdxlModel::generate_batch`]).
pub fn batchable(a: &GenerateParams, b: &GenerateParams) -> bool {
    a.width == b.width && a.height == b.height && a.steps == b.steps && a.guidance == b.guidance && a.scheduler == b.scheduler
}

/// The largest image side (pixels) graft accepts.
pub const MAX_SIDE: usize = 16384;

/// Checks a size before any work; the error says what to do.
pub fn check_size(width: usize, height: usize) -> Result<()> {
    for (what, v) in [("width", width), ("height", height)] {
        // First, so a size typed wrong (or read from a bad file) allocates nothing.
        if v > MAX_SIDE {
            candle_core::bail!("{what} {v} is larger than the {MAX_SIDE} pixels graft accepts")
        }
        if v == 0 || v % 8 != 0 {
            let lo = (v / 8).max(1) * 8;
            candle_core::bail!("{what} {v} is not a positive multiple of 8: SDXL works on 8x8-pixel latents; use {lo} or {}", lo + 8)
        }
    }
    Ok(())
}

impl SdxlModel {
    /// Encodes prompts with both text encoders.
    pub fn encode_prompts(&self, prompts: &[&str], hooks: PipelineHooks) -> Result<PromptEmbeds> {
        // Weights released for training come back for samples.
        self.restore_text_encoders()?;
        let ids = |tok: &crate::tokenizer::ClipTokenizer| -> Result<Tensor> {
            let rows: Vec<u32> = prompts.iter().flat_map(|p| tok.encode_padded(p, 77)).collect();
            Tensor::from_vec(rows, (prompts.len(), 77), &self.device)
        };
        let out1 = self.text_encoder.forward(&ids(&self.tokenizer)?, hooks.text_encoder)?;
        let out2 = self.text_encoder_2.forward(&ids(&self.tokenizer_2)?, hooks.text_encoder_2)?;
        let penultimate = |o: &crate::clip::ClipOutput| o.hidden_states[o.hidden_states.len() - 2].clone();
        let hidden = Tensor::cat(&[penultimate(&out1), penultimate(&out2)], 2)?;
        let pooled = match out2.text_embeds {
            Some(t) => t,
            None => candle_core::bail!("text_encoder_2 has no text projection: not an SDXL text encoder"),
        };
        Ok(PromptEmbeds { hidden, pooled })
    }

    /// The unconditional embeddings: zeros for an empty negative prompt (unless the model's
    /// `force_zeros_for_empty_prompt` is false), else its encoding.
    pub fn encode_negative(&self, negative: Option<&str>, like: &PromptEmbeds, hooks: PipelineHooks) -> Result<PromptEmbeds> {
        match negative.unwrap_or("") {
            "" if self.config.force_zeros_for_empty_prompt => {
                Ok(PromptEmbeds { hidden: like.hidden.zeros_like()?, pooled: like.pooled.zeros_like()? })
            }
            n => self.encode_prompts(&[n], hooks),
        }
    }

    /// SDXL's six time ids: original size, crop top-left, target size (all from the image size).
    pub fn time_ids(&self, width: usize, height: usize, batch: usize) -> Result<Tensor> {
        let (h, w) = (height as f32, width as f32);
        Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?.unsqueeze(0)?.repeat((batch, 1))
    }

    /// Text to image: a batch of one ([`SdxlModel::generate_batch`]).
    pub fn generate(&self, params: &GenerateParams, hooks: PipelineHooks, on_step: &mut dyn FnMut(usize, usize)) -> Result<Generated> {
        let mut out = self.generate_batch(std::slice::from_ref(params), hooks, on_step)?;
        Ok(out.remove(0))
    }

    /// Several images denoised together: one UNet call per step for the whole batch (the one
    /// denoising loop of graft). Each image keeps what makes it reproducible on its own: its
    /// noise comes from its own seed, and it has its own scheduler and RNG stream (ancestral
    /// samplers draw per image), so an image is the one a batch of one makes, up to the rounding
    /// of a batched matmul. The images must share size, steps, guidance and scheduler
    /// ([`batchable`]).
    pub fn generate_batch(
        &self,
        items: &[GenerateParams],
        hooks: PipelineHooks,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Generated>> {
        self.generate_batch_then(items, hooks, on_step, false)
    }

    /// [`SdxlModel::generate_batch`] as the model's last use in this process (the `graft
    /// generate` command's last batch): the text encoders' weights are freed once the prompts
    /// are encoded (when no adapter is in them; they are read back if asked for again), and the
    /// UNet's weights before the VAE decodes, so the peak memory is that of the larger phase,
    /// not of the whole model plus the decode. The model cannot denoise again afterwards.
    pub fn generate_last_batch(
        &self,
        items: &[GenerateParams],
        hooks: PipelineHooks,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Generated>> {
        self.generate_batch_then(items, hooks, on_step, true)
    }

    fn generate_batch_then(
        &self,
        items: &[GenerateParams],
        hooks: PipelineHooks,
        on_step: &mut dyn FnMut(usize, usize),
        last_use: bool,
    ) -> Result<Vec<Generated>> {
        let Some(first) = items.first() else { return Ok(Vec::new()) };
        if self.unet.registry().released() {
            candle_core::bail!("this model's UNet weights were freed by its last generate (generate_last_batch): load the model again");
        }
        if let Some(other) = items.iter().find(|p| !batchable(first, p)) {
            candle_core::bail!("a batch needs one size, step count, guidance and scheduler: `{}` and `{}` differ", first.prompt, other.prompt);
        }
        check_size(first.width, first.height)?;
        let n = items.len();
        let shape = (1, self.config.unet.in_channels, first.height / 8, first.width / 8);
        let mut schedulers = Vec::with_capacity(n);
        let mut rngs = Vec::with_capacity(n);
        let mut latents = Vec::with_capacity(n);
        for p in items {
            let scheduler = build_scheduler(&p.scheduler, &self.config.scheduler, p.steps)?;
            let mut rng = GraftRng::new(p.seed);
            let noise = match &p.init_latents {
                Some(t) => {
                    if t.dims() != [shape.0, shape.1, shape.2, shape.3] {
                        candle_core::bail!("init latents have shape {:?}, expected {:?} for a {}x{} image", t.dims(), shape, p.width, p.height);
                    }
                    t.to_dtype(DType::F32)?.to_device(&self.device)?
                }
                None => rng.randn(shape, &self.device)?,
            };
            latents.push((noise * scheduler.init_noise_sigma())?);
            schedulers.push(scheduler);
            rngs.push(rng);
        }

        let prompts: Vec<&str> = items.iter().map(|p| p.prompt.as_str()).collect();
        let cond = self.encode_prompts(&prompts, hooks)?;
        let guided = first.guidance > 1.0;
        // Unconditional rows first, then the conditional ones (diffusers' order).
        let (context, pooled) = if guided {
            let mut hidden = Vec::with_capacity(2 * n);
            let mut pooled = Vec::with_capacity(2 * n);
            for (i, p) in items.iter().enumerate() {
                let like = PromptEmbeds { hidden: cond.hidden.narrow(0, i, 1)?, pooled: cond.pooled.narrow(0, i, 1)? };
                let u = self.encode_negative(p.negative_prompt.as_deref(), &like, hooks)?;
                hidden.push(u.hidden);
                pooled.push(u.pooled);
            }
            hidden.push(cond.hidden.clone());
            pooled.push(cond.pooled.clone());
            (Tensor::cat(&hidden, 0)?, Tensor::cat(&pooled, 0)?)
        } else {
            (cond.hidden.clone(), cond.pooled.clone())
        };
        let batch = if guided { 2 * n } else { n };
        let time_ids = self.time_ids(first.width, first.height, batch)?;
        if last_use && self.text_encoder_files.is_some() && self.text_encoders_unhooked(hooks) {
            let freed = self.release_text_encoders()?;
            tracing::debug!("text encoders freed after encoding ({:.2} GB)", freed as f64 / 1e9);
        }

        let timesteps = schedulers[0].timesteps().to_vec();
        for (step, &t) in timesteps.iter().enumerate() {
            let scaled: Vec<Tensor> = schedulers.iter().zip(&latents).map(|(s, l)| s.scale_model_input(l, step)).collect::<Result<_>>()?;
            let input = Tensor::cat(&scaled, 0)?;
            let input = if guided { Tensor::cat(&[&input, &input], 0)? } else { input };
            let ts = Tensor::full(t as f32, batch, &self.device)?;
            let pred = self.unet.forward(&input, &ts, &context, &pooled, &time_ids, hooks.unet)?;
            for i in 0..n {
                let p = if guided {
                    let (u, c) = (pred.narrow(0, i, 1)?, pred.narrow(0, n + i, 1)?);
                    (&u + ((c - &u)? * first.guidance)?)?
                } else {
                    pred.narrow(0, i, 1)?
                };
                latents[i] = schedulers[i].step(&p, step, &latents[i], &mut rngs[i])?;
            }
            on_step(step + 1, timesteps.len());
        }
        if last_use {
            let freed = self.release_unet();
            tracing::debug!("UNet weights freed before the decode ({:.2} GB)", freed as f64 / 1e9);
        }
        let decoded = self.decode_latents(&Tensor::cat(&latents, 0)?)?;
        latents.into_iter().enumerate().map(|(i, latents)| Ok(Generated { image: decoded.narrow(0, i, 1)?, latents })).collect()
    }

    /// True when no adapter hooks a text encoder layer and none of their base weights is
    /// overridden: their weights can then be freed and read back from the files unchanged.
    fn text_encoders_unhooked(&self, hooks: PipelineHooks) -> bool {
        [(&self.text_encoder, hooks.text_encoder), (&self.text_encoder_2, hooks.text_encoder_2)]
            .into_iter()
            .all(|(te, h)| te.registry().overridden().is_empty() && (0..te.registry().len()).all(|i| !h.attached(i)))
    }

    /// Latents (unscaled) -> image [b, 3, h, w] in [0, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let decoded = self.vae()?.decode(&(latents / self.config.vae.scaling_factor)?)?;
        ((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)
    }
}

/// An image tensor [3, h, w] in [0, 1] as 8-bit RGB rows.
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (_, h, w) = image.dims3()?;
    let pixels = (image.permute((1, 2, 0))? * 255.0)?.round()?.clamp(0f32, 255f32)?.to_dtype(DType::U8)?;
    let data = pixels.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
    Ok((w, h, data))
}
