//! Several images denoised together: one UNet call per step for the whole batch.
//!
//! Each image keeps what makes it reproducible on its own: its noise comes from its own seed, and
//! it has its own scheduler and RNG stream (ancestral samplers draw per image), so an image is the
//! one `SdxlModel::generate` makes from the same parameters, up to the rounding of a batched
//! matmul. The images of a batch must share size, steps, guidance and scheduler.

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use graft_sdxl::rng::GraftRng;
use graft_sdxl::schedulers::build_scheduler;
use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel};

/// True when two parameter sets can share a batch.
pub fn batchable(a: &GenerateParams, b: &GenerateParams) -> bool {
    a.width == b.width && a.height == b.height && a.steps == b.steps && a.guidance == b.guidance && a.scheduler == b.scheduler
}

/// Generates every item of `items` in one batch; returns the images [3, h, w] in [0, 1], in order.
pub fn generate_batch(
    model: &SdxlModel,
    items: &[GenerateParams],
    hooks: PipelineHooks,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Vec<Tensor>> {
    let Some(first) = items.first() else { return Ok(Vec::new()) };
    if let Some(other) = items.iter().find(|p| !batchable(first, p)) {
        bail!(
            "a batch needs one size, step count, guidance and scheduler: `{}` and `{}` differ",
            first.prompt,
            other.prompt
        );
    }
    graft_sdxl::pipeline::check_size(first.width, first.height)?;
    let n = items.len();
    let shape = (1, model.config.unet.in_channels, first.height / 8, first.width / 8);
    let mut schedulers = Vec::with_capacity(n);
    let mut rngs = Vec::with_capacity(n);
    let mut latents = Vec::with_capacity(n);
    for p in items {
        let scheduler = build_scheduler(&p.scheduler, &model.config.scheduler, p.steps)?;
        let mut rng = GraftRng::new(p.seed);
        let noise = match &p.init_latents {
            Some(t) => {
                if t.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    bail!("init latents have shape {:?}, expected {:?} for a {}x{} image", t.dims(), shape, p.width, p.height);
                }
                t.to_dtype(DType::F32)?.to_device(&model.device)?
            }
            None => rng.randn(shape, &model.device)?,
        };
        latents.push((noise * scheduler.init_noise_sigma())?);
        schedulers.push(scheduler);
        rngs.push(rng);
    }

    let prompts: Vec<&str> = items.iter().map(|p| p.prompt.as_str()).collect();
    let cond = model.encode_prompts(&prompts, hooks).context("encoding the prompts")?;
    let guided = first.guidance > 1.0;
    let (context, pooled) = if guided {
        let mut hidden = Vec::with_capacity(n);
        let mut pooled = Vec::with_capacity(n);
        for (i, p) in items.iter().enumerate() {
            let like = graft_sdxl::pipeline::PromptEmbeds { hidden: cond.hidden.narrow(0, i, 1)?, pooled: cond.pooled.narrow(0, i, 1)? };
            let u = model.encode_negative(p.negative_prompt.as_deref(), &like, hooks).context("encoding the negative prompt")?;
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
    let time_ids = model.time_ids(first.width, first.height, batch)?;

    let timesteps = schedulers[0].timesteps().to_vec();
    for (step, &t) in timesteps.iter().enumerate() {
        let scaled: Vec<Tensor> =
            schedulers.iter().zip(&latents).map(|(s, l)| s.scale_model_input(l, step)).collect::<candle_core::Result<_>>()?;
        let input = Tensor::cat(&scaled, 0)?;
        let input = if guided { Tensor::cat(&[&input, &input], 0)? } else { input };
        let ts = Tensor::full(t as f32, batch, &model.device)?;
        let pred = model.unet.forward(&input, &ts, &context, &pooled, &time_ids, hooks.unet)?;
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
    let decoded = model.decode_latents(&Tensor::cat(&latents, 0)?)?;
    (0..n).map(|i| Ok(decoded.get(i)?)).collect()
}
