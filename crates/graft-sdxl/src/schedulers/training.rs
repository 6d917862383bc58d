//! The forward (noising) process for training, as diffusers' `DDPMScheduler` (which the diffusers
//! and kohya training scripts use): `noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, the
//! v-prediction target and the signal-to-noise ratio, each with one timestep per sample.

use candle_core::{Result, Tensor};

use super::{schedule, SchedulerConfig};
use crate::rng::GraftRng;

/// The cumulative alpha products of a scheduler config.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self { alphas_cumprod: schedule::alphas_cumprod(&schedule::betas(config)?) })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `abar_t` for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// One uniform training timestep per sample, in `[0, num_train_timesteps)`.
    pub fn sample_timesteps(&self, batch: usize, rng: &mut GraftRng) -> Vec<usize> {
        (0..batch).map(|_| rng.below(self.alphas_cumprod.len() as u64) as usize).collect()
    }

    /// Per-sample coefficients `f(abar_t)` shaped `[b, 1, 1, ...]` to broadcast over `like`.
    fn coefficients(&self, like: &Tensor, timesteps: &[usize], f: impl Fn(f32) -> f32) -> Result<Tensor> {
        let batch = like.dim(0)?;
        if timesteps.len() != batch {
            candle_core::bail!("{} timesteps given for a batch of {batch}", timesteps.len())
        }
        let values = timesteps
            .iter()
            .map(|&t| match self.alphas_cumprod.get(t) {
                Some(&a) => Ok(f(a)),
                None => {
                    candle_core::bail!("timestep {t} is outside [0, {})", self.alphas_cumprod.len())
                }
            })
            .collect::<Result<Vec<f32>>>()?;
        let mut shape = vec![1usize; like.rank()];
        shape[0] = batch;
        Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
    }

    /// `sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`, `timesteps[b]` for sample `b`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let signal = self.coefficients(x0, timesteps, |a| a.sqrt())?;
        let noise_scale = self.coefficients(x0, timesteps, |a| (1.0 - a).sqrt())?;
        x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?
    }

    /// The v-prediction target `sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let signal = self.coefficients(x0, timesteps, |a| a.sqrt())?;
        let noise_scale = self.coefficients(x0, timesteps, |a| (1.0 - a).sqrt())?;
        noise.broadcast_mul(&signal)? - x0.broadcast_mul(&noise_scale)?
    }

    /// `abar_t / (1 - abar_t)` per timestep (for min-SNR weighting and the like).
    pub fn snr(&self, timesteps: &[usize]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| match self.alphas_cumprod.get(t) {
                Some(&a) => {
                    let (alpha, sigma) = (a.sqrt(), (1.0 - a).sqrt());
                    Ok(((alpha / sigma) * (alpha / sigma)) as f64)
                }
                None => {
                    candle_core::bail!("timestep {t} is outside [0, {})", self.alphas_cumprod.len())
                }
            })
            .collect()
    }

    /// [`NoiseSchedule::snr`] as an f32 tensor `[b]` on `device`.
    pub fn snr_tensor(&self, timesteps: &[usize], device: &candle_core::Device) -> Result<Tensor> {
        let snr: Vec<f32> = self.snr(timesteps)?.into_iter().map(|s| s as f32).collect();
        Tensor::from_vec(snr, timesteps.len(), device)
    }
}
