//! Ancestral Euler (diffusers `EulerAncestralDiscreteScheduler`): an Euler step down to
//! `sigma_down`, then fresh noise of size `sigma_up`.

use candle_core::{DType, Result, Tensor};

use super::euler::{predict_x0, SigmaSchedule};
use super::schedule::div;
use super::{check_step, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::GraftRng;

pub struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.check_supported()?;
        Ok(Self { schedule: SigmaSchedule::new(config, steps, false)?, prediction: config.prediction_type })
    }

    /// The sigmas, one per step and the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// One step with the given unit-normal `noise` (shaped as the sample).
    pub fn step_with_noise(&self, model_output: &Tensor, step: usize, sample: &Tensor, noise: &Tensor) -> Result<Tensor> {
        check_step(step, self.schedule.timesteps.len())?;
        let (from, to) = (self.schedule.sigmas[step], self.schedule.sigmas[step + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let x0 = predict_x0(self.prediction, &x, &out, from)?;
        let derivative = div(&(&x - x0)?, from)?;
        let prev = (x + (derivative * (sigma_down - from) as f64)?)?;
        let prev = (prev + (noise.to_dtype(DType::F32)? * sigma_up as f64)?)?;
        prev.to_dtype(model_output.dtype())
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step)
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut GraftRng) -> Result<Tensor> {
        check_step(step, self.schedule.timesteps.len())?;
        let noise = rng.randn(model_output.shape(), model_output.device())?;
        self.step_with_noise(model_output, step, sample, &noise)
    }
}
