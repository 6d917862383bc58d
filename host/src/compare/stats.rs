//! Mean and spread of a number over the seeds of a comparison (`seeds = [..]`): a strategy's
//! loss is reported as mean ± sample standard deviation, so that a difference between two
//! strategies smaller than the spread reads as what it is, noise.

use serde::{Deserialize, Serialize};

use crate::compare::style::StyleScore;

/// The mean of some values and their sample standard deviation (n − 1 in the denominator).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    /// `None` with a single value (no spread to estimate).
    pub std: Option<f64>,
    /// How many values: the seeds whose run reached the number.
    pub n: usize,
}

/// Mean and sample standard deviation of the finite values (`None` when there is none).
pub fn mean_std(values: &[f64]) -> Option<MeanStd> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    // Two passes: the squares of the deviations, not of the values, so nothing cancels.
    let std = (n > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    Some(MeanStd { mean, std, n })
}

impl MeanStd {
    /// `0.1234 ± 0.0056` with `decimals` decimals, or just the value when there is one.
    pub fn format(&self, decimals: usize) -> String {
        match self.std {
            Some(s) => format!("{:.d$} ± {:.d$}", self.mean, s, d = decimals),
            None => format!("{:.d$}", self.mean, d = decimals),
        }
    }
}

/// The numbers of a strategy's table row over its seeds (only the runs that finished count).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedStats {
    pub final_loss: Option<MeanStd>,
    pub mean_loss: Option<MeanStd>,
    pub eval_loss_start: Option<MeanStd>,
    pub eval_loss_end: Option<MeanStd>,
    /// The last validation loss of each run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<MeanStd>,
    pub seconds_per_step: Option<MeanStd>,
    /// The style score of the base model's samples (one measurement: they are the same for
    /// every seed) and of the runs' samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_before: Option<StyleStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_after: Option<StyleStats>,
}

/// Mean ± std of each part of a style score over runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StyleStats {
    pub palette: Option<MeanStd>,
    pub edge_density: Option<MeanStd>,
    pub stroke_width: Option<MeanStd>,
    pub composition: Option<MeanStd>,
    pub total: Option<MeanStd>,
}

impl StyleStats {
    pub fn of(scores: &[StyleScore]) -> Self {
        let part = |f: fn(&StyleScore) -> f64| mean_std(&scores.iter().map(f).collect::<Vec<f64>>());
        StyleStats {
            palette: part(|s| s.palette),
            edge_density: part(|s| s.edge_density),
            stroke_width: part(|s| s.stroke_width),
            composition: part(|s| s.composition),
            total: part(|s| s.total),
        }
    }

    /// The means as a score (`None` when a part has no value).
    pub fn means(&self) -> Option<StyleScore> {
        Some(StyleScore {
            palette: self.palette?.mean,
            edge_density: self.edge_density?.mean,
            stroke_width: self.stroke_width?.mean,
            composition: self.composition?.mean,
            total: self.total?.mean,
        })
    }

    /// The parts in report order (total last), as [`StyleScore::parts`].
    pub fn parts(&self) -> [(&'static str, Option<MeanStd>); 5] {
        [
            ("palette", self.palette),
            ("edge_density", self.edge_density),
            ("stroke_width", self.stroke_width),
            ("composition", self.composition),
            ("total", self.total),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_standard_deviation() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, squared deviations sum to 32, 32 / 7 (n − 1).
        let m = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!((m.mean, m.n), (5.0, 8));
        assert!((m.std.unwrap() - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        // Two values a and b: the std is |a − b| / sqrt(2).
        let m = mean_std(&[1.0, 2.0]).unwrap();
        assert_eq!(m.mean, 1.5);
        assert!((m.std.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(m.format(3), "1.500 ± 0.707");
        // No cancellation around a large mean.
        let m = mean_std(&[1e9 + 1.0, 1e9 + 3.0]).unwrap();
        assert!((m.std.unwrap() - 2f64.sqrt()).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn one_value_has_no_spread_and_non_finite_values_do_not_count() {
        let m = mean_std(&[0.25]).unwrap();
        assert_eq!((m.mean, m.std, m.n), (0.25, None, 1));
        assert_eq!(m.format(4), "0.2500");
        let m = mean_std(&[f64::NAN, 3.0, f64::INFINITY, 5.0]).unwrap();
        assert_eq!((m.mean, m.n), (4.0, 2));
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[f64::NAN]), None);
    }
}
