//! The graft runtime: the `graft` command and what it runs.

pub mod cli;
pub mod device;
pub mod generate;
pub mod layers;
