//! Euler's method on the probability-flow ODE in sigma space (diffusers `EulerDiscreteScheduler`),
//! SDXL's default sampler.

use candle_core::{DType, Result, Tensor};

use super::schedule::{self, div, interp};
use super::{check_step, FinalSigmas, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::rng::GraftRng;

/// Timesteps, sigmas (one more than steps, the last the final sigma) and the initial noise sigma
/// of Euler-type samplers.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// `euler_options`: whether `use_karras_sigmas` and `final_sigmas_type` apply (Euler ancestral
    /// has neither option).
    pub fn new(config: &SchedulerConfig, steps: usize, euler_options: bool) -> Result<Self> {
        let mut alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(config)?);
        if config.rescale_betas_zero_snr {
            // Keeps the last sigma finite.
            *alphas_cumprod.last_mut().expect("at least two timesteps") = 2f32.powi(-24);
        }
        let train_sigmas = schedule::sigmas(&alphas_cumprod);
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<f32> =
            schedule::spaced_timesteps(spacing, config.num_train_timesteps, steps, config.steps_offset).into_iter().map(|t| t as f32).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t as f64, &train_sigmas)).collect();
        if euler_options && config.use_karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = schedule::karras(sigma_min, sigma_max, steps);
            let log_sigmas = schedule::log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32).collect();
        }
        let last = match config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin if euler_options => train_sigmas[0],
            FinalSigmas::SigmaMin => 0.0,
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self { timesteps: timesteps.iter().map(|&t| t as f64).collect(), sigmas, init_noise_sigma: init_noise_sigma as f64 })
    }

    /// `sample / sqrt(sigma^2 + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        check_step(step, self.timesteps.len())?;
        let sigma = self.sigmas[step];
        div(sample, (sigma * sigma + 1.0).sqrt())
    }
}

/// The denoised sample x0 predicted at noise level `sigma` (f32 tensors).
pub(super) fn predict_x0(prediction: PredictionType, sample: &Tensor, model_output: &Tensor, sigma: f32) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => sample - (model_output * sigma as f64)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (model_output * c_out as f64)? + div(sample, sigma * sigma + 1.0)?
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// diffusers' `EulerDiscreteScheduler` (no churn).
pub struct EulerDiscrete {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerDiscrete {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.check_supported()?;
        Ok(Self { schedule: SigmaSchedule::new(config, steps, true)?, prediction: config.prediction_type })
    }

    /// The sigmas, one per step and the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step)
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _rng: &mut GraftRng) -> Result<Tensor> {
        check_step(step, self.schedule.timesteps.len())?;
        let (sigma, next) = (self.schedule.sigmas[step], self.schedule.sigmas[step + 1]);
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let x0 = predict_x0(self.prediction, &x, &out, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = (x + (derivative * (next - sigma) as f64)?)?;
        prev.to_dtype(model_output.dtype())
    }
}
