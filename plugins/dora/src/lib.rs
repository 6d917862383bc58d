//! dora: DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024), with PEFT's math.
//!
//! ```text
//! W' = m ⊙ (W + s·up·down) / n        n = ||W + s·up·down|| per output row (no gradient, as PEFT)
//! y  = x W'ᵀ + b = (m / n) ⊙ (x Wᵀ + s·up(down(x))) + b          s = alpha / r
//! ```
//!
//! - `magnitude` [out] starts as the row norms of the base weight (`Init::from_layer`, computed
//!   in `init_param`), `up` at zero, so the adapter starts as the identity.
//! - The forward takes the layer's bias out of `base_out` instead of recomputing `x Wᵀ`.
//! - A zero row norm cannot divide: `n` is clamped to at least 1e-12.
//! - `export` writes the LoRA factors with the magnitude ([`Export::Dora`]): a LyCORIS file with
//!   `dora_scale` that A1111, ComfyUI and `graft generate` apply.

use graft_sdk::prelude::*;
use serde::Deserialize;

const UNET_TARGETS: [&str; 4] = ["unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0"];

/// The configuration (JSON). Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Layer name patterns (globs, `re:` regexes, `!` excludes); linear hook points only.
    targets: Vec<String>,
    rank: usize,
    /// 0 means alpha = rank.
    alpha: f64,
    lr: f64,
    weight_decay: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { targets: UNET_TARGETS.iter().map(|s| s.to_string()).collect(), rank: 8, alpha: 8.0, lr: 1e-4, weight_decay: 0.0 }
    }
}

impl Config {
    fn scale(&self) -> f64 {
        if self.alpha == 0.0 {
            1.0
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Every key of `Config`, for the host (`graft plugins check`, the serve UI's form).
fn schema() -> ConfigSchema {
    ConfigSchema::new()
        .key(
            ConfigKey::strings("targets", &UNET_TARGETS)
                .help("layer name patterns (globs, `re:` regexes, `!` excludes); linear hook points only"),
        )
        .key(ConfigKey::int("rank", 8).range(1.0, 4096.0).help("r: the rank of up · down"))
        .key(ConfigKey::float("alpha", 8.0).min(0.0).help("s = alpha / r; 0 means alpha = r"))
        .key(ConfigKey::float("lr", 1e-4).min(0.0).help("learning rate of down, up and magnitude"))
        .key(ConfigKey::float("weight_decay", 0.0).help("AdamW weight decay"))
}

struct Dora {
    config: Config,
}

impl Dora {
    /// `W + s·up·down` [out, in] and its row norms `n` [out] (detached, never 0).
    fn merged<'o>(&self, ops: Ops<'o>) -> (Tensor<'o>, Tensor<'o>) {
        let dw = ops.get_param("up").matmul(ops.get_param("down")) * self.config.scale();
        let merged = ops.base_weight() + dw;
        let norm = merged.norm(&[-1]).detach().clamp(1e-12, f64::INFINITY);
        (merged, norm)
    }
}

impl Strategy for Dora {
    fn manifest() -> Manifest {
        Manifest::new("dora", env!("CARGO_PKG_VERSION"))
            .description("DoRA (PEFT math): W' = m * (W + alpha/r * up down) / ||W + alpha/r * up down|| per output row")
            .capability("delta_weight")
            .capability("export:lora+dora")
            .config_example(r#"{"targets": ["unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0"], "rank": 8, "alpha": 8, "lr": 0.0001, "weight_decay": 0.0}"#)
    }

    fn config_schema() -> Option<ConfigSchema> {
        Some(schema())
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("dora", config)?;
        if config.rank == 0 {
            bail!("dora: `rank` must be at least 1");
        }
        if !(config.alpha.is_finite() && config.alpha >= 0.0 && config.lr.is_finite() && config.lr >= 0.0) {
            bail!("dora: `alpha` and `lr` must be finite and >= 0");
        }
        Ok(Self { config })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let c = &self.config;
        let matcher = LayerMatcher::new(&c.targets)?;
        let mut plan = Plan::new().group(OptimizerGroup::new("dora", c.lr).weight_decay(c.weight_decay));
        for layer in layers.iter().filter(|l| l.is_linear() && matcher.matches(l.name())) {
            let (inf, outf) = (layer.in_features as usize, layer.out_features as usize);
            plan = plan.attach(
                Attachment::new(layer.name())
                    .param(ParamSpec::new("down", &[c.rank, inf], Init::kaiming_uniform(5f64.sqrt())).group("dora"))
                    .param(ParamSpec::new("up", &[outf, c.rank], Init::zeros()).group("dora"))
                    .param(ParamSpec::new("magnitude", &[outf], Init::from_layer()).group("dora")),
            );
        }
        if plan.attachments.is_empty() {
            bail!("dora: the targets {:?} match no linear hook point (`graft layers` lists them)", c.targets);
        }
        Ok(plan)
    }

    fn init_param<'o>(&self, ops: Ops<'o>, layer: &LayerInfo, name: &str) -> Result<Tensor<'o>> {
        match name {
            "magnitude" => Ok(ops.base_weight().norm(&[-1])),
            other => bail!("dora: no parameter `{other}` starts from layer `{}`", layer.name()),
        }
    }

    fn forward<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        let (x, base_out) = (inputs.input()?, inputs.base_out()?);
        let (_, norm) = self.merged(ops);
        let gain = ops.get_param("magnitude") / norm; // [out]
        let lora = x.linear(ops.get_param("down"), None).linear(ops.get_param("up"), None) * self.config.scale();
        Ok(match ops.base_bias() {
            Some(b) => (base_out - b + lora) * gain + b,
            None => (base_out + lora) * gain,
        })
    }

    fn delta_weight<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        let (merged, norm) = self.merged(ops);
        let gain = (ops.get_param("magnitude") / norm).reshape_infer(&[-1, 1]);
        Ok(Some(merged * gain - ops.base_weight()))
    }

    fn export<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        let c = &self.config;
        let alpha = if c.alpha == 0.0 { c.rank as f64 } else { c.alpha };
        let magnitude = ops.get_param("magnitude").reshape_infer(&[-1, 1]);
        Ok(Some(Export::Dora { down: ops.get_param("down"), up: ops.get_param("up"), alpha, magnitude }))
    }
}

graft_sdk::export_strategy!(Dora);

#[cfg(test)]
mod tests {
    /// Every key the parser accepts is in the schema, with a default it takes, and no other.
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::Dora>();
    }

    /// The host's conformance checks (`graft plugins check`) on this plugin.
    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }
}
