//! Which optimizer a run uses and its `[optimizer_args]`, with kohya's names: `optimizer =
//! "AdamW" | "AdamW8bit" | "Lion" | "Prodigy" | "Adafactor"` (any case) and the reference
//! libraries' argument names. Each optimizer's file reads its own arguments; a key none of them
//! reads is an error naming the key and the optimizer.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

use super::{adafactor, adamw, adamw8bit, lion, prodigy, GroupConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    AdamW8bit,
    Lion,
    Prodigy,
    Adafactor,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 5] =
        [OptimizerKind::AdamW, OptimizerKind::AdamW8bit, OptimizerKind::Lion, OptimizerKind::Prodigy, OptimizerKind::Adafactor];

    /// kohya's spelling.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "AdamW",
            OptimizerKind::AdamW8bit => "AdamW8bit",
            OptimizerKind::Lion => "Lion",
            OptimizerKind::Prodigy => "Prodigy",
            OptimizerKind::Adafactor => "Adafactor",
        }
    }

    /// The `format` tag of its state file.
    pub fn state_format(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "graft-adamw/1",
            OptimizerKind::AdamW8bit => "graft-adamw8bit/1",
            OptimizerKind::Lion => "graft-lion/1",
            OptimizerKind::Prodigy => "graft-prodigy/1",
            OptimizerKind::Adafactor => "graft-adafactor/1",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        OptimizerKind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            let names: Vec<&str> = OptimizerKind::ALL.iter().map(|k| k.name()).collect();
            Error::Config(format!("`optimizer = \"{s}\"` is not known: use one of {}", names.join(", ")))
        })
    }
}

/// `[optimizer_args]` values that replace every group's own (the strategy's plan sets a weight
/// decay per group; betas and eps are the optimizer's defaults otherwise).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupOverrides {
    pub weight_decay: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
}

/// What an update rule needs beyond the group settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EngineArgs {
    #[default]
    AdamW,
    AdamW8bit(adamw8bit::AdamW8bitArgs),
    Lion,
    Prodigy(prodigy::ProdigyArgs),
    Adafactor(adafactor::AdafactorArgs),
}

/// The optimizer of a run and its arguments, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerSpec {
    pub kind: OptimizerKind,
    pub groups: GroupOverrides,
    pub engine: EngineArgs,
}

impl OptimizerSpec {
    /// Reads `optimizer` and its `[optimizer_args]` table.
    pub fn parse(name: &str, args: &toml::Table) -> Result<Self> {
        let kind: OptimizerKind = name.parse()?;
        let mut a = Args { optimizer: kind.name(), table: args, read: Vec::new() };
        let (groups, engine) = match kind {
            OptimizerKind::AdamW => (adamw::parse_args(&mut a)?, EngineArgs::AdamW),
            OptimizerKind::AdamW8bit => {
                let (g, e) = adamw8bit::parse_args(&mut a)?;
                (g, EngineArgs::AdamW8bit(e))
            }
            OptimizerKind::Lion => (lion::parse_args(&mut a)?, EngineArgs::Lion),
            OptimizerKind::Prodigy => {
                let (g, e) = prodigy::parse_args(&mut a)?;
                (g, EngineArgs::Prodigy(e))
            }
            OptimizerKind::Adafactor => {
                let (g, e) = adafactor::parse_args(&mut a)?;
                (g, EngineArgs::Adafactor(e))
            }
        };
        a.finish()?;
        Ok(Self { kind, groups, engine })
    }

    /// A group's settings under this optimizer: the overrides, else the optimizer's default
    /// betas where the group has Adam's (Lion's differ).
    pub fn apply(&self, mut cfg: GroupConfig) -> GroupConfig {
        if self.kind == OptimizerKind::Lion && cfg.betas == GroupConfig::new("", 0.0).betas {
            cfg.betas = lion::DEFAULT_BETAS;
        }
        if let Some(wd) = self.groups.weight_decay {
            cfg.weight_decay = wd;
        }
        if let Some(b) = self.groups.betas {
            cfg.betas = b;
        }
        if let Some(e) = self.groups.eps {
            cfg.eps = e;
        }
        cfg
    }
}

/// Reads typed values from `[optimizer_args]` and remembers which keys were read.
pub(crate) struct Args<'a> {
    optimizer: &'static str,
    table: &'a toml::Table,
    read: Vec<&'static str>,
}

impl Args<'_> {
    pub(crate) fn err(&self, key: &str, what: impl fmt::Display) -> Error {
        Error::Config(format!("[optimizer_args] `{key}` of {}: {what}", self.optimizer))
    }

    fn number(&self, key: &str, v: &toml::Value) -> Result<f64> {
        match v {
            toml::Value::Float(f) => Ok(*f),
            toml::Value::Integer(i) => Ok(*i as f64),
            other => Err(self.err(key, format!("must be a number, not `{other}`"))),
        }
    }

    pub(crate) fn float(&mut self, key: &'static str) -> Result<Option<f64>> {
        self.read.push(key);
        self.table.get(key).map(|v| self.number(key, v)).transpose()
    }

    /// A number that must satisfy `ok` (described by `rule`, e.g. "must be > 0").
    pub(crate) fn float_where(&mut self, key: &'static str, ok: impl Fn(f64) -> bool, rule: &str) -> Result<Option<f64>> {
        match self.float(key)? {
            Some(v) if !ok(v) => Err(self.err(key, format!("{v} {rule}"))),
            v => Ok(v),
        }
    }

    pub(crate) fn boolean(&mut self, key: &'static str) -> Result<Option<bool>> {
        self.read.push(key);
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(key, format!("must be true or false, not `{other}`"))),
        }
    }

    pub(crate) fn integer(&mut self, key: &'static str) -> Result<Option<i64>> {
        self.read.push(key);
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(*i)),
            Some(other) => Err(self.err(key, format!("must be an integer, not `{other}`"))),
        }
    }

    /// Two numbers, written `[a, b]`.
    pub(crate) fn pair(&mut self, key: &'static str) -> Result<Option<(f64, f64)>> {
        self.read.push(key);
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(a)) if a.len() == 2 => Ok(Some((self.number(key, &a[0])?, self.number(key, &a[1])?))),
            Some(other) => Err(self.err(key, format!("must be two numbers like [0.9, 0.999], not `{other}`"))),
        }
    }

    /// Betas, each in [0, 1).
    pub(crate) fn betas(&mut self, key: &'static str) -> Result<Option<(f64, f64)>> {
        match self.pair(key)? {
            Some((b1, b2)) if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) => {
                Err(self.err(key, format!("[{b1}, {b2}]: each must be in [0, 1)")))
            }
            v => Ok(v),
        }
    }

    pub(crate) fn weight_decay(&mut self) -> Result<Option<f64>> {
        self.float_where("weight_decay", |v| v.is_finite() && v >= 0.0, "must be a finite number >= 0")
    }

    /// A key this optimizer does not read is an error.
    fn finish(self) -> Result<()> {
        let mut unknown: Vec<&String> = self.table.keys().filter(|k| !self.read.contains(&k.as_str())).collect();
        unknown.sort();
        if let Some(k) = unknown.first() {
            let mut known = self.read.clone();
            known.sort();
            known.dedup();
            return Err(Error::Config(format!(
                "[optimizer_args] `{k}` is not an argument of {} (its arguments: {})",
                self.optimizer,
                known.join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn names_are_case_insensitive() {
        for (s, k) in [
            ("adamw", OptimizerKind::AdamW),
            ("ADAMW8BIT", OptimizerKind::AdamW8bit),
            ("lion", OptimizerKind::Lion),
            ("prodigy", OptimizerKind::Prodigy),
            ("AdaFactor", OptimizerKind::Adafactor),
        ] {
            assert_eq!(s.parse::<OptimizerKind>().unwrap(), k);
        }
        let err = "sgd".parse::<OptimizerKind>().unwrap_err().to_string();
        assert!(err.contains("sgd") && err.contains("Prodigy"), "{err}");
    }

    #[test]
    fn unknown_and_bad_args_name_the_key_and_the_optimizer() {
        let err = OptimizerSpec::parse("Lion", &table("d_coef = 2.0")).unwrap_err().to_string();
        assert!(err.contains("`d_coef`") && err.contains("Lion") && err.contains("betas"), "{err}");
        let err = OptimizerSpec::parse("AdamW", &table("betas = [0.9, 1.5]")).unwrap_err().to_string();
        assert!(err.contains("`betas`") && err.contains("AdamW"), "{err}");
        let err = OptimizerSpec::parse("Prodigy", &table("d_coef = -1")).unwrap_err().to_string();
        assert!(err.contains("`d_coef`") && err.contains("Prodigy"), "{err}");
        let err = OptimizerSpec::parse("Adafactor", &table("eps = 1e-3")).unwrap_err().to_string();
        assert!(err.contains("`eps`") && err.contains("[0.9, 0.999]"), "{err}");
        let err = OptimizerSpec::parse("Adafactor", &table("relative_step = false\nwarmup_init = true")).unwrap_err().to_string();
        assert!(err.contains("warmup_init") && err.contains("relative_step"), "{err}");
        let err = OptimizerSpec::parse("AdamW8bit", &table("min_8bit_size = -3")).unwrap_err().to_string();
        assert!(err.contains("min_8bit_size"), "{err}");
        let err = OptimizerSpec::parse("Prodigy", &table("decouple = 1")).unwrap_err().to_string();
        assert!(err.contains("true or false"), "{err}");
    }

    #[test]
    fn args_reach_the_groups() {
        let spec = OptimizerSpec::parse("lion", &table("weight_decay = 0.5")).unwrap();
        let g = spec.apply(GroupConfig::new("a", 1e-4).weight_decay(0.01));
        assert_eq!((g.weight_decay, g.betas), (0.5, (0.9, 0.99)));
        let spec = OptimizerSpec::parse("AdamW", &table("betas = [0.8, 0.9]\neps = 1e-6")).unwrap();
        let g = spec.apply(GroupConfig::new("a", 1e-4).weight_decay(0.01));
        assert_eq!((g.weight_decay, g.betas, g.eps), (0.01, (0.8, 0.9), 1e-6));
        let spec = OptimizerSpec::parse("prodigy", &table("d_coef = 2\nuse_bias_correction = true\nsafeguard_warmup = true\ndecouple = true\nd0 = 1e-5\ngrowth_rate = inf\nbetas = [0.9, 0.99]")).unwrap();
        let EngineArgs::Prodigy(p) = spec.engine else { panic!() };
        assert_eq!((p.d_coef, p.d0, p.use_bias_correction), (2.0, 1e-5, true));
    }
}
