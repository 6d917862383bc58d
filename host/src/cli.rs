//! The `graft` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{bench, compare, demo, device_check, generate, layers, plugins, serve, tools, train, train_vae};

#[derive(Parser, Debug)]
#[command(
    name = "graft",
    version,
    about = "Stable Diffusion XL runtime with LoRA strategies as plugins",
    long_about = "graft runs Stable Diffusion XL on candle. Models are diffusers folders or single-file \
                  SGM checkpoints (.safetensors); every attention linear of the UNet and of both text \
                  encoders is a named hook point that adapters attach to.\n\n\
                  Logs go to stderr; set RUST_LOG=debug for more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Text to image with an SDXL model.
    Generate(generate::GenerateArgs),
    /// Train an adapter with a strategy plugin on an image + caption dataset.
    Train(train::TrainArgs),
    /// Train a VAE as an autoencoder (reconstruction + KL) on a folder of images.
    TrainVae(train_vae::TrainVaeArgs),
    /// List the hook points (named layers adapters attach to) of a model, without loading weights.
    Layers(layers::LayersArgs),
    /// Inspect strategy plugins: list the libraries found, check one, watch for rebuilds.
    Plugins(plugins::cli::PluginsArgs),
    /// Create a strategy plugin crate (`graft plugin new NAME`).
    Plugin(plugins::cli::PluginArgs),
    /// Train several strategies on the same data, seed and budget, and report them side by side.
    Compare(compare::CompareArgs),
    /// Run `compare` over the three shipped strategies on a tiny built-in model and generated data.
    Demo(demo::DemoArgs),
    /// Train the demo model from random weights (the recipe of assets/demo-model).
    DemoModel(demo::model::DemoModelArgs),
    /// Show what an adapter file is: format, strategy, layers, ranks, alphas, metadata, base model.
    Inspect(tools::inspect::InspectArgs),
    /// Convert an adapter file between kohya, PEFT / diffusers, LyCORIS and graft-native.
    Convert(tools::convert::ConvertArgs),
    /// Merge adapters into a checkpoint, or several adapters into one (exact or by SVD to a rank).
    Merge(tools::merge::MergeArgs),
    /// Time the workloads that tools/bench.sh compares with diffusers + PEFT; prints JSON lines.
    Bench(bench::BenchArgs),
    /// Check this build on the GPU (and the CPU) against the committed diffusers + PEFT references
    /// on the tiny fixture: generation and a LoRA training step, f32 and bf16 (tools/gpu-check.sh).
    DeviceCheck(device_check::DeviceCheckArgs),
    /// A web UI and JSON API on one loaded model: datasets, training with live previews,
    /// generation, plugins, compare (binds 127.0.0.1 unless --listen says otherwise).
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Layers(args) => layers::run(args),
        Command::Train(args) => train::run(args),
        Command::TrainVae(args) => train_vae::run(args),
        Command::Plugins(args) => plugins::cli::run_plugins(args),
        Command::Plugin(args) => plugins::cli::run_plugin(args),
        Command::Compare(args) => compare::run(args),
        Command::Demo(args) => demo::run(args),
        Command::DemoModel(args) => demo::model::run(args),
        Command::Inspect(args) => tools::inspect::run(args),
        Command::Convert(args) => tools::convert::run(args),
        Command::Merge(args) => tools::merge::run(args),
        Command::Bench(args) => bench::run(args),
        Command::DeviceCheck(args) => device_check::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::runtime::configure(match &cli.command {
        Command::Bench(b) => b.threads,
        _ => None,
    });
    // candle attaches a backtrace to its errors when RUST_BACKTRACE is set; a user needs the
    // message only (RUST_LIB_BACKTRACE=1 brings them back for debugging).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // serve answers requests on threads of its own and puts its jobs on workers itself.
    let result = match cli.command {
        Command::Serve(_) => run(cli),
        _ => crate::runtime::on_worker(|| run(cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
