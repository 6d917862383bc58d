//! full: full fine-tuning. Every linear and conv hook point that `targets` matches has its base
//! weight (and bias) unfrozen: the host trains an f32 master copy of it, as kohya's
//! `sdxl_train.py` does. Nothing is attached, so the forward is the model's own.
//!
//! The export is the host's for unfrozen base weights: a LyCORIS full-diff file (trained minus
//! loaded), and with `export_checkpoint = true` in the train config the base model with the
//! trained weights merged in (a diffusers folder).

use graft_sdk::prelude::*;
use serde::Deserialize;

/// The configuration (JSON), with the defaults used when a key is missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Hook point patterns (globs, `re:` regexes, `!` excludes); linears and convs among the
    /// matches are trained.
    targets: Vec<String>,
    /// Learning rate of every trained weight.
    lr: f64,
    /// AdamW weight decay.
    weight_decay: f64,
    /// Train the biases too.
    bias: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self { targets: vec!["unet.*".into()], lr: 1e-5, weight_decay: 0.0, bias: true }
    }
}

fn schema() -> ConfigSchema {
    ConfigSchema::new()
        .key(
            ConfigKey::strings("targets", &["unet.*".to_string()])
                .help("hook point patterns (globs, `re:` regexes, `!` excludes): the linears and convs among them are trained"),
        )
        .key(ConfigKey::float("lr", 1e-5).min(0.0).help("learning rate of the trained weights (group `base`)"))
        .key(ConfigKey::float("weight_decay", 0.0).min(0.0).help("AdamW weight decay"))
        .key(ConfigKey::bool("bias", true).help("train the biases too"))
}

struct Full {
    config: Config,
}

impl Strategy for Full {
    fn manifest() -> Manifest {
        Manifest::new("full", env!("CARGO_PKG_VERSION"))
            .description("Full fine-tuning: every linear and conv base weight of the targets trained")
            .capability("unfreeze")
            .config_example(r#"{"targets": ["unet.*"], "lr": 0.00001, "weight_decay": 0.0, "bias": true}"#)
    }

    fn config_schema() -> Option<ConfigSchema> {
        Some(schema())
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("full", config)?;
        if !(config.lr.is_finite() && config.lr >= 0.0) {
            return Err(Error::config(format!("full: `lr` must be finite and >= 0, got {}", config.lr)));
        }
        Ok(Self { config })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let c = &self.config;
        let matcher = LayerMatcher::new(&c.targets)?;
        let weights: Vec<&LayerInfo> = layers.iter().filter(|l| (l.is_linear() || l.is_conv()) && matcher.matches(l.name())).collect();
        if weights.is_empty() {
            return Err(Error::config(format!("full: no linear or conv hook point matches {:?} (`graft layers` lists them)", c.targets)));
        }
        let mut plan = Plan::new().group(OptimizerGroup::new("base", c.lr).weight_decay(c.weight_decay));
        for l in weights {
            let mut base = BaseUnfreeze::new(l.name(), c.lr);
            base.weight_decay = c.weight_decay;
            base.bias = c.bias;
            plan = plan.unfreeze(base);
        }
        Ok(plan)
    }

    /// Never called: nothing is attached.
    fn forward<'o>(&self, _ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        inputs.out()
    }
}

graft_sdk::export_strategy!(Full);

#[cfg(test)]
mod tests {
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::Full>();
    }

    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }
}
