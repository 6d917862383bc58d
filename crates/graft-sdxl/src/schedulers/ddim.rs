//! Deterministic DDIM (diffusers `DDIMScheduler` with eta 0).

use candle_core::{DType, Result, Tensor};

use super::schedule::{self, div};
use super::{check_step, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::rng::GraftRng;

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    /// The alpha product after the last step.
    final_alpha_cumprod: f32,
    /// diffusers' step back: `num_train_timesteps / steps` (also with trailing spacing).
    step_ratio: usize,
    prediction: PredictionType,
    clip_range: Option<f64>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.check_supported()?;
        let train = config.num_train_timesteps;
        if steps > train {
            candle_core::bail!("DDIM: {steps} steps is more than the {train} training timesteps")
        }
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(config)?);
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let timesteps: Vec<f64> =
            schedule::spaced_timesteps(spacing, train, steps, config.steps_offset).into_iter().map(f64::round_ties_even).collect();
        if let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
            candle_core::bail!("DDIM: timestep {t} is outside [0, {train}); check steps_offset")
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_range = config.clip_sample.unwrap_or(true).then_some(config.clip_sample_range);
        Ok(Self { timesteps, alphas_cumprod, final_alpha_cumprod, step_ratio: train / steps, prediction: config.prediction_type, clip_range })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _rng: &mut GraftRng) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        let t = self.timesteps[step] as usize;
        let alpha = self.alphas_cumprod[t];
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (div(&(&x - (&out * sqrt_beta as f64)?)?, sqrt_alpha)?, out),
            PredictionType::VPrediction => {
                let (a, b) = (sqrt_alpha as f64, sqrt_beta as f64);
                (((&x * a)? - (&out * b)?)?, ((&out * a)? + (&x * b)?)?)
            }
            PredictionType::Sample => {
                let eps = div(&(&x - (&out * sqrt_alpha as f64)?)?, sqrt_beta)?;
                (out, eps)
            }
        };
        let x0 = match self.clip_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let direction = (eps * (1.0 - alpha_prev).sqrt() as f64)?;
        let prev = ((x0 * alpha_prev.sqrt() as f64)? + direction)?;
        prev.to_dtype(model_output.dtype())
    }
}
