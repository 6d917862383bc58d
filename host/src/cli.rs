//! The `graft` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{generate, layers};

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
    /// List the hook points (named layers adapters attach to) of a model, without loading weights.
    Layers(layers::LayersArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Layers(args) => layers::run(args),
    }
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
