//! Learning-rate schedules, with the formulas of `diffusers.optimization.get_scheduler` (the same as
//! transformers'): a factor in [0, 1] that multiplies every group's base learning rate.
//!
//! `step` is the number of optimizer steps already taken, as in torch's `LambdaLR`: the first step
//! uses `factor(0)`, so with warmup the very first step has a learning rate of 0, exactly as in
//! diffusers and kohya.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

/// Which curve. The names are diffusers' (`--lr_scheduler`); any case, `-` for `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    #[default]
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
}

impl ScheduleKind {
    pub const NAMES: [&'static str; 5] = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "cosine_with_restarts" => Ok(Self::CosineWithRestarts),
            other => Err(format!("unknown learning-rate schedule '{other}': use one of {}", Self::NAMES.join(", "))),
        }
    }
}

impl serde::Serialize for ScheduleKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for ScheduleKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Cosine: waves over the run (diffusers' default 0.5 = one decay from 1 to 0; like diffusers,
    /// the curve is not clamped after `total_steps` and climbs again).
    /// Cosine with restarts: the number of hard restarts (diffusers' default 1).
    pub num_cycles: f64,
}

impl LrSchedule {
    /// A schedule with diffusers' default `num_cycles` for the kind.
    pub fn new(kind: ScheduleKind, warmup_steps: usize, total_steps: usize) -> Self {
        let num_cycles = match kind {
            ScheduleKind::CosineWithRestarts => 1.0,
            _ => 0.5,
        };
        Self { kind, warmup_steps, total_steps, num_cycles }
    }

    pub fn constant() -> Self {
        Self::new(ScheduleKind::Constant, 0, 0)
    }

    /// The multiplier of the base learning rate after `step` optimizer steps.
    pub fn factor(&self, step: usize) -> f64 {
        let step_f = step as f64;
        let warmup = self.warmup_steps as f64;
        let total = self.total_steps as f64;
        if self.kind == ScheduleKind::Constant {
            return 1.0;
        }
        if step < self.warmup_steps {
            return step_f / warmup.max(1.0);
        }
        // Progress through the decay part, 0 at the end of warmup and 1 at the last step.
        let progress = (step_f - warmup) / (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((total - step_f) / (total - warmup).max(1.0)).max(0.0),
            ScheduleKind::Cosine => (0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos())).max(0.0),
            ScheduleKind::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (PI * ((self.num_cycles * progress) % 1.0)).cos())).max(0.0)
                }
            }
        }
    }

    /// `base_lr * factor(step)`.
    pub fn lr(&self, base_lr: f64, step: usize) -> f64 {
        base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ScheduleKind::NAMES {
            let kind: ScheduleKind = name.parse().unwrap();
            assert_eq!(kind.name(), name);
        }
        let err = "cosine_annealing".parse::<ScheduleKind>().unwrap_err();
        assert!(err.contains("cosine_annealing") && err.contains("constant_with_warmup"), "{err}");
    }

    #[test]
    fn warmup_starts_at_zero_and_reaches_one() {
        let s = LrSchedule::new(ScheduleKind::ConstantWithWarmup, 4, 10);
        let got: Vec<f64> = (0..6).map(|i| s.factor(i)).collect();
        assert_eq!(got, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        assert_eq!(LrSchedule::constant().factor(123), 1.0);
    }

    #[test]
    fn decays_end_at_zero() {
        // Past the end: linear and restarts stay at 0; plain cosine climbs again, as in diffusers.
        assert_eq!(LrSchedule::new(ScheduleKind::Linear, 2, 10).factor(12), 0.0);
        assert_eq!(LrSchedule::new(ScheduleKind::CosineWithRestarts, 2, 10).factor(12), 0.0);
        assert!(LrSchedule::new(ScheduleKind::Cosine, 2, 10).factor(12) > 0.1);
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine, ScheduleKind::CosineWithRestarts] {
            let s = LrSchedule::new(kind, 2, 10);
            assert!((s.factor(2) - 1.0).abs() < 1e-12, "{kind}");
            assert!(s.factor(10).abs() < 1e-12, "{kind}");
        }
        // Cosine at half-way is 0.5.
        let s = LrSchedule::new(ScheduleKind::Cosine, 0, 10);
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        // Two restarts: back to 1 at the middle.
        let mut s = LrSchedule::new(ScheduleKind::CosineWithRestarts, 0, 10);
        s.num_cycles = 2.0;
        assert!((s.factor(5) - 1.0).abs() < 1e-12);
    }
}
