//! example-scale: a learned scale on each input feature of the target linears, in the style of
//! (IA)³:
//!
//! ```text
//! y = W ((1 + s) ⊙ x) + b = base_out + W (s ⊙ x)        s: [in], starts at zero
//! ```
//!
//! It is linear in the input, so it has a `delta_weight` (`W ⊙ s` broadcast over rows) and can be
//! fused into the base weight. It is the worked example of docs/PLUGINS.md, not one of the three
//! shipped strategies.

use graft_sdk::prelude::*;
use serde::Deserialize;

/// The configuration (JSON), with the defaults used when a key is missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Layer name patterns (globs, `re:` regexes, `!` excludes).
    targets: Vec<String>,
    /// Learning rate of the scales.
    lr: f64,
    /// Initial value of every scale (0: the adapter starts as the identity).
    init: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { targets: vec!["unet.*.attn2.to_k".into(), "unet.*.attn2.to_v".into()], lr: 1e-3, init: 0.0 }
    }
}

struct ExampleScale {
    config: Config,
    /// Steps seen, kept across hot reloads through save_state / load_state.
    steps_seen: u64,
}

impl Strategy for ExampleScale {
    fn manifest() -> Manifest {
        Manifest::new("example-scale", env!("CARGO_PKG_VERSION"))
            .description("Learned per-input-feature scale of the target linears ((IA)3-style)")
            .capability("delta_weight")
            .config_example(r#"{"targets": ["unet.*.attn2.to_k", "unet.*.attn2.to_v"], "lr": 0.001, "init": 0.0}"#)
    }

    /// Every key of `Config`, for the host: `graft plugins check` shows it, the serve UI draws a
    /// form from it, and the host checks a configuration against it before calling `new`.
    fn config_schema() -> Option<ConfigSchema> {
        Some(
            ConfigSchema::new()
                .key(
                    ConfigKey::strings("targets", &["unet.*.attn2.to_k", "unet.*.attn2.to_v"])
                        .help("layer name patterns (globs, `re:` regexes, `!` excludes)"),
                )
                .key(ConfigKey::float("lr", 1e-3).min(0.0).help("learning rate of the scales"))
                .key(ConfigKey::float("init", 0.0).help("initial value of every scale (0: the adapter starts as the identity)")),
        )
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("example-scale", config)?;
        if config.targets.is_empty() {
            bail!("example-scale: `targets` is empty: give at least one layer pattern");
        }
        Ok(Self { config, steps_seen: 0 })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let matcher = LayerMatcher::new(&self.config.targets)?;
        let mut plan = Plan::new().group(OptimizerGroup::new("scale", self.config.lr));
        for layer in matcher.filter(layers).into_iter().filter(|l| l.is_linear()) {
            let scale = ParamSpec::new("scale", &[layer.in_features as usize], Init::constant(self.config.init)).group("scale");
            plan = plan.attach(Attachment::new(layer.name()).param(scale));
        }
        if plan.attachments.is_empty() {
            bail!("example-scale: no linear layer matches {:?}", self.config.targets);
        }
        Ok(plan)
    }

    fn forward<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        let x = inputs.input()?;
        let s = ops.get_param("scale");
        // W (s ⊙ x): the base weight applied to the scaled part of the input.
        let extra = (x * s).linear(ops.base_weight(), None);
        Ok(inputs.base_out()? + extra)
    }

    fn delta_weight<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        // W (s ⊙ x) = (W ⊙ s) x, with s broadcast along the rows of W [out, in].
        Ok(Some(ops.base_weight() * ops.get_param("scale")))
    }

    fn on_step(&mut self, step: u64) -> Result<Vec<Directive>> {
        self.steps_seen = step;
        Ok(Vec::new())
    }

    fn save_state(&self) -> Result<String> {
        Ok(format!(r#"{{"steps_seen": {}}}"#, self.steps_seen))
    }

    fn load_state(&mut self, state: &str) -> Result<()> {
        #[derive(Deserialize)]
        struct State {
            steps_seen: u64,
        }
        let state: State = config::parse("example-scale state", state)?;
        self.steps_seen = state.steps_seen;
        Ok(())
    }
}

graft_sdk::export_strategy!(ExampleScale);

#[cfg(test)]
mod tests {
    /// Every key the parser accepts is in the schema, with a default it takes, and no other.
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::ExampleScale>();
    }

    /// The host's conformance checks (`graft plugins check`) on this plugin.
    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }
}
