//! Sampling schedulers, matching diffusers 0.42: Euler (SDXL's default), Euler ancestral, DDIM
//! (eta 0) and DPM-Solver++ 2M (optionally with Karras sigmas), configured by a diffusers
//! `scheduler_config.json`. [`training`] has the forward-noising helpers for training.
//!
//! A scheduler is built for a number of steps; the sampling loop then calls, for each step index
//! `i`: `scale_model_input(x, i)`, the model at `timesteps()[i]`, and `step(out, i, x, rng)`.
//! Steps must be taken in order (DPM-Solver keeps the previous model output).

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod schedule;
pub mod training;

use std::path::Path;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::GraftRng;

pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestral;

/// How the betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (SD / SDXL).
    ScaledLinear,
    /// The cosine schedule of improved DDPM (`squaredcos_cap_v2`).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// `v = sqrt(abar) * noise - sqrt(1 - abar) * x0`.
    VPrediction,
    /// The clean sample x0.
    Sample,
}

impl std::str::FromStr for PredictionType {
    type Err = candle_core::Error;

    /// `epsilon`, `v_prediction` (or `v`), `sample`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "epsilon" | "eps" => Ok(Self::Epsilon),
            "v_prediction" | "v" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            _ => candle_core::bail!("unknown prediction type {s:?}: expected epsilon, v_prediction or sample"),
        }
    }
}

/// How inference timesteps are picked from the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = candle_core::Error;

    /// `linspace`, `leading`, `trailing`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            _ => candle_core::bail!("unknown timestep spacing {s:?}: expected linspace, leading or trailing"),
        }
    }
}

/// The last sigma of Euler and DPM-Solver (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// A diffusers scheduler config (`scheduler/scheduler_config.json`). Fields absent from the file
/// take diffusers' defaults; options that differ between scheduler classes (`timestep_spacing`,
/// `set_alpha_to_one`, `clip_sample`) stay `None` and each scheduler applies its class default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub use_karras_sigmas: bool,
    /// Karras range overrides (diffusers' `sigma_min` / `sigma_max`).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: FinalSigmas,
    pub rescale_betas_zero_snr: bool,
    /// DDIM: the alpha product after the last step is 1 (else that of timestep 0). Default true.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clamp the predicted x0 to `±clip_sample_range`. Default true.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// Read to refuse what is not implemented, with a clear message.
    pub interpolation_type: String,
    pub timestep_type: String,
    pub thresholding: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    /// DPM-Solver options, read when the scheduler is chosen by its class name (`dpmpp_2m` and
    /// `dpmpp_2m_karras` fix them to dpmsolver++, order 2, midpoint).
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
}

/// The file's fields, each optional (JSON `null` = absent).
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<BetaSchedule>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<PredictionType>,
    timestep_spacing: Option<TimestepSpacing>,
    steps_offset: Option<usize>,
    use_karras_sigmas: Option<bool>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigmas_type: Option<FinalSigmas>,
    rescale_betas_zero_snr: Option<bool>,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    interpolation_type: Option<String>,
    timestep_type: Option<String>,
    thresholding: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    algorithm_type: Option<String>,
    solver_order: Option<usize>,
    solver_type: Option<String>,
    lower_order_final: Option<bool>,
    euler_at_final: Option<bool>,
    use_lu_lambdas: Option<bool>,
    use_flow_sigmas: Option<bool>,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (DDPM's betas: linear 0.0001..0.02).
    fn default() -> Self {
        Self::from_raw(RawConfig::default())
    }
}

impl SchedulerConfig {
    fn from_raw(r: RawConfig) -> Self {
        Self {
            num_train_timesteps: r.num_train_timesteps.unwrap_or(1000),
            beta_start: r.beta_start.unwrap_or(0.0001),
            beta_end: r.beta_end.unwrap_or(0.02),
            beta_schedule: r.beta_schedule.unwrap_or(BetaSchedule::Linear),
            trained_betas: r.trained_betas,
            prediction_type: r.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: r.timestep_spacing,
            steps_offset: r.steps_offset.unwrap_or(0),
            use_karras_sigmas: r.use_karras_sigmas.unwrap_or(false),
            sigma_min: r.sigma_min,
            sigma_max: r.sigma_max,
            final_sigmas_type: r.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            rescale_betas_zero_snr: r.rescale_betas_zero_snr.unwrap_or(false),
            set_alpha_to_one: r.set_alpha_to_one,
            clip_sample: r.clip_sample,
            clip_sample_range: r.clip_sample_range.unwrap_or(1.0),
            interpolation_type: r.interpolation_type.unwrap_or_else(|| "linear".into()),
            timestep_type: r.timestep_type.unwrap_or_else(|| "discrete".into()),
            thresholding: r.thresholding.unwrap_or(false),
            use_exponential_sigmas: r.use_exponential_sigmas.unwrap_or(false),
            use_beta_sigmas: r.use_beta_sigmas.unwrap_or(false),
            algorithm_type: r.algorithm_type,
            solver_order: r.solver_order,
            solver_type: r.solver_type,
            lower_order_final: r.lower_order_final.unwrap_or(true),
            euler_at_final: r.euler_at_final.unwrap_or(false),
            use_lu_lambdas: r.use_lu_lambdas.unwrap_or(false),
            use_flow_sigmas: r.use_flow_sigmas.unwrap_or(false),
        }
    }

    /// Parses a diffusers scheduler config from JSON text; unknown keys are ignored, and so are
    /// the non-JSON numbers Python writes (`-Infinity`, as in `lambda_min_clipped`).
    pub fn from_json(text: &str) -> std::result::Result<Self, crate::ConfigError> {
        let raw: RawConfig = serde_json::from_str(&python_json(text)).map_err(|e| crate::ConfigError::new("scheduler config", e.to_string()))?;
        Ok(Self::from_raw(raw))
    }

    /// Reads `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> std::result::Result<Self, crate::ConfigError> {
        let path = path.as_ref();
        let file = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| crate::ConfigError::new(file(), format!("cannot read: {e}")))?;
        let raw: RawConfig = serde_json::from_str(&python_json(&text))
            .map_err(|e| crate::ConfigError::new(file(), format!("not a valid scheduler config: {e}")))?;
        Ok(Self::from_raw(raw))
    }

    /// SDXL base 1.0's scheduler config: EulerDiscrete, epsilon, scaled_linear 0.00085..0.012,
    /// 1000 steps, "leading" spacing, steps_offset 1.
    pub fn sdxl_base() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Self::default()
        }
    }

    /// Refuses the options no scheduler here implements.
    fn check_supported(&self) -> Result<()> {
        let unsupported = if self.thresholding {
            Some("thresholding = true")
        } else if self.use_exponential_sigmas {
            Some("use_exponential_sigmas = true")
        } else if self.use_beta_sigmas {
            Some("use_beta_sigmas = true")
        } else if self.interpolation_type != "linear" {
            Some("interpolation_type other than \"linear\"")
        } else if self.timestep_type != "discrete" {
            Some("timestep_type other than \"discrete\"")
        } else {
            None
        };
        match unsupported {
            Some(what) => candle_core::bail!("scheduler config: {what} is not supported; remove it from the config"),
            None => Ok(()),
        }
    }
}

/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` as bare words: turn them into
/// `null` (outside strings) so that serde reads the file.
fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"].iter().find(|w| rest.starts_with(**w)) {
            out.push_str("null");
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A sampling scheduler built for a fixed number of steps.
pub trait Scheduler: Send {
    /// The model timesteps, one per step.
    fn timesteps(&self) -> &[f64];
    /// What unit-normal starting noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// The model input for step `step` (Euler divides by `sqrt(sigma^2 + 1)`).
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor>;
    /// The sample after step `step`, from the model output at that step.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut GraftRng) -> Result<Tensor>;
}

/// The scheduler names [`build_scheduler`] accepts (besides diffusers class names and the
/// A1111 spellings "Euler a", "DPM++ 2M", "DPM++ 2M Karras").
pub const SCHEDULER_NAMES: &[&str] = &["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"];

/// Builds a scheduler by name for `num_inference_steps` steps. `euler`, `euler_a`, `ddim` and the
/// class names follow `config` (Karras sigmas if it says so); `dpmpp_2m` and `dpmpp_2m_karras`
/// turn Karras sigmas off / on.
pub fn build_scheduler(name: &str, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
    let key = name.trim().to_lowercase().replace([' ', '-'], "_").replace("++", "pp");
    config.check_supported()?;
    if num_inference_steps == 0 {
        candle_core::bail!("scheduler {name}: the number of steps must be at least 1")
    }
    if num_inference_steps > config.num_train_timesteps {
        candle_core::bail!("scheduler {name}: {num_inference_steps} steps is more than the {} training timesteps", config.num_train_timesteps)
    }
    // A1111's DPM++ 2M: dpmsolver++, second order, midpoint, whatever the config's class was.
    let dpmpp_2m = |karras: bool| SchedulerConfig {
        use_karras_sigmas: karras,
        algorithm_type: None,
        solver_order: None,
        solver_type: None,
        ..config.clone()
    };
    let scheduler: Box<dyn Scheduler> = match key.as_str() {
        "euler" | "euler_discrete" | "eulerdiscretescheduler" => Box::new(EulerDiscrete::new(config, num_inference_steps)?),
        "euler_a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => Box::new(EulerAncestral::new(config, num_inference_steps)?),
        "ddim" | "ddimscheduler" => Box::new(Ddim::new(config, num_inference_steps)?),
        "dpmpp_2m" => Box::new(DpmSolverMultistep::new(&dpmpp_2m(false), num_inference_steps)?),
        "dpmpp_2m_karras" => Box::new(DpmSolverMultistep::new(&dpmpp_2m(true), num_inference_steps)?),
        "dpmsolvermultistepscheduler" => Box::new(DpmSolverMultistep::new(config, num_inference_steps)?),
        _ => candle_core::bail!(
            "unknown scheduler {name:?}: expected one of {} (or the diffusers class names EulerDiscreteScheduler, \
             EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler)",
            SCHEDULER_NAMES.join(", ")
        ),
    };
    Ok(scheduler)
}

/// `step` must be below the number of steps.
fn check_step(step: usize, steps: usize) -> Result<()> {
    if step >= steps {
        candle_core::bail!("scheduler step {step} is out of range: this scheduler was built for {steps} steps")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sdxl_config_file_values() {
        let text = r#"{"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false}"#;
        assert_eq!(SchedulerConfig::from_json(text).unwrap(), SchedulerConfig::sdxl_base());
    }

    #[test]
    fn unknown_name_lists_valid_names() {
        let err = build_scheduler("heun", &SchedulerConfig::sdxl_base(), 10).err().unwrap().to_string();
        assert!(err.contains("heun") && err.contains("dpmpp_2m_karras"), "{err}");
        for name in ["Euler a", "DPM++ 2M Karras", "DDIM", "euler", "EulerDiscreteScheduler"] {
            assert!(build_scheduler(name, &SchedulerConfig::sdxl_base(), 10).is_ok(), "{name}");
        }
    }

    #[test]
    fn reads_python_infinity() {
        let config = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity, "x": "NaN-Infinity", "steps_offset": 1}"#).unwrap();
        assert_eq!(config.steps_offset, 1);
    }

    #[test]
    fn bad_enum_value_is_named() {
        let err = SchedulerConfig::from_json(r#"{"prediction_type": "flow"}"#).unwrap_err().to_string();
        assert!(err.contains("flow"), "{err}");
    }
}
