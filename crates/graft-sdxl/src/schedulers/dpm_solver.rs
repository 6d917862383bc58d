//! DPM-Solver++ 2M (diffusers `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`), with optional Karras
//! sigmas. The first step and the last are first order; the others use the previous step's x0.

use candle_core::{DType, Result, Tensor};

use super::schedule::{self, div, interp};
use super::{check_step, BetaSchedule, FinalSigmas, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::rng::GraftRng;

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One per step and the final one.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    final_sigmas_type: FinalSigmas,
    lower_order_final: bool,
    euler_at_final: bool,
    /// The x0 prediction of the previous step.
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
    next_step: usize,
}

/// Refuses the DPM-Solver variants not implemented here (diffusers maps DEIS / UniPC names to
/// dpmsolver++ midpoint, and so does this).
fn check_dpm_options(config: &SchedulerConfig) -> Result<()> {
    if let Some(a) = config.algorithm_type.as_deref().filter(|a| !matches!(*a, "dpmsolver++" | "deis")) {
        candle_core::bail!("DPM-Solver: algorithm_type {a:?} is not supported (graft implements dpmsolver++)")
    }
    if let Some(order) = config.solver_order.filter(|&o| o != 2) {
        candle_core::bail!("DPM-Solver: solver_order {order} is not supported (graft implements order 2)")
    }
    if let Some(t) = config.solver_type.as_deref().filter(|t| !matches!(*t, "midpoint" | "logrho" | "bh1" | "bh2")) {
        candle_core::bail!("DPM-Solver: solver_type {t:?} is not supported (graft implements midpoint)")
    }
    if config.use_lu_lambdas || config.use_flow_sigmas {
        candle_core::bail!("DPM-Solver: use_lu_lambdas and use_flow_sigmas are not supported")
    }
    Ok(())
}

/// `alpha_t = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma * alpha_t` (the VP coefficients).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The half log-SNR `ln(alpha_t) - ln(sigma_t)` (infinite at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.check_supported()?;
        check_dpm_options(config)?;
        let train = config.num_train_timesteps;
        let mut alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(config)?);
        if config.rescale_betas_zero_snr {
            *alphas_cumprod.last_mut().expect("at least two timesteps") = 2f32.powi(-24);
        }
        let train_sigmas = schedule::sigmas(&alphas_cumprod);
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps = schedule::dpm_timesteps(spacing, train, steps, config.steps_offset);
        let sigmas: Vec<f64> = if config.use_karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(train_sigmas[train - 1] as f64);
            let sigmas = schedule::karras(sigma_min, sigma_max, steps);
            let log_sigmas = schedule::log_sigmas(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    // diffusers rounds, except for the cosine schedule (then the int cast truncates).
                    if config.beta_schedule == BetaSchedule::SquaredCosCapV2 {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect()
        };
        let last = match config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => train_sigmas[0],
        };
        let sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type,
            final_sigmas_type: config.final_sigmas_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            previous_x0: None,
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// The sigmas, one per step and the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The model output as an x0 prediction (f32 tensors).
    fn x0(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            PredictionType::Epsilon => div(&(sample - (model_output * sigma_t as f64)?)?, alpha_t),
            PredictionType::VPrediction => (sample * alpha_t as f64)? - (model_output * sigma_t as f64)?,
            PredictionType::Sample => Ok(model_output.clone()),
        }
    }
}

impl Scheduler for DpmSolverMultistep {
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
        let n = self.timesteps.len();
        check_step(step, n)?;
        if step != self.next_step {
            candle_core::bail!("DPM-Solver++: step {step} taken out of order (expected step {})", self.next_step)
        }
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let x0 = self.x0(&out, &x, self.sigmas[step])?;
        let previous = self.previous_x0.replace(x0.clone());

        let lower_order_final =
            step == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigmas_type == FinalSigmas::Zero);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let decay = alpha_t * ((-h).exp() - 1.0);
        let prev = match previous {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                // Second order: D1 = (m0 - m1) / r0 with r0 = h_0 / h.
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let d1 = ((&x0 - m1)? * (1.0 / r0) as f64)?;
                (((&x * (sigma_t / sigma_s0) as f64)? - (&x0 * decay as f64)?)? - (d1 * (0.5 * decay) as f64)?)?
            }
            _ => ((&x * (sigma_t / sigma_s0) as f64)? - (&x0 * decay as f64)?)?,
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        self.next_step += 1;
        prev.to_dtype(model_output.dtype())
    }
}
