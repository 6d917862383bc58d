//! The graft runtime: the `graft` command and what it runs.

pub mod bench;
pub mod cli;
pub mod compare;
pub mod demo;
pub mod device_check;
pub mod generate;
pub mod layers;
pub mod plugins;
pub mod runtime;
pub mod serve;
pub mod tools;
pub mod train;
pub mod train_vae;
