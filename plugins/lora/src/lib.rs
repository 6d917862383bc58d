//! lora: standard LoRA on linear hook points, with the math of kohya sd-scripts and PEFT.
//!
//! ```text
//! y = W x + b + m * scale * up(down(x))        down [r, in], up [out, r]
//! scale = alpha / r          (rsLoRA: alpha / sqrt(r));  alpha = 0 means alpha = r
//! ```
//!
//! - `down` starts as kohya's kaiming-uniform(a = sqrt 5) (or PEFT's "gaussian" N(0, 1/r)), `up`
//!   as zeros, so the adapter starts as the identity.
//! - Training-time regularisers, as kohya's `LoRAModule.forward` has them:
//!   `module_dropout` skips the whole adapter of a layer with probability p (one draw per call);
//!   `dropout` is ordinary (inverted) dropout on `down(x)`, in rank space;
//!   `rank_dropout` zeroes whole rank channels per sample (one mask of [batch, r], shared over
//!   the sequence) and scales by 1 / (1 - p). All draw from the host's seeded RNG (through
//!   `dropout`) and are off outside training.
//! - Optimizer groups `unet` and `text_encoder`, chosen by the layer's component.
//! - `delta_weight` = m * scale * up @ down (the adapter is linear in x, so it can be fused);
//!   `export` gives `down`, `up` and an alpha in the `lora` key family (kohya / PEFT files): the
//!   multiplier is folded into `up`, and rsLoRA's scale into alpha (alpha' = scale * r), so a
//!   reader that applies alpha' / r gets the same weights.
//! - Conv adapters (LoCon, kohya's `conv_dim`): with `conv_rank` > 0 every conv hook point that
//!   `conv_targets` selects (the UNet's resnet, resampler and conv projection convolutions) gets
//!   `dW = m * conv_alpha / conv_rank * reshape(up @ down)`, down [r, in*kh*kw] (the k x k
//!   kernel, kaiming-uniform), up [out, r] (zeros). With `use_tucker` (LyCORIS) a k x k conv has
//!   down [r, in], mid [r, r*kh*kw] (both kaiming-uniform) and up [out, r]:
//!   `dW[o, i] = scale * Σ up[o, a] mid[a, b] down[b, i]`. The host convolves with the kernel
//!   difference (`delta_weight`); the export is kohya's LoCon shapes (down [r, in, kh, kw],
//!   up [out, r, 1, 1], Tucker down [r, in, 1, 1] and mid [r, r, kh, kw]).

use graft_sdk::prelude::*;
use serde::Deserialize;

mod schema;

/// Default UNet targets: the four projections of every attention module (attn1 and attn2).
const UNET_TARGETS: [&str; 4] = ["unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0"];

/// Conv layers adapted when `conv_rank` > 0: every conv hook point of the UNet.
const CONV_TARGETS: [&str; 1] = ["unet.*"];

/// Added by `train_text_encoder`: the self-attention projections of both text encoders.
const TEXT_ENCODER_TARGETS: [&str; 2] = ["text_encoder*.self_attn.[qkv]_proj", "text_encoder*.self_attn.out_proj"];

/// How `down` starts (`up` always starts at zero).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DownInit {
    /// kohya / torch `nn.Linear`: kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in)).
    #[serde(alias = "kaiming")]
    KaimingUniform,
    /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r).
    Gaussian,
}

/// The configuration (JSON). Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// Layer name patterns (globs, `re:` regexes, `!` excludes); only linear hook points are used.
    targets: Vec<String>,
    /// Also attach to the text encoders' self-attention projections.
    train_text_encoder: bool,
    rank: usize,
    /// 0 means alpha = rank (scale 1), as kohya and PEFT read it.
    alpha: f64,
    /// rsLoRA: scale = alpha / sqrt(rank).
    use_rslora: bool,
    /// m in `y = W x + m * scale * up(down(x))` while training (the user's weight at generation
    /// time is applied by the host on top).
    multiplier: f64,
    /// Dropout on down(x) (kohya `neuron_dropout` / `dropout`).
    dropout: f64,
    /// Drops whole rank channels per sample, scaling by 1 / (1 - p) (kohya `rank_dropout`).
    rank_dropout: f64,
    /// Skips a layer's adapter for a whole call with this probability (kohya `module_dropout`).
    module_dropout: f64,
    init: DownInit,
    unet_lr: f64,
    text_encoder_lr: f64,
    weight_decay: f64,
    /// Per-parameter gradient clip (L2 norm); none: no per-parameter clipping.
    clip_norm: Option<f64>,
    /// Rank of the conv adapters (LoCon, kohya's `conv_dim`); 0: none.
    conv_rank: usize,
    /// alpha of the conv adapters (0 means alpha = conv_rank).
    conv_alpha: f64,
    /// LyCORIS' Tucker decomposition for k x k conv adapters (a [r, r, kh, kw] core).
    use_tucker: bool,
    /// Conv hook points adapted when `conv_rank` > 0 (patterns as `targets`).
    conv_targets: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            targets: UNET_TARGETS.iter().map(|s| s.to_string()).collect(),
            train_text_encoder: false,
            rank: 8,
            alpha: 32.0,
            use_rslora: false,
            multiplier: 1.0,
            dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            init: DownInit::KaimingUniform,
            unet_lr: 1e-4,
            text_encoder_lr: 5e-5,
            weight_decay: 0.01,
            clip_norm: None,
            conv_rank: 0,
            conv_alpha: 1.0,
            use_tucker: false,
            conv_targets: CONV_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Config {
    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::config(format!("lora: {what}")));
        if self.rank == 0 {
            return bad("`rank` must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("`alpha` must be finite and >= 0 (0 means alpha = rank), got {}", self.alpha));
        }
        if !self.multiplier.is_finite() {
            return bad(format!("`multiplier` must be finite, got {}", self.multiplier));
        }
        for (key, p) in [("dropout", self.dropout), ("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("`{key}` is a probability in [0, 1), got {p}"));
            }
        }
        for (key, v) in [("unet_lr", self.unet_lr), ("text_encoder_lr", self.text_encoder_lr), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("`{key}` must be finite and >= 0, got {v}"));
            }
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("`clip_norm` must be > 0 (leave it out for no clipping), got {c}"));
            }
        }
        if !(self.conv_alpha.is_finite() && self.conv_alpha >= 0.0) {
            return bad(format!("`conv_alpha` must be finite and >= 0 (0 means alpha = conv_rank), got {}", self.conv_alpha));
        }
        if self.use_tucker && self.conv_rank == 0 {
            return bad("`use_tucker` applies to conv adapters: set `conv_rank` > 0".into());
        }
        if self.targets.is_empty() && !self.train_text_encoder && self.conv_rank == 0 {
            return bad("`targets` is empty, `train_text_encoder` is false and `conv_rank` is 0: nothing to train".into());
        }
        Ok(())
    }

    /// All include / exclude patterns in effect.
    fn patterns(&self) -> Vec<String> {
        let mut p = self.targets.clone();
        if self.train_text_encoder {
            p.extend(TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()));
        }
        p
    }

    /// alpha as kohya and PEFT read it: 0 means rank.
    fn alpha(&self) -> f64 {
        if self.alpha == 0.0 {
            self.rank as f64
        } else {
            self.alpha
        }
    }

    /// conv_alpha / conv_rank (conv_alpha 0 means conv_rank).
    fn conv_scale(&self) -> f64 {
        let r = self.conv_rank as f64;
        if self.conv_alpha == 0.0 {
            1.0
        } else {
            self.conv_alpha / r
        }
    }

    /// The conv alpha as written to files.
    fn conv_alpha(&self) -> f64 {
        if self.conv_alpha == 0.0 {
            self.conv_rank as f64
        } else {
            self.conv_alpha
        }
    }

    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    fn scale(&self) -> f64 {
        let r = self.rank as f64;
        if self.use_rslora {
            self.alpha() / r.sqrt()
        } else {
            self.alpha() / r
        }
    }
}

fn is_text_encoder(layer: &LayerInfo) -> bool {
    layer.component == Component::TEXT_ENCODER || layer.component == Component::TEXT_ENCODER_2
}

/// The layers the patterns select (linears only), with an error for an include pattern that
/// selects none: a misspelt target must not silently train nothing.
fn select<'l>(patterns: &[String], layers: &'l [LayerInfo]) -> Result<Vec<&'l LayerInfo>> {
    let linears: Vec<LayerInfo> = layers.iter().filter(|l| l.is_linear()).cloned().collect();
    for p in patterns.iter().filter(|p| !p.starts_with('!')) {
        if LayerMatcher::new(&[p.as_str()])?.filter(&linears).is_empty() {
            let example = linears.first().map(|l| l.name()).unwrap_or("(none)");
            return Err(Error::config(format!(
                "lora: target pattern `{p}` matches no linear hook point of this model (names look like `{example}`; `graft layers` lists them)"
            )));
        }
    }
    let matcher = LayerMatcher::new(patterns)?;
    let chosen: Vec<&LayerInfo> = layers.iter().filter(|l| l.is_linear() && matcher.matches(l.name())).collect();
    if chosen.is_empty() {
        return Err(Error::config(format!("lora: the patterns {patterns:?} leave no linear hook point to attach to")));
    }
    Ok(chosen)
}

/// The conv hook points `patterns` select, with an error for an include pattern that selects
/// none of them.
fn select_convs<'l>(patterns: &[String], layers: &'l [LayerInfo]) -> Result<Vec<&'l LayerInfo>> {
    let convs: Vec<LayerInfo> = layers.iter().filter(|l| l.is_conv()).cloned().collect();
    for p in patterns.iter().filter(|p| !p.starts_with('!')) {
        if LayerMatcher::new(&[p.as_str()])?.filter(&convs).is_empty() {
            let example = convs.first().map(|l| l.name()).unwrap_or("(none: this host or model has no conv hook points)");
            return Err(Error::config(format!(
                "lora: conv target pattern `{p}` matches no conv hook point of this model (names look like `{example}`; `graft layers` lists them)"
            )));
        }
    }
    let matcher = LayerMatcher::new(patterns)?;
    Ok(layers.iter().filter(|l| l.is_conv() && matcher.matches(l.name())).collect())
}

/// (kh, kw) of a conv hook point.
fn kernel_of(layer: &LayerInfo) -> Result<(usize, usize)> {
    let g = layer
        .conv()
        .ok_or_else(|| Error::msg(format!("lora: conv layer `{}` has no geometry in its info ({:?})", layer.name(), layer.extra.as_str())))?;
    Ok((g.kernel[0] as usize, g.kernel[1] as usize))
}

/// Tucker only where the kernel is larger than 1x1 (LyCORIS does the same).
fn is_tucker(c: &Config, kernel: (usize, usize)) -> bool {
    c.use_tucker && kernel != (1, 1)
}

struct Lora {
    config: Config,
}

impl Lora {
    /// The mask of `rank_dropout` for `lx` [d0, .., r]: one draw per (d0, r) (kohya: per sample
    /// and rank channel, shared over the sequence), values 0 or 1 / (1 - p).
    fn rank_mask<'o>(&self, ops: Ops<'o>, lx: Tensor<'o>) -> Tensor<'o> {
        let shape = lx.shape();
        let mut mask_shape = vec![1; shape.len()];
        if let (Some(first), Some(last)) = (shape.first(), shape.last()) {
            mask_shape[0] = *first;
            let n = mask_shape.len();
            mask_shape[n - 1] = *last;
        }
        ops.constant(&mask_shape, 1.0).dropout(self.config.rank_dropout)
    }
}

impl Lora {
    /// The unscaled kernel difference [out, in, kh, kw] of a conv layer.
    fn conv_delta<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Tensor<'o>> {
        let c = &self.config;
        let (r, inf, outf) = (c.conv_rank, layer.in_features as usize, layer.out_features as usize);
        let (kh, kw) = kernel_of(layer)?;
        let (up, down) = (ops.get_param("up"), ops.get_param("down"));
        if !is_tucker(c, (kh, kw)) {
            // [out, r] @ [r, in*kh*kw]
            return Ok(up.matmul(down).reshape(&[outf, inf, kh, kw]));
        }
        // Σ_ab up[o, a] mid[a, (b, h, w)] down[b, i]: [out, r*kh*kw] -> [out, kh*kw, r] @ [r, in]
        // -> [out, kh*kw, in] -> [out, in, kh*kw].
        let t = up.matmul(ops.get_param("mid")).reshape(&[outf, r, kh * kw]).transpose(1, 2);
        Ok(t.matmul(down).transpose(1, 2).reshape(&[outf, inf, kh, kw]))
    }
}

impl Strategy for Lora {
    fn manifest() -> Manifest {
        Manifest::new("lora", env!("CARGO_PKG_VERSION"))
            .description("Standard LoRA (kohya / PEFT math): y = W x + m * alpha/r * up(down(x)) on the target linears")
            .capability("delta_weight")
            .capability("export:lora")
            .config_example(
                r#"{"targets": ["unet.*.to_q", "unet.*.to_k", "unet.*.to_v", "unet.*.to_out.0"], "train_text_encoder": false, "rank": 8, "alpha": 32, "use_rslora": false, "multiplier": 1.0, "dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0, "init": "kaiming_uniform", "unet_lr": 0.0001, "text_encoder_lr": 0.00005, "weight_decay": 0.01}"#,
            )
    }

    fn config_schema() -> Option<ConfigSchema> {
        Some(schema::schema())
    }

    fn new(config: &str) -> Result<Self> {
        let config: Config = config::parse("lora", config)?;
        config.check()?;
        Ok(Self { config })
    }

    fn plan(&mut self, layers: &[LayerInfo], _config: &str) -> Result<Plan> {
        let c = &self.config;
        let r = c.rank;
        let down_init = match c.init {
            DownInit::KaimingUniform => Init::kaiming_uniform(5f64.sqrt()),
            DownInit::Gaussian => Init::normal(0.0, 1.0 / r as f64),
        };
        let patterns = c.patterns();
        let chosen = if patterns.is_empty() { Vec::new() } else { select(&patterns, layers)? };
        let mut plan = Plan::new();
        let mut used = [false, false]; // unet, text_encoder
        if c.conv_rank > 0 {
            let r = c.conv_rank;
            let kaiming = Init::kaiming_uniform(5f64.sqrt());
            for layer in select_convs(&c.conv_targets, layers)? {
                used[0] = true;
                let (inf, outf) = (layer.in_features as usize, layer.out_features as usize);
                let (kh, kw) = kernel_of(layer)?;
                let mut a = Attachment::new(layer.name());
                if is_tucker(c, (kh, kw)) {
                    a = a
                        .param(ParamSpec::new("down", &[r, inf], kaiming).group("unet"))
                        .param(ParamSpec::new("mid", &[r, r * kh * kw], kaiming).group("unet"));
                } else {
                    a = a.param(ParamSpec::new("down", &[r, inf * kh * kw], kaiming).group("unet"));
                }
                plan = plan.attach(a.param(ParamSpec::new("up", &[outf, r], Init::zeros()).group("unet")));
            }
        }
        for layer in chosen {
            let te = is_text_encoder(layer);
            used[te as usize] = true;
            let group = if te { "text_encoder" } else { "unet" };
            let (inf, outf) = (layer.in_features as usize, layer.out_features as usize);
            plan = plan.attach(
                Attachment::new(layer.name())
                    .param(ParamSpec::new("down", &[r, inf], down_init).group(group))
                    .param(ParamSpec::new("up", &[outf, r], Init::zeros()).group(group)),
            );
        }
        for (i, (name, lr)) in [("unet", c.unet_lr), ("text_encoder", c.text_encoder_lr)].into_iter().enumerate() {
            if used[i] {
                let mut g = OptimizerGroup::new(name, lr).weight_decay(c.weight_decay);
                if let Some(clip) = c.clip_norm {
                    g = g.clip_norm(clip);
                }
                plan = plan.group(g);
            }
        }
        Ok(plan)
    }

    fn forward<'o>(&self, ops: Ops<'o>, _layer: &LayerInfo, inputs: &Inputs<'o>) -> Result<Tensor<'o>> {
        let c = &self.config;
        let (x, base_out) = (inputs.input()?, inputs.base_out()?);
        // Module dropout: one host-RNG draw per call; a dropped one-element tensor reads 0.
        if ops.training() && c.module_dropout > 0.0 && ops.constant(&[1], 1.0).dropout(c.module_dropout).to_scalar() == 0.0 {
            return Ok(base_out);
        }
        let mut lx = x.linear(ops.get_param("down"), None); // [.., r]
        lx = lx.dropout(c.dropout); // the identity outside training or at p = 0
        if ops.training() && c.rank_dropout > 0.0 {
            lx = lx * self.rank_mask(ops, lx);
        }
        let ly = lx.linear(ops.get_param("up"), None); // [.., out]
        Ok(base_out + ly * (c.multiplier * c.scale()))
    }

    fn delta_weight<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Tensor<'o>>> {
        let c = &self.config;
        if layer.is_conv() {
            return Ok(Some(self.conv_delta(ops, layer)? * (c.multiplier * c.conv_scale())));
        }
        let dw = ops.get_param("up").matmul(ops.get_param("down")); // [out, in]
        Ok(Some(dw * (c.multiplier * c.scale())))
    }

    fn export<'o>(&self, ops: Ops<'o>, layer: &LayerInfo) -> Result<Option<Export<'o>>> {
        let c = &self.config;
        let up = ops.get_param("up");
        let up = if c.multiplier == 1.0 { up } else { up * c.multiplier };
        if layer.is_conv() {
            // kohya / LyCORIS LoCon shapes: the factors as convolution kernels.
            let (r, inf, outf) = (c.conv_rank, layer.in_features as usize, layer.out_features as usize);
            let (kh, kw) = kernel_of(layer)?;
            let up = up.reshape(&[outf, r, 1, 1]);
            let alpha = c.conv_alpha();
            if is_tucker(c, (kh, kw)) {
                let down = ops.get_param("down").reshape(&[r, inf, 1, 1]);
                let mid = ops.get_param("mid").reshape(&[r, r, kh, kw]);
                return Ok(Some(Export::Tucker { down, mid, up, alpha }));
            }
            let down = ops.get_param("down").reshape(&[r, inf, kh, kw]);
            return Ok(Some(Export::Lora { down, up, alpha }));
        }
        // Readers apply alpha / r: write the alpha that gives this run's scale.
        let alpha = if c.use_rslora { c.scale() * c.rank as f64 } else { c.alpha() };
        Ok(Some(Export::Lora { down: ops.get_param("down"), up, alpha }))
    }
}

graft_sdk::export_strategy!(Lora);

#[cfg(test)]
mod tests {
    /// Every key `Config` accepts is in the schema, with a default the parser takes, and no other.
    #[test]
    fn schema_matches_parser() {
        graft_sdk::testing::check_schema::<super::Lora>();
    }

    /// The host's conformance checks (`graft plugins check`) on this plugin.
    #[test]
    fn conformance() {
        graft_sdk::conformance_test!();
    }

    use super::*;
    use graft_sdk::{AttentionKind, BlockKind, BlockPosition, LayerKind};

    fn linear(name: &str, component: Component, inf: u64, outf: u64) -> LayerInfo {
        LayerInfo {
            name: name.into(),
            kind: LayerKind::LINEAR,
            component,
            in_features: inf,
            out_features: outf,
            block: BlockPosition { kind: BlockKind::DOWN, index: 1 },
            attention: AttentionKind::SELF_ATTENTION,
            extra: "".into(),
        }
    }

    fn layers() -> Vec<LayerInfo> {
        let t = "unet.down_blocks.1.attentions.0.transformer_blocks.0";
        let te = "text_encoder.text_model.encoder.layers.0.self_attn";
        let te2 = "text_encoder_2.text_model.encoder.layers.3.self_attn";
        let mut attn = linear(&format!("{t}.attn2"), Component::UNET, 8, 8);
        attn.kind = LayerKind::ATTENTION;
        vec![
            linear(&format!("{t}.attn1.to_q"), Component::UNET, 8, 8),
            linear(&format!("{t}.attn2.to_k"), Component::UNET, 6, 8),
            linear(&format!("{t}.attn2.to_v"), Component::UNET, 6, 8),
            linear(&format!("{t}.attn2.to_out.0"), Component::UNET, 8, 8),
            linear(&format!("{t}.ff.net.2"), Component::UNET, 32, 8),
            attn,
            linear(&format!("{te}.q_proj"), Component::TEXT_ENCODER, 5, 5),
            linear(&format!("{te}.out_proj"), Component::TEXT_ENCODER, 5, 5),
            linear("text_encoder.text_model.encoder.layers.0.mlp.fc1", Component::TEXT_ENCODER, 5, 20),
            linear(&format!("{te2}.v_proj"), Component::TEXT_ENCODER_2, 7, 7),
        ]
    }

    fn plan(config: &str) -> Result<Plan> {
        Lora::new(config)?.plan(&layers(), config)
    }

    #[test]
    fn defaults_take_unet_attention_projections() {
        let p = plan("{}").unwrap();
        let names: Vec<&str> = p.attachments.iter().map(|a| a.layer.as_str()).collect();
        assert_eq!(names.len(), 4);
        assert!(names.iter().all(|n| n.starts_with("unet.") && !n.contains("ff.")));
        let k = &p.attachments[1];
        assert_eq!(k.params[0].shape, vec![8, 6]);
        assert_eq!(k.params[0].init, Init::kaiming_uniform(5f64.sqrt()));
        assert_eq!(k.params[1].shape, vec![8, 8]);
        assert_eq!(k.params[1].init, Init::zeros());
        assert_eq!(p.groups, vec![OptimizerGroup::new("unet", 1e-4).weight_decay(0.01)]);
    }

    #[test]
    fn text_encoder_flag_and_groups() {
        let p = plan(r#"{"train_text_encoder": true, "rank": 4, "init": "gaussian", "text_encoder_lr": 1e-5}"#).unwrap();
        let te: Vec<&Attachment> = p.attachments.iter().filter(|a| a.layer.starts_with("text_encoder")).collect();
        assert_eq!(te.len(), 3); // q_proj, out_proj, TE2 v_proj; not mlp.fc1
        assert!(te.iter().all(|a| a.params.iter().all(|s| s.group == "text_encoder")));
        assert_eq!(te[0].params[0].init, Init::normal(0.0, 0.25));
        assert_eq!(p.groups.iter().map(|g| (g.name.as_str(), g.lr)).collect::<Vec<_>>(), vec![("unet", 1e-4), ("text_encoder", 1e-5)]);
    }

    #[test]
    fn scale_alpha_and_rslora() {
        let c = Lora::new(r#"{"rank": 16, "alpha": 8}"#).unwrap().config;
        assert_eq!(c.scale(), 0.5);
        let c = Lora::new(r#"{"rank": 16, "alpha": 0}"#).unwrap().config;
        assert_eq!(c.scale(), 1.0);
        let c = Lora::new(r#"{"rank": 16, "alpha": 8, "use_rslora": true}"#).unwrap().config;
        assert_eq!(c.scale(), 2.0);
    }

    #[test]
    fn bad_configs_are_named() {
        let e = |cfg: &str| Lora::new(cfg).err().expect("an error").to_string();
        assert!(e(r#"{"rnak": 4}"#).contains("unknown field `rnak`"));
        assert!(e(r#"{"rank": 0}"#).contains("`rank` must be at least 1"));
        assert!(e(r#"{"dropout": 1.0}"#).contains("`dropout` is a probability"));
        assert!(e(r#"{"init": "xavier"}"#).contains("unknown variant `xavier`"));
        assert!(e(r#"{"targets": []}"#).contains("nothing to train"));
        let e = plan(r#"{"targets": ["unet.*.to_qq"]}"#).unwrap_err().to_string();
        assert!(e.contains("`unet.*.to_qq` matches no linear hook point"), "{e}");
        let e = plan(r#"{"targets": ["unet.*.to_q", "!unet.*"]}"#).unwrap_err().to_string();
        assert!(e.contains("leave no linear hook point"), "{e}");
    }
}
