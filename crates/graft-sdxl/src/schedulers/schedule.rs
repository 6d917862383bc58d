//! The numbers every scheduler starts from: betas, cumulative alpha products, sigmas and inference
//! timesteps. diffusers computes some of these in f32 (torch) and some in f64 (numpy); the same
//! precision is kept here at each point so that schedules agree to the last bit or nearly.

use candle_core::{Result, Tensor};

use super::{BetaSchedule, SchedulerConfig, TimestepSpacing};

/// `t / d` as a true division by an f32 scalar, as torch divides by a 0-d tensor (a multiply by
/// the reciprocal rounds differently, which shows where samples nearly cancel).
pub(crate) fn div(t: &Tensor, d: f32) -> Result<Tensor> {
    t.broadcast_div(&Tensor::new(d, t.device())?.to_dtype(t.dtype())?)
}

/// The training betas (f32, as torch holds them).
pub(crate) fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    if n < 2 {
        candle_core::bail!("scheduler config: num_train_timesteps must be at least 2, got {n}")
    }
    let betas = if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            candle_core::bail!("scheduler config: trained_betas has {} values, num_train_timesteps is {n}", trained.len())
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
            }
            BetaSchedule::SquaredCosCapV2 => cosine_betas(n),
        }
    };
    Ok(if config.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas })
}

/// Cumulative products of `1 - beta` (f32 values, accumulated in f64 as torch's `cumprod` does).
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    cumprod(&betas.iter().map(|&b| 1.0 - b).collect::<Vec<f32>>())
}

fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `sqrt((1 - abar) / abar)` for each training timestep, in f32.
pub(crate) fn sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `ln` of the sigmas, in f32 (numpy's float32 log).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// torch.linspace in f32: the step in f32, each value `start + step * i` rounded once (from the
/// end for the second half).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(
            |i| {
                if i < halfway {
                    (start as f64 + step as f64 * i as f64) as f32
                } else {
                    (end as f64 - step as f64 * (n - 1 - i) as f64) as f32
                }
            },
        )
        .collect()
}

/// numpy.linspace in f64 (`start + i * step`, the last value exactly `stop`).
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// numpy.arange(start, stop, step) in f64: length `ceil((stop - start) / step)`, values
/// `start + i * delta` with `delta = (start + step) - start`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// The cosine schedule's betas (improved DDPM), computed in f64 and held in f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to a zero terminal SNR (Lin et al. 2023), in f32 as diffusers does.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = alphas_cumprod(betas);
    let mut sqrt_bar: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// Linear interpolation of `fp` (given at 0, 1, 2, ...) at `x`, as numpy.interp.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al.'s sigmas, rho 7, from `sigma_max` down to `sigma_min` (f64, as numpy).
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// The (fractional) training timestep of a sigma, by interpolating log sigmas as diffusers'
/// `_sigma_to_t` (the bracket's width in f32, the rest in f64).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Timesteps for `n` steps by `spacing` over `[0, train)`, as Euler and DDIM pick them (f64 before
/// any cast; leading and trailing give whole numbers).
pub(crate) fn spaced_timesteps(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            np_arange(train as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
        }
    }
}

/// DPM-Solver's timesteps (whole numbers): `n + 1` points with the last (0) dropped for linspace
/// and leading.
pub(crate) fn dpm_timesteps(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = np_linspace(0.0, (train - 1) as f64, n + 1).into_iter().map(f64::round_ties_even).collect();
            t.reverse();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = train / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => spaced_timesteps(TimestepSpacing::Trailing, train, n, steps_offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_schedule_endpoints() {
        let config = SchedulerConfig::sdxl_base();
        let ac = alphas_cumprod(&betas(&config).unwrap());
        let s = sigmas(&ac);
        assert!((s[999] - 14.614647).abs() < 1e-5, "{}", s[999]);
        assert!((s[0] - 0.029167533).abs() < 1e-7, "{}", s[0]);
    }

    #[test]
    fn spacings() {
        assert_eq!(spaced_timesteps(TimestepSpacing::Leading, 1000, 4, 1), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 1), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(dpm_timesteps(TimestepSpacing::Leading, 1000, 4, 1), vec![801.0, 601.0, 401.0, 201.0]);
        assert_eq!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 7, 0).len(), 7);
    }
}
