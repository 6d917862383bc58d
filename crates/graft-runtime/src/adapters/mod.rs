//! Host-owned adapters: the parameter store, the plugin ops table over candle, and (with the
//! pipeline) the hook dispatcher.

pub mod dispatcher;
pub mod files;
pub mod ops;
pub mod store;
