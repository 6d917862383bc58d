//! attention-gate: a gated low-rank patch on attention modules.
//!
//! ```text
//! out = attn(h) + g * B(A h)        h [.., dim]: the attention's input hidden states
//! A [r, dim] ~ N(0, 0.02),  B [dim, r] = 0,  g [1] = gate_init (learned)
//! ```
//!
//! `dim` is the module's query dimension (`in_features` of the attention hook point). With B at
//! zero the patch starts as the identity whatever the gate's initial value; `gate_init = 1` lets
//! B's first updates reach the output at full strength (g = 0 would leave B without a gradient
//! until g moved).
//!
//! Optimizer groups: `adapter` (A, B, g) at 5e-4 with each parameter's gradient clipped to L2
//! norm 0.1 on its own (the host's optimizer does it from the group's `clip_norm`); and the rest
//! of each patched module, its base projections `to_q`, `to_k`, `to_v`, `to_out.0`, unfrozen
//! through the plan at 1e-5 (group `base`). Weight decay is 0 by default for both: decay would
//! pull pretrained weights towards zero, not towards their pretrained values.
//!
//! The patch is not linear in the input of any one linear, so there is no `delta_weight`. It
//! exports A, B and the gate under graft-native keys; the host writes the unfrozen base weights
//! as a LyCORIS `diff` file.

use graft_sdk::prelude::*;
use serde::Deserialize;

/// The configuration (JSON). Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Attention hook points to patch (globs, `re:` regexes, `!` excludes).
    targets: Vec<String>,
    rank: usize,
    /// Standard deviation of A's normal init.
    init_std: f64,
    /// The gate's initial value.
    gate_init: f64,
    /// False: g stays at `gate_init`.
    train_gate: bool,
    adapter_lr: f64,
    adapter_weight_decay: f64,
    /// Per-parameter gradient clip (L2 norm) of A, B and g; `null`: none.
    clip_norm: Option<f64>,
    /// Base projections of each patched module to train (names under the module); `[]` keeps
    /// the base frozen.
    unfreeze: Vec<String>,
    base_lr: f64,
    base_weight_decay: f64,
    /// Train the unfrozen projections' biases too (where they have one: `to_out.0`).
    base_bias: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            targets: vec!["unet.*.attn2".into()],
            rank: 8,
            init_std: 0.02,
            gate_init: 1.0,
            train_gate: true,
            adapter_lr: 5e-4,
            adapter_weight_decay: 0.0,
            clip_norm: Some(0.1),
            unfreeze: ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect(),
            base_lr: 1e-5,
            base_weight_decay: 0.0,
            base_bias: true,
        }
    }
}

impl Config {
    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::config(format!("attention-gate: {what}")));
        if self.targets.is_empty() {
            return bad("`targets` is empty: give at least one attention module pattern (default `unet.*.attn2`)".into());
        }
        if self.rank == 0 {
            return bad("`rank` must be at least 1".into());
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return bad(format!("`init_std` must be finite and >= 0, got {}", self.init_std));
        }
        if !self.gate_init.is_finite() {
            return bad(format!("`gate_init` must be finite, got {}", self.gate_init));
        }
        for (key, v) in [
            ("adapter_lr", self.adapter_lr),
            ("adapter_weight_decay", self.adapter_weight_decay),
            ("base_lr", self.base_lr),
            ("base_weight_decay", self.base_weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("`{key}` must be finite and >= 0, got {v}"));
            }
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("`clip_norm` must be > 0 (null for no clipping), got {c}"));
            }
        }
        Ok(())
    }
}

/// Every key of `Config`, for the host (`graft plugins check`, the serve UI's form).
fn schema() -> ConfigSchema {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ConfigSchema::new()
        .key(
            ConfigKey::strings("targets", &strings(&["unet.*.attn2"]))
                .help("attention hook point patterns (globs, `re:` regexes, `!` excludes)"),
        )
        .key(ConfigKey::int("rank", 8).range(1.0, 4096.0).help("r: the rank of the patch"))
        .key(ConfigKey::float("init_std", 0.02).min(0.0).help("standard deviation of A's normal init"))
        .key(ConfigKey::float("gate_init", 1.0).help("the gate g's initial value"))
        .key(ConfigKey::bool("train_gate", true).help("false keeps g at gate_init"))
        .key(ConfigKey::float("adapter_lr", 5e-4).min(0.0).help("learning rate of group `adapter` (A, B, g)"))
        .key(ConfigKey::float("adapter_weight_decay", 0.0).min(0.0).help("AdamW weight decay of group `adapter`"))
        .key(ConfigKey::float_or_null("clip_norm", Some(0.1)).above(0.0).help("per-parameter gradient clip of A, B and g (L2 norm); null: none"))
        .key(
            ConfigKey::strings("unfreeze", &strings(&["to_q", "to_k", "to_v", "to_out.0"]))
                .help("base projections of each patched module to train ([]: none)"),
        )
        .key(ConfigKey::float("base_lr", 1e-5).min(0.0).help("learning rate of the unfrozen projections (group `base`)"))
        .key(ConfigKey::float("base_weight_decay", 0.0).min(0.0).help("AdamW weight decay of group `base`"))
        .key(ConfigKey::bool("base_bias", true).help("train the unfrozen projections' biases too (where they have one)"))
}

struct AttentionGate {
    config: Config,
}

impl Strategy for AttentionGate {
    fn manifest() -> Manifest {
        Manifest::new("attention-gate", env!("CARGO_PKG_VERSION"))
            .description("Gated low-rank attention patch: out = attn(h) + g * B(A h), base projections of patched modules trained at a low lr")
            .capability("export:native")
            .capability("unfreeze")
            .config_example(
                r#"{"targets": ["unet.*.attn2"], "rank": 8, "init_std": 0.02, "gate_init": 1.0, "train_gate": true, "adapter_lr": 0.0005, "adapter_weight_decay": 0.0, "clip_norm": 0.1, "unfreeze": ["to_q", "to_k", "to_v", "to_out.0"], "base_lr": 0.00001, "base_weight_decay": 0.0, "base_bias": true}"#,
            )
    }

    fn config_schema() -> Option<ConfigSchema> {
        Some(schema())
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("attention-gate", config)?;
        config.check()?;
        Ok(Self { config })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let c = &self.config;
        let matcher = LayerMatcher::new(&c.targets)?;
        let modules: Vec<&LayerInfo> = layers.iter().filter(|l| l.is_attention() && matcher.matches(l.name())).collect();
        if modules.is_empty() {
            let example = layers.iter().find(|l| l.is_attention()).map(|l| l.name()).unwrap_or("(none)");
            return Err(Error::config(format!(
                "attention-gate: no attention hook point matches {:?} (attention modules look like `{example}`; `graft layers` lists them)",
                c.targets
            )));
        }

        let mut adapter = OptimizerGroup::new("adapter", c.adapter_lr).weight_decay(c.adapter_weight_decay);
        if let Some(clip) = c.clip_norm {
            adapter = adapter.clip_norm(clip);
        }
        let mut plan = Plan::new().group(adapter);
        if !c.unfreeze.is_empty() {
            plan = plan.group(OptimizerGroup::new("base", c.base_lr).weight_decay(c.base_weight_decay));
        }

        let r = c.rank;
        for m in modules {
            let dim = m.in_features as usize;
            let mut gate = ParamSpec::new("gate", &[1], Init::constant(c.gate_init)).group("adapter");
            if !c.train_gate {
                gate = gate.frozen();
            }
            plan = plan.attach(
                Attachment::new(m.name())
                    .param(ParamSpec::new("A", &[r, dim], Init::normal(0.0, c.init_std)).group("adapter"))
                    .param(ParamSpec::new("B", &[dim, r], Init::zeros()).group("adapter"))
                    .param(gate),
            );
            for proj in &c.unfreeze {
                let name = format!("{}.{proj}", m.name());
                if !layers.iter().any(|l| l.is_linear() && l.name() == name) {
                    return Err(Error::config(format!(
                        "attention-gate: `unfreeze` names `{proj}`, but `{name}` is not a linear hook point of this model"
                    )));
                }
                let mut base = BaseUnfreeze::new(name, c.base_lr);
                base.weight_decay = c.base_weight_decay;
                base.bias = c.base_bias;
                plan = plan.unfreeze(base);
            }
        }
        Ok(plan)
    }

    fn forward<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        let (h, out) = (inputs.hidden()?, inputs.out()?);
        let a = ops.get_param("A"); // [r, dim]
        let b = ops.get_param("B"); // [dim, r]
        let g = ops.get_param("gate"); // [1], broadcast over the output
        Ok(out + h.linear(a, None).linear(b, None) * g)
    }

    fn export<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        Ok(Some(Export::Native(vec![
            ("A".to_string(), ops.get_param("A")),
            ("B".to_string(), ops.get_param("B")),
            ("gate".to_string(), ops.get_param("gate")),
        ])))
    }
}

graft_sdk::export_strategy!(AttentionGate);

#[cfg(test)]
mod tests {
    /// Every key the parser accepts is in the schema, with a default it takes, and no other.
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::AttentionGate>();
    }

    /// The host's conformance checks (`graft plugins check`) on this plugin.
    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }

    use super::*;
    use graft_sdk::{AttentionKind, BlockKind, BlockPosition, LayerKind};

    fn layer(name: &str, kind: LayerKind, attention: AttentionKind, inf: u64, outf: u64) -> LayerInfo {
        LayerInfo {
            name: name.into(),
            kind,
            component: Component::UNET,
            in_features: inf,
            out_features: outf,
            block: BlockPosition { kind: BlockKind::MID, index: 0 },
            attention,
            extra: "".into(),
        }
    }

    /// One transformer block: attn1 and attn2 (query dim 8, context 6) with their projections.
    fn layers() -> Vec<LayerInfo> {
        let t = "unet.mid_block.attentions.0.transformer_blocks.0";
        let mut v = Vec::new();
        for (attn, kind, ctx) in [("attn1", AttentionKind::SELF_ATTENTION, 8), ("attn2", AttentionKind::CROSS_ATTENTION, 6)] {
            for (p, inf) in [("to_q", 8), ("to_k", ctx), ("to_v", ctx), ("to_out.0", 8)] {
                v.push(layer(&format!("{t}.{attn}.{p}"), LayerKind::LINEAR, kind, inf, 8));
            }
            v.push(layer(&format!("{t}.{attn}"), LayerKind::ATTENTION, kind, 8, 8));
        }
        v
    }

    fn plan(config: &str) -> Result<Plan> {
        AttentionGate::new(config)?.plan(&layers(), config)
    }

    #[test]
    fn default_plan() {
        let p = plan("").unwrap();
        assert_eq!(p.attachments.len(), 1);
        let a = &p.attachments[0];
        assert!(a.layer.ends_with("attn2"));
        let specs: Vec<(&str, &[usize], Init, bool)> =
            a.params.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), s.init, s.trainable)).collect();
        assert_eq!(
            specs,
            vec![
                ("A", &[8, 8][..], Init::normal(0.0, 0.02), true),
                ("B", &[8, 8][..], Init::zeros(), true),
                ("gate", &[1][..], Init::constant(1.0), true)
            ]
        );
        assert_eq!(p.groups[0], OptimizerGroup::new("adapter", 5e-4).clip_norm(0.1));
        assert_eq!(p.groups[1], OptimizerGroup::new("base", 1e-5));
        let unfrozen: Vec<&str> = p.unfreeze.iter().map(|u| u.layer.rsplit("attn2.").next().unwrap()).collect();
        assert_eq!(unfrozen, vec!["to_q", "to_k", "to_v", "to_out.0"]);
        assert!(p.unfreeze.iter().all(|u| u.lr == 1e-5 && u.bias && u.weight_decay == 0.0));
    }

    #[test]
    fn options() {
        let p = plan(r#"{"targets": ["unet.*.attn?"], "rank": 2, "gate_init": 0.5, "train_gate": false, "clip_norm": null, "unfreeze": []}"#)
            .unwrap();
        assert_eq!(p.attachments.len(), 2);
        assert_eq!(p.attachments[0].params[0].shape, vec![2, 8]);
        assert_eq!(p.attachments[0].params[2].init, Init::constant(0.5));
        assert!(!p.attachments[0].params[2].trainable);
        assert_eq!(p.groups, vec![OptimizerGroup::new("adapter", 5e-4)]);
        assert!(p.unfreeze.is_empty());
    }

    #[test]
    fn errors() {
        let e = |cfg: &str| plan(cfg).expect_err("an error").to_string();
        assert!(e(r#"{"gate": 1}"#).contains("unknown field `gate`"));
        assert!(e(r#"{"rank": 0}"#).contains("`rank` must be at least 1"));
        assert!(e(r#"{"clip_norm": 0}"#).contains("`clip_norm` must be > 0"));
        assert!(e(r#"{"targets": ["unet.*.to_q"]}"#).contains("no attention hook point matches"));
        assert!(e(r#"{"unfreeze": ["to_x"]}"#).contains("attn2.to_x` is not a linear hook point"));
    }
}
