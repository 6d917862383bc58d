//! `graft inspect FILE`: what an adapter file is, without a model.
//!
//! Format (kohya, PEFT, LyCORIS, graft-native), the strategy of a native file, the layers it
//! attaches to per component, its kinds, ranks and alphas, the base model it says it was made for
//! (`ss_base_model_version`, `modelspec.architecture`, `ss_sd_model_name`), the stored dtypes, the
//! keys that match no layer, and the header metadata. `--layers` lists every layer; `--json`
//! prints one JSON object instead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use graft_formats::{read_raw, Attached};
use serde_json::{json, Value};

use super::ArchArgs;
use crate::generate::lora_dir::read_header;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// An adapter file (.safetensors).
    pub file: PathBuf,
    /// List every layer with its kind, rank and alpha.
    #[arg(long)]
    pub layers: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print metadata values whole (long ones are cut at 200 characters otherwise).
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    pub arch: ArchArgs,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report = inspect(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report, args.layers, args.full));
    }
    Ok(())
}

/// Everything `graft inspect` knows about a file, as JSON.
pub fn inspect(args: &InspectArgs) -> anyhow::Result<Value> {
    let path = &args.file;
    let header = read_header(path)?;
    let raw = graft_formats::read::read_file(path)?;
    let config = args.arch.config()?;
    let (keys, _) = super::key_map(&config)?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for t in header.tensors.values() {
        *dtypes.entry(t.dtype.clone()).or_default() += 1;
    }
    let m = &header.metadata;
    let base = json!({
        "ss_base_model_version": m.get("ss_base_model_version"),
        "modelspec.architecture": m.get("modelspec.architecture"),
        "ss_sd_model_name": m.get("ss_sd_model_name"),
        "sdxl": m.get("ss_base_model_version").map(|v| v.starts_with("sdxl_"))
            .or(m.get("modelspec.architecture").map(|a| a.starts_with("stable-diffusion-xl"))),
    });
    let mut out = json!({
        "file": path.display().to_string(),
        "bytes": header.file_size,
        "tensors": header.tensors.len(),
        "dtypes": dtypes,
        "base_model": base,
        "metadata": m,
    });
    match read_raw(&raw, &keys) {
        Ok((file, report)) => {
            let mut per_component = BTreeMap::new();
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
            let mut alphas: BTreeMap<String, usize> = BTreeMap::new();
            for a in &report.attached {
                let comp = graft_formats::keys::split_layer(&a.layer).map(|(c, _)| c.prefix()).unwrap_or("?");
                *per_component.entry(comp).or_insert(0usize) += 1;
                let kind = if a.dora { format!("{}+dora", a.kind) } else { a.kind.to_string() };
                *kinds.entry(kind).or_default() += 1;
                if let Some(r) = a.rank {
                    *ranks.entry(r.to_string()).or_default() += 1;
                }
                let alpha = match a.alpha {
                    Some(x) => format_num(x as f64),
                    None if a.rank.is_some() => "none (= rank)".to_string(),
                    None => continue,
                };
                *alphas.entry(alpha).or_default() += 1;
            }
            out["format"] = json!(report.format.name());
            out["matches_model"] = json!(true);
            out["layers"] = json!(report.attached.len());
            out["layers_per_component"] = json!(per_component);
            out["kinds"] = json!(kinds);
            out["ranks"] = json!(ranks);
            out["alphas"] = json!(alphas);
            out["unmatched_keys"] = json!(report.unmatched_keys);
            out["warnings"] = json!(report.warnings);
            if let Some(n) = &report.native {
                out["strategy"] = json!({"id": n.strategy, "version": n.version, "config": n.config});
            }
            let layer_rows: Vec<Value> = report.attached.iter().zip(&file.modules).map(|(a, m)| layer_json(a, m)).collect();
            out["layer_list"] = json!(layer_rows);
        }
        Err(e) => {
            out["format"] = json!(graft_formats::detect(&raw).map(|f| f.name()).unwrap_or("unknown"));
            out["matches_model"] = json!(false);
            out["error"] = json!(format!("{e}"));
            let sample: Vec<&String> = raw.tensors.keys().take(8).collect();
            out["first_keys"] = json!(sample);
        }
    }
    Ok(out)
}

fn layer_json(a: &Attached, m: &graft_formats::ModuleWeights) -> Value {
    let shape = m.weight_shape().ok().map(|(o, i)| match m.kernel() {
        Some((kh, kw)) => vec![o, i, kh, kw],
        None => vec![o, i],
    });
    json!({
        "layer": a.layer,
        "kind": a.kind.name(),
        "rank": a.rank,
        "alpha": a.alpha,
        "scale": if a.rank.is_some() { Some(m.scale()) } else { None },
        "dora": a.dora,
        "weight_shape": shape,
    })
}

fn format_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn counts(v: &Value) -> String {
    v.as_object().map(|m| m.iter().map(|(k, n)| format!("{k} ({n})")).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

/// The human form of [`inspect`]'s JSON.
pub fn text(r: &Value, layers: bool, full: bool) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("file:        {} ({} bytes, {} tensors: {})", s("file"), r["bytes"], r["tensors"], counts(&r["dtypes"])));
    line(format!("format:      {}", s("format")));
    if let Some(st) = r.get("strategy") {
        line(format!("strategy:    {} {} config {}", st["id"].as_str().unwrap_or(""), st["version"].as_str().unwrap_or(""), st["config"]));
    }
    let b = &r["base_model"];
    let mut base = Vec::new();
    for k in ["ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"] {
        if let Some(v) = b[k].as_str() {
            base.push(format!("{k} = {v}"));
        }
    }
    let verdict = match b["sdxl"].as_bool() {
        Some(true) => "SDXL",
        Some(false) => "not SDXL",
        None => "not stated",
    };
    line(format!("base model:  {verdict}{}", if base.is_empty() { String::new() } else { format!(" ({})", base.join(", ")) }));
    if r["matches_model"].as_bool() == Some(true) {
        line(format!("layers:      {} ({})", r["layers"], counts(&r["layers_per_component"])));
        line(format!("kinds:       {}", counts(&r["kinds"])));
        if r["ranks"].as_object().is_some_and(|m| !m.is_empty()) {
            line(format!("ranks:       {}", counts(&r["ranks"])));
            line(format!("alphas:      {}", counts(&r["alphas"])));
        }
        for w in r["warnings"].as_array().into_iter().flatten() {
            line(format!("warning:     {}", w.as_str().unwrap_or("")));
        }
        let unmatched = r["unmatched_keys"].as_array().cloned().unwrap_or_default();
        if unmatched.is_empty() {
            line("unmatched:   none (every key is used)".to_string());
        } else {
            line(format!("unmatched:   {} keys match no layer:", unmatched.len()));
            for k in unmatched {
                line(format!("  {}", k.as_str().unwrap_or("")));
            }
        }
        if layers {
            line("layer list:".to_string());
            for l in r["layer_list"].as_array().into_iter().flatten() {
                let mut d = format!("  {} {}", l["layer"].as_str().unwrap_or(""), l["kind"].as_str().unwrap_or(""));
                if let Some(rank) = l["rank"].as_u64() {
                    d.push_str(&format!(" rank {rank}"));
                }
                if let Some(a) = l["alpha"].as_f64() {
                    d.push_str(&format!(" alpha {}", format_num(a)));
                }
                if let Some(sc) = l["scale"].as_f64() {
                    d.push_str(&format!(" scale {sc}"));
                }
                if l["dora"].as_bool() == Some(true) {
                    d.push_str(" dora");
                }
                if let Some(shape) = l["weight_shape"].as_array() {
                    d.push_str(&format!(" {:?}", shape.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>()));
                }
                line(d);
            }
        }
    } else {
        line(format!("layers:      none match this architecture: {}", s("error")));
        let keys: Vec<String> = r["first_keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(String::from)).collect();
        line(format!("first keys:  {}", keys.join(", ")));
    }
    let meta = r["metadata"].as_object().cloned().unwrap_or_default();
    line(format!("metadata:    {} keys", meta.len()));
    for (k, v) in meta {
        let v = v.as_str().unwrap_or("").to_string();
        let v = if !full && v.chars().count() > 200 {
            format!("{}... ({} chars; --full shows all)", v.chars().take(200).collect::<String>(), v.chars().count())
        } else {
            v
        };
        line(format!("  {k}: {}", v.replace('\n', "\n    ")));
    }
    out
}

/// For tests and other commands: the human text of a file.
pub fn describe(file: &std::path::Path, arch: &ArchArgs) -> anyhow::Result<String> {
    let args = InspectArgs { file: file.to_path_buf(), layers: false, json: false, full: false, arch: arch.clone() };
    Ok(text(&inspect(&args).with_context(|| file.display().to_string())?, false, false))
}
