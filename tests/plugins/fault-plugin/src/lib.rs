//! Test fixture: a strategy that fails on purpose, in the entry point its config names.
//!
//! Config: `{"fault": "panic" | "error" | "shape" | "handle" | "stale" | "none", "entry": "..."}`
//! where `entry` is one of `new`, `plan`, `forward`, `delta_weight`, `on_step`, `export`,
//! `save_state`, `load_state`. Without a fault it is a working "add a learned bias" strategy on
//! every linear layer it is given.
//!
//! Numerical faults (forward only): `{"fault": "nan" | "inf", "after": k, "until": m}` makes the
//! output NaN (or +inf) at the training steps `k <= step < m` (`until` absent: from `k` on), and
//! is the working strategy otherwise. `after` also delays a `panic` or `error` in `forward` to
//! step `k`. `"lr": x` makes it trainable (it declares its optimizer group).

use std::sync::atomic::{AtomicU64, Ordering};

use graft_sdk::prelude::*;
use graft_sdk::TensorId;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    fault: String,
    #[serde(default = "forward")]
    entry: String,
    /// First training step of a `nan` / `inf` fault, or of a fault in `forward`.
    #[serde(default)]
    after: u64,
    /// First training step after a `nan` / `inf` fault (none: it persists).
    #[serde(default)]
    until: Option<u64>,
    /// Declare the `default` optimizer group with this learning rate (none: the plan declares no
    /// group, which training refuses).
    #[serde(default)]
    lr: Option<f64>,
}

fn forward() -> String {
    "forward".to_string()
}

struct Faulty {
    config: Config,
    /// A handle kept from an earlier call, for the `stale` fault.
    kept: AtomicU64,
}

impl Faulty {
    /// Fails the way the config says when `entry` is the configured one.
    fn trip(&self, entry: &str) -> Result<()> {
        if self.config.entry != entry {
            return Ok(());
        }
        match self.config.fault.as_str() {
            "panic" => panic!("deliberate panic in {entry}"),
            "error" => Err(Error::msg(format!("deliberate error in {entry}"))),
            _ => Ok(()),
        }
    }
}

impl Strategy for Faulty {
    fn manifest() -> Manifest {
        Manifest::new("fault-plugin", env!("CARGO_PKG_VERSION"))
            .description("Fails on purpose (test fixture)")
            .config_example(r#"{"fault": "none"}"#)
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("fault-plugin", config)?;
        let this = Self { config, kept: AtomicU64::new(0) };
        this.trip("new")?;
        Ok(this)
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        self.trip("plan")?;
        let mut plan = Plan::new();
        if let Some(lr) = self.config.lr {
            plan = plan.group(OptimizerGroup::new("default", lr));
        }
        for l in layers.iter().filter(|l| l.is_linear()) {
            plan = plan.attach(Attachment::new(l.name()).param(ParamSpec::new("bias", &[l.out_features as usize], Init::constant(0.5))));
        }
        Ok(plan)
    }

    fn forward<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        // `after` delays a forward fault to a later training step (default: from the start).
        if ops.step() >= self.config.after {
            self.trip("forward")?;
        }
        let base = inputs.base_out()?;
        let out = base + ops.get_param("bias");
        let step = ops.step();
        let in_window = ops.training() && step >= self.config.after && self.config.until.is_none_or(|u| step < u);
        match self.config.fault.as_str() {
            "nan" if in_window => return Ok(out.affine(1.0, f64::NAN)),
            "inf" if in_window => return Ok(out.affine(1.0, f64::INFINITY)),
            _ => {}
        }
        if self.config.entry == "forward" {
            match self.config.fault.as_str() {
                // One feature short of the hook point's output.
                "shape" => {
                    let n = base.dim(-1);
                    return Ok(out.narrow(-1, 0, n - 1));
                }
                "handle" => return Ok(out + ops.tensor(TensorId(12345))),
                "stale" => {
                    let previous = self.kept.swap(out.id().0, Ordering::SeqCst);
                    if previous != 0 {
                        return Ok(out + ops.tensor(TensorId(previous)));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn delta_weight<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        self.trip("delta_weight")?;
        if self.config.entry == "delta_weight" && self.config.fault == "shape" {
            return Ok(Some(ops.constant(&[1, 1], 0.0)));
        }
        Ok(Some(ops.constant(&[layer.out_features as usize, layer.in_features as usize], 0.0)))
    }

    fn on_step(&mut self, _step: u64) -> Result<Vec<Directive>> {
        self.trip("on_step")?;
        Ok(Vec::new())
    }

    fn export<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        self.trip("export")?;
        Ok(Some(Export::Native(vec![("bias".to_string(), ops.get_param("bias"))])))
    }

    fn save_state(&self) -> Result<String> {
        self.trip("save_state")?;
        Ok("{}".to_string())
    }

    fn load_state(&mut self, _state: &str) -> Result<()> {
        self.trip("load_state")
    }
}

graft_sdk::export_strategy!(Faulty);
