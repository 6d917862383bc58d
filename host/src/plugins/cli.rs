//! `graft plugins list|check|watch` and `graft plugin new`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{scaffold, PluginDirArgs};
use graft_runtime::plugins::loader::{load_plugin, LoadedPlugin};
use graft_runtime::plugins::manager::{FileStatus, PluginManager, SearchDir};
use graft_runtime::plugins::StrategyInstance;

#[derive(Debug, Args)]
#[command(long_about = "Inspect strategy plugins. Plugins are dynamic libraries (*.so, *.dylib, *.dll) built from \
                  crates that depend on graft-sdk. graft searches the folders given with --plugins, those of \
                  the config file ([plugins] dirs = [...] in ./graft.toml or --plugin-config), and the \
                  workspace's target/release and target/debug.")]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub command: PluginsCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List the plugin libraries found: id, version, ABI, status, SHA-256 and path.
    List(ListArgs),
    /// Load one library, create its strategy and run the conformance checks.
    #[command(long_about = "Load one library and tell whether it is a usable plugin, and why not. Then run the \
                            conformance checks on it: its plan over the real SDXL layer list and over the test \
                            model's (every `targets` pattern must match), zero-init identity, that its parameters \
                            take effect, fuse / unfuse, eject restoring the model bit for bit, and export -> load \
                            giving the output it gave. Exits non-zero when any fails.")]
    Check(CheckArgs),
    /// Watch the plugin folders and report each rebuilt plugin as it is reloaded.
    Watch(WatchArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub dirs: PluginDirArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The library file (e.g. target/debug/libmy_plugin.so).
    pub file: PathBuf,
    /// Also create a strategy with this configuration (JSON text, or @FILE); default: the
    /// manifest's config example.
    #[arg(long, value_name = "JSON")]
    pub config: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The SDXL-architecture model for the conformance checks (default: the repository's tiny
    /// test model, tests/fixtures/tiny-sdxl).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Only load the library and create the strategy; skip the conformance checks.
    #[arg(long)]
    pub load_only: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub dirs: PluginDirArgs,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a strategy plugin crate that builds and loads as it is.
    #[command(long_about = "Create a strategy plugin crate that builds and loads as it is: a cdylib depending \
                            on graft-sdk, with a working low-rank adapter strategy to edit. Inside the graft \
                            workspace it goes to plugins/NAME and is added to the workspace members; \
                            elsewhere it is its own workspace. Build it with `cargo build -p NAME` (in the \
                            workspace) or `cargo build` (standalone), then `graft plugins list`.")]
    New(NewArgs),
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: crate name and plugin id (lower-case letters, digits, `-`, `_`).
    pub name: String,
    /// Where to create the crate (default: plugins/NAME in the graft workspace, else ./NAME).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The graft-sdk crate folder to depend on (default: the workspace's crates/graft-sdk).
    #[arg(long, value_name = "PATH")]
    pub sdk: Option<PathBuf>,
}

pub fn run_plugins(args: PluginsArgs) -> anyhow::Result<()> {
    match args.command {
        PluginsCommand::List(a) => list(a),
        PluginsCommand::Check(a) => check(a),
        PluginsCommand::Watch(a) => watch(a),
    }
}

pub fn run_plugin(args: PluginArgs) -> anyhow::Result<()> {
    match args.command {
        PluginCommand::New(a) => {
            let done = scaffold::new_plugin(&a.name, a.dir.as_deref(), a.sdk.as_deref())?;
            println!("created plugin crate `{}` in {}", a.name, done.dir.display());
            match &done.workspace {
                Some(ws) => {
                    println!("added to the workspace {}", ws.join("Cargo.toml").display());
                    println!("build it with: cargo build -p {}", a.name);
                }
                None => println!("build it with: cargo build --manifest-path {}", done.dir.join("Cargo.toml").display()),
            }
            println!("then check it with: graft plugins list (or graft plugins check <library>)");
            Ok(())
        }
    }
}

fn origin_word(d: &SearchDir) -> &'static str {
    match d.origin {
        graft_runtime::plugins::DirOrigin::Flag => "--plugins",
        graft_runtime::plugins::DirOrigin::Config => "config",
        graft_runtime::plugins::DirOrigin::Default => "default",
    }
}

#[derive(serde::Serialize)]
struct Row {
    id: Option<String>,
    version: Option<String>,
    abi: Option<u32>,
    status: String,
    reason: Option<String>,
    /// SHA-256 of the loaded library's bytes.
    sha256: Option<String>,
    path: PathBuf,
    /// The config schema, when the plugin describes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    config_schema: Option<graft_sdk::ConfigSchema>,
}

fn rows(manager: &PluginManager) -> Vec<Row> {
    manager
        .files()
        .values()
        .map(|e| {
            let m = e.plugin.as_ref().map(|p| &p.manifest);
            let (status, reason) = match &e.status {
                FileStatus::Active => ("active".to_string(), None),
                FileStatus::Shadowed { by } => ("shadowed".to_string(), Some(format!("another build of this id is used: {}", by.display()))),
                FileStatus::Failed(err) => (err.status().to_string(), Some(err.to_string())),
                FileStatus::Removed => ("removed".to_string(), None),
            };
            Row {
                id: m.map(|m| m.id.clone()),
                version: m.map(|m| m.version.clone()),
                abi: m.map(|m| m.abi_version),
                status,
                reason,
                sha256: e.plugin.as_ref().map(|p| p.sha256.clone()),
                path: e.path.clone(),
                config_schema: e.plugin.as_ref().and_then(|p| p.config_schema.clone()),
            }
        })
        .collect()
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let manager = args.dirs.manager()?;
    let rows = rows(&manager);
    if args.json {
        let dirs: Vec<_> = manager.dirs().to_vec();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "dirs": dirs, "plugins": rows }))?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no plugin library found");
    } else {
        let w_id = rows.iter().map(|r| r.id.as_deref().unwrap_or("-").len()).max().unwrap_or(2).max(2);
        let w_ver = rows.iter().map(|r| r.version.as_deref().unwrap_or("-").len()).max().unwrap_or(7).max(7);
        let w_status = rows.iter().map(|r| r.status.len()).max().unwrap_or(6).max(6);
        // The first 16 hex digits of the SHA-256 (`--json` has all 64).
        println!("{:w_id$}  {:w_ver$}  ABI  {:w_status$}  {:16}  PATH", "ID", "VERSION", "STATUS", "SHA256");
        for r in &rows {
            let abi = r.abi.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            let sha = r.sha256.as_deref().map_or("-", |h| &h[..16.min(h.len())]);
            println!(
                "{:w_id$}  {:w_ver$}  {abi:3}  {:w_status$}  {sha:16}  {}",
                r.id.as_deref().unwrap_or("-"),
                r.version.as_deref().unwrap_or("-"),
                r.status,
                r.path.display()
            );
            if let Some(reason) = &r.reason {
                for line in reason.lines().take(6) {
                    println!("    {line}");
                }
            }
        }
    }
    println!();
    println!("searched:");
    for d in manager.dirs() {
        let missing = if d.path.is_dir() { "" } else { " (missing)" };
        println!("  {} ({}){missing}", d.path.display(), origin_word(d));
    }
    Ok(())
}

fn read_config(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("--config @{file}: cannot read the file")),
        None => Ok(arg.to_string()),
    }
}

fn describe(p: &LoadedPlugin) -> serde_json::Value {
    serde_json::json!({
        "path": p.source,
        "sha256": p.sha256,
        "id": p.manifest.id,
        "version": p.manifest.version,
        "abi_version": p.manifest.abi_version,
        "host_abi_version": graft_abi::ABI_VERSION,
        "description": p.manifest.description,
        "capabilities": p.manifest.capabilities,
        "config_example": p.manifest.config_example,
        "config_schema": p.config_schema,
        "size": p.size,
    })
}

/// The config schema as an aligned table: key, type, default, range, help.
pub fn schema_table(schema: &graft_sdk::ConfigSchema) -> String {
    let rows: Vec<[String; 5]> = schema
        .keys
        .iter()
        .map(|k| {
            let kind = match k.kind {
                graft_sdk::schema::KeyType::Enum => format!("enum({})", k.choices.join("|")),
                other => other.name().to_string(),
            };
            let kind = if k.nullable { format!("{kind}?") } else { kind };
            [k.key.clone(), kind, k.default.to_string(), k.range_text(), k.help.clone()]
        })
        .collect();
    let header = ["KEY", "TYPE", "DEFAULT", "RANGE", "HELP"].map(String::from);
    let width = |i: usize| rows.iter().chain([&header]).map(|r| r[i].chars().count()).max().unwrap_or(0);
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    let mut out = format!("config schema: {} keys\n", rows.len());
    for r in std::iter::once(&header).chain(rows.iter()) {
        out.push_str(format!("  {:w0$}  {:w1$}  {:w2$}  {:w3$}  {}", r[0], r[1], r[2], r[3], r[4]).trim_end());
        out.push('\n');
    }
    out
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    if !args.file.is_file() {
        anyhow::bail!("{}: no such file", args.file.display());
    }
    let private = std::env::temp_dir().join(format!("graft-plugin-check-{}", std::process::id()));
    let plugin = load_plugin(&args.file, &private, 0).map_err(|e| anyhow::anyhow!("{} is not loadable: {e}", args.file.display()))?;
    let config = match &args.config {
        Some(c) => read_config(c)?,
        None => plugin.manifest.config_example.clone(),
    };
    let strategy = StrategyInstance::new(&plugin, None, &config);
    let checks = match (&strategy, args.load_only) {
        (Ok(_), false) => {
            let model = match &args.model {
                Some(m) => m.clone(),
                None => crate::demo::demo_model()?,
            };
            Some(super::conformance::run(&plugin, &config, &model)?)
        }
        _ => None,
    };
    if args.json {
        let mut v = describe(&plugin);
        v["loadable"] = serde_json::json!(true);
        v["new_strategy"] = match &strategy {
            Ok(_) => serde_json::json!("ok"),
            Err(e) => serde_json::json!(e.to_string()),
        };
        v["conformance"] = serde_json::json!(checks);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let m = &plugin.manifest;
        println!("file:          {}", args.file.display());
        println!("sha256:        {}", plugin.sha256);
        println!("id:            {}", m.id);
        println!("version:       {}", m.version);
        println!("ABI:           {} (host {}), layout check passed", m.abi_version, graft_abi::ABI_VERSION);
        if !m.description.is_empty() {
            println!("description:   {}", m.description);
        }
        if !m.capabilities.is_empty() {
            println!("capabilities:  {}", m.capabilities.join(", "));
        }
        println!("config example: {}", m.config_example);
        match &plugin.config_schema {
            Some(schema) => print!("{}", schema_table(schema)),
            None => println!("config schema: none (the configuration is free JSON)"),
        }
        match &strategy {
            Ok(_) => println!("new_strategy:  ok with {}", if args.config.is_some() { "the given config" } else { "the config example" }),
            Err(e) => println!("new_strategy:  FAILED: {e}"),
        }
        println!("loadable:      yes");
        for c in checks.iter().flatten() {
            println!("{:5} {}: {}", if c.passed { "ok" } else { "FAIL" }, c.check, c.detail);
        }
    }
    strategy.map_err(|e| anyhow::anyhow!("the library loads, but creating its strategy failed: {e}"))?;
    let failed: Vec<&str> = checks.iter().flatten().filter(|c| !c.passed).map(|c| c.check).collect();
    if !failed.is_empty() {
        anyhow::bail!("{}: {} conformance check(s) failed: {}", args.file.display(), failed.len(), failed.join(", "));
    }
    Ok(())
}

fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut manager = args.dirs.manager()?;
    for p in manager.plugins() {
        println!("active: {} from {}", p.label(), p.source.display());
    }
    manager.watch()?;
    println!("watching {} folder(s); rebuild a plugin to see it reloaded (Ctrl-C to stop)", manager.dirs().len());
    let deadline = args.seconds.map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                left.min(Duration::from_secs(1))
            }
            None => Duration::from_secs(1),
        };
        for event in manager.wait_reloads(wait) {
            println!("{event}");
        }
    }
}
