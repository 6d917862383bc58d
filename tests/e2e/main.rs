//! The end-to-end tests of graft, as one test binary.
//!
//! Each module was a test binary of its own, and each linked all of graft-host; one binary links
//! it once. The tests now share one process, so they keep to these rules:
//! - scratch folders (`graft_tests::scratch`, `plugins_common::plugin_dir`) are named per test,
//!   unique across all modules;
//! - the workspace's plugin crates are built once per process, all together
//!   (`graft_tests::build_plugins`): a second cargo run would replace a library in
//!   `target/plugin-tests/debug` while another test copies or loads it;
//! - a test that sets an environment variable, or one that depends on it being unset, holds
//!   `graft_tests::env_lock()` meanwhile.
//!
//! Run one module with a filter: `cargo test --workspace --test e2e plugin_lora::`.

mod plugins_common;

mod adapter_tools;
mod bad_input;
mod bench_cli;
mod compare;
mod demo_model;
mod generate_adapters;
mod generate_cli;
mod plugin_attention_gate;
mod plugin_lora;
mod plugin_progressive_fusion;
mod plugins_bench;
mod plugins_faults;
mod plugins_load;
mod plugins_pipeline;
mod plugins_reload;
mod plugins_scaffold;
mod reliability_faults;
mod reliability_fuzz;
mod reliability_plugins;
mod serve_api;
mod serve_ui;
mod train_data;
mod train_full;
mod train_loop;
mod train_outputs;
mod train_parity;
mod train_validation;
mod train_watch;
