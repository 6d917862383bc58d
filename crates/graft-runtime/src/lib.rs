//! The graft runtime: strategy plugins (loading, trust, hot reload, checked calls), the
//! host-owned adapter parameters and the hook dispatcher that runs strategies inside the SDXL
//! model. No command line and no server: the `graft` binary and the trainer build on it.

pub mod adapters;
pub mod device;
pub mod error;
pub mod plugins;
pub mod progress;
pub mod stop;

pub use adapters::dispatcher::{LayerId, StrategyId};
pub use error::{Error, Result};
