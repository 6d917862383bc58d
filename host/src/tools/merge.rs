//! `graft merge`: adapters into a checkpoint, or several adapters into one.
//!
//! **Into a checkpoint** (`--model`): every linear weight an adapter touches becomes
//! `W + Σ m_i·ΔW_i` (DoRA entries against the loaded `W`, full diffs with their bias), written as
//! one single file (`--out x.safetensors`, SGM layout) or a diffusers folder (`--out DIR`), from
//! either kind of source, streamed tensor by tensor; everything else is copied byte for byte.
//!
//! **Into one adapter** (no `--model`):
//! - exactly, by concatenating ranks: `down = [down_1; down_2; ...]`, `up = [m_1·s_1·up_1, ...]`,
//!   alpha = the total rank (scale 1), so `up @ down = Σ m_i·s_i·up_i @ down_i` exactly. Only
//!   plain LoRA entries concatenate; with `--to lycoris` other kinds become one full difference.
//! - approximately, `--rank R`: the best rank-R approximation of each layer's summed difference
//!   (SVD, see [`super::svd`]), with the relative error reported.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use graft_formats::adapter::AdapterWeights;
use graft_formats::{ModuleWeights, StoreDtype};
use graft_sdxl::SdxlConfig;

use super::checkpoint::{self, Change, CheckpointSource};
use super::convert::{carried_metadata, write_kohya_diffusers, write_lora_native, Target};
use super::svd::{truncate_dense, truncate_factored};
use super::{is_plain_lora, parse_dtype, read_entries, ArchArgs};
use crate::generate::prompt_syntax::parse_adapter_spec;
use crate::plugins::PluginDirArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    /// An adapter file with optional weights: FILE, FILE:w or FILE:te_weight:unet_weight. Repeat
    /// for more.
    #[arg(long = "adapter", value_name = "FILE[:W[:UNET_W]]", required = true)]
    pub adapters: Vec<String>,
    /// Merge into this checkpoint (a diffusers folder or a single-file .safetensors) instead of
    /// into one adapter.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write. With --model: a .safetensors file (single-file checkpoint) or a folder
    /// (diffusers; configs come from the --model folder or --model-config). Without: the adapter file.
    #[arg(long)]
    pub out: PathBuf,
    /// The format of a merged adapter.
    #[arg(long, value_enum, default_value = "kohya")]
    pub to: Target,
    /// Merge the adapters into one LoRA of this rank by SVD (approximate) instead of
    /// concatenating their ranks (exact).
    #[arg(long)]
    pub rank: Option<usize>,
    /// f32, f16 or bf16 (default: a checkpoint keeps each tensor's dtype, an adapter is f16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// `ss_output_name` of a merged kohya file (default: the output file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Go on when keys of an adapter match no layer (they are left out, with a warning).
    #[arg(long)]
    pub drop_unmatched: bool,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub plugins: PluginDirArgs,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let line = merge(&args)?;
    println!("{line}");
    Ok(())
}

/// An adapter's entries at the user's weights.
struct Weighted {
    modules: Vec<ModuleWeights>,
    te: f64,
    unet: f64,
}

impl Weighted {
    fn weight(&self, layer: &str) -> f64 {
        if layer.starts_with("unet.") {
            self.unet
        } else {
            self.te
        }
    }
}

/// Merges; returns a one-line summary.
pub fn merge(args: &MergeArgs) -> anyhow::Result<String> {
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let config = match &args.model {
        Some(m) if m.is_dir() && args.arch.model_config.is_none() => SdxlConfig::from_diffusers_folder(m)?,
        _ => args.arch.config()?,
    };
    let (keys, layout) = super::key_map(&config)?;
    let mut adapters = Vec::new();
    for spec in &args.adapters {
        let s = parse_adapter_spec(spec)?;
        let (_, report, modules) = read_entries(&s.path, &keys, &config, &args.plugins, args.drop_unmatched)?;
        tracing::info!("{}", report.summary());
        adapters.push(Weighted { modules, te: s.te_weight, unet: s.unet_weight });
    }
    // layer -> (entry, weight)
    let mut by_layer: BTreeMap<String, Vec<(ModuleWeights, f64)>> = BTreeMap::new();
    for a in &adapters {
        for m in &a.modules {
            // Weight 0 changes nothing: such entries are left out (a checkpoint merge then
            // copies those weights byte for byte).
            let w = a.weight(&m.layer);
            if w != 0.0 {
                by_layer.entry(m.layer.clone()).or_default().push((m.clone(), w));
            }
        }
    }
    match &args.model {
        Some(model) => into_checkpoint(args, model, &config, &layout, by_layer),
        None => into_adapter(args, &layout, by_layer),
    }
}

/// The weight changes of a checkpoint merge.
struct Merger {
    by_layer: HashMap<String, Vec<(ModuleWeights, f64)>>,
}

impl Change for Merger {
    fn touches(&self, layer: &str, bias: bool) -> bool {
        match self.by_layer.get(layer) {
            Some(entries) if bias => entries.iter().any(|(m, _)| matches!(m.weights, AdapterWeights::Full { diff_b: Some(_), .. })),
            Some(_) => true,
            None => false,
        }
    }

    fn apply(&self, layer: &str, bias: bool, base: &Tensor) -> anyhow::Result<Tensor> {
        let mut out = base.to_dtype(DType::F32)?;
        for (m, w) in self.by_layer.get(layer).into_iter().flatten() {
            if bias {
                if let Some(db) = m.delta_bias(*w)? {
                    out = (out + db)?;
                }
            } else {
                // DoRA against the loaded weight, like every other entry.
                out = (out + m.delta_for_base(base, *w)?)?;
            }
        }
        Ok(out)
    }
}

fn into_checkpoint(
    args: &MergeArgs,
    model: &std::path::Path,
    _config: &SdxlConfig,
    layout: &graft_sdxl::sgm::SgmLayout,
    by_layer: BTreeMap<String, Vec<(ModuleWeights, f64)>>,
) -> anyhow::Result<String> {
    let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(model, &args.out) {
        bail!("--out {} is the --model itself: write the merged checkpoint somewhere else", args.out.display());
    }
    let src = CheckpointSource::open(model, layout)?;
    let have = src.layers();
    if let Some(missing) = by_layer.keys().find(|l| !have.contains(*l)) {
        bail!("{}: the checkpoint has no weight for layer `{missing}` that an adapter changes", model.display());
    }
    let single_out = args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let target = if single_out {
        checkpoint::Target::Single(args.out.clone())
    } else {
        let configs = match (&args.arch.model_config, model.is_dir()) {
            (Some(c), _) => c.clone(),
            (None, true) => model.to_path_buf(),
            (None, false) => bail!(
                "a diffusers folder from a single-file checkpoint needs --model-config DIR (a diffusers folder of the \
                 same architecture, for its configs, tokenizers and scheduler)"
            ),
        };
        checkpoint::Target::Diffusers { dir: args.out.clone(), configs }
    };
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    let mut metadata = if src.single { src.metadata.clone() } else { BTreeMap::new() };
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    metadata.insert("graft.merged_adapters".into(), serde_json::to_string(&args.adapters)?);
    let n_layers = by_layer.len();
    let merger = Merger { by_layer: by_layer.into_iter().collect() };
    let w = checkpoint::write(&src, &target, &merger, dtype, &metadata)?;
    if !w.dropped.is_empty() {
        tracing::info!("{} single-file keys have no place in a diffusers folder and were left out (e.g. {})", w.dropped.len(), w.dropped[0]);
    }
    Ok(format!(
        "merged {} adapters ({n_layers} layers) into {} -> {} ({} tensors, {} changed)",
        args.adapters.len(),
        model.display(),
        args.out.display(),
        w.tensors,
        w.changed
    ))
}

fn into_adapter(
    args: &MergeArgs,
    layout: &graft_sdxl::sgm::SgmLayout,
    by_layer: BTreeMap<String, Vec<(ModuleWeights, f64)>>,
) -> anyhow::Result<String> {
    let mut modules = Vec::with_capacity(by_layer.len());
    let mut errors = Vec::new();
    for (i, (layer, entries)) in by_layer.into_iter().enumerate() {
        let entries: Vec<(ModuleWeights, f64)> = entries.into_iter().filter(|(_, w)| *w != 0.0).collect();
        if entries.is_empty() {
            continue;
        }
        if entries.iter().any(|(m, _)| super::is_conv_entry(m)) {
            bail!("`{layer}`: conv (LoCon) entries cannot be merged into an adapter; merge into a checkpoint with --model");
        }
        if let Some((m, _)) = entries.iter().find(|(m, _)| m.dora_scale.is_some()) {
            bail!(
                "`{layer}`: a DoRA entry ({}) depends on the base weights, so it cannot be merged into an adapter; \
                 merge into a checkpoint with --model",
                m.kind()
            );
        }
        let all_lora = entries.iter().all(|(m, _)| is_plain_lora(m));
        let factors = || -> anyhow::Result<(Tensor, Tensor)> {
            let mut downs = Vec::new();
            let mut ups = Vec::new();
            for (m, w) in &entries {
                if let AdapterWeights::Lora { down, up, .. } = &m.weights {
                    downs.push(down.to_dtype(DType::F32)?);
                    ups.push((up.to_dtype(DType::F32)? * (m.scale() * w))?);
                }
            }
            Ok((Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?))
        };
        let dense = || -> anyhow::Result<Tensor> {
            let mut sum: Option<Tensor> = None;
            for (m, w) in &entries {
                let d = m.delta_weight(*w)?;
                sum = Some(match sum {
                    Some(s) => (s + d)?,
                    None => d,
                });
            }
            sum.context("no entry")
        };
        let has_bias = entries.iter().any(|(m, _)| matches!(m.weights, AdapterWeights::Full { diff_b: Some(_), .. }));
        let module = match args.rank {
            Some(r) => {
                if has_bias {
                    bail!("`{layer}`: a bias difference (`diff_b`) cannot go into a LoRA; merge without --rank --to lycoris");
                }
                let low = if all_lora {
                    let (down, up) = factors()?;
                    truncate_factored(&up, &down, r)?
                } else {
                    truncate_dense(&dense()?, r, 0x5eed + i as u64)?
                };
                errors.push(low.rel_error);
                let rank = low.down.dims()[0];
                ModuleWeights::lora(layer, low.down, low.up, Some(rank as f32))
            }
            None if all_lora => {
                let (down, up) = factors()?;
                let rank = down.dims()[0];
                ModuleWeights::lora(layer, down, up, Some(rank as f32))
            }
            None if args.to == Target::Lycoris => {
                let mut bias: Option<Tensor> = None;
                for (m, w) in &entries {
                    if let Some(db) = m.delta_bias(*w)? {
                        bias = Some(match bias {
                            Some(b) => (b + db)?,
                            None => db,
                        });
                    }
                }
                ModuleWeights::full(layer, dense()?, bias)
            }
            None => {
                let kinds: Vec<String> = entries.iter().map(|(m, _)| m.kind().to_string()).collect();
                bail!(
                    "`{layer}` has {} entries: only LoRAs concatenate exactly; use --to lycoris (one full weight \
                     difference) or --rank R (SVD)",
                    kinds.join(" + ")
                );
            }
        };
        modules.push(module);
    }
    if modules.is_empty() {
        bail!("nothing to merge: every adapter has weight 0");
    }
    let dtype: StoreDtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => StoreDtype::F16,
    };
    let name = args.name.clone().unwrap_or_else(|| super::file_stem(&args.out));
    let mut meta = carried_metadata(&BTreeMap::new(), &name);
    meta.extra.insert("ss_training_comment".into(), format!("graft merge of {}", args.adapters.join(", ")));
    let tensors = match args.to {
        Target::Kohya => graft_formats::write_kohya(&args.out, &modules, layout, &meta, dtype)?.tensors,
        Target::KohyaDiffusers => write_kohya_diffusers(&args.out, &modules, &meta, dtype)?,
        Target::Peft => graft_formats::write_peft(&args.out, &modules, dtype)?.tensors,
        Target::Lycoris => graft_formats::write_lycoris(&args.out, &modules, layout, &meta, dtype)?.tensors,
        Target::Native => write_lora_native(&args.out, &modules, &args.plugins, dtype)?,
    };
    let how = match args.rank {
        Some(r) if !errors.is_empty() => {
            let max = errors.iter().cloned().fold(0.0, f64::max);
            let mean = errors.iter().sum::<f64>() / errors.len() as f64;
            format!("rank {r} by SVD, relative error of the weight differences mean {mean:.2e}, max {max:.2e}")
        }
        _ => "exact (ranks concatenated)".to_string(),
    };
    Ok(format!("merged {} adapters into {} ({} layers, {tensors} tensors, {how})", args.adapters.len(), args.out.display(), modules.len()))
}
