//! The graft runtime: the `graft` command and what it runs.

pub mod adapters;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod demo;
pub mod device;
pub mod device_check;
pub mod generate;
pub mod layers;
pub mod runtime;
pub mod plugins;
pub mod progress;
pub mod serve;
pub mod stop;
pub mod tools;
pub mod train;
