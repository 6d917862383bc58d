//! The `graft plugins` and `graft plugin` commands, and the plugin-folder flags of every command.
//!
//! - [`cli`]: `graft plugins list|check|watch` and `graft plugin new`.
//! - [`conformance`]: the checks `graft plugins check` runs.

pub mod cli;
pub mod conformance;
mod scaffold;

use std::path::PathBuf;

use graft_runtime::plugins::{PluginDirs, PluginManager};

/// Where to look for plugins; flatten into every command that uses plugins.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PluginDirArgs {
    /// A folder with plugin libraries (*.so, *.dylib, *.dll). Repeat for more. Searched before
    /// the config file's folders and the default ones.
    #[arg(long = "plugins", value_name = "DIR")]
    pub plugins: Vec<PathBuf>,

    /// A TOML file whose `[plugins] dirs = ["..."]` lists more plugin folders (relative to the
    /// file). Default: $GRAFT_CONFIG, else ./graft.toml when it exists.
    #[arg(long = "plugin-config", value_name = "FILE")]
    pub plugin_config: Option<PathBuf>,

    /// Do not search the workspace's target/release and target/debug.
    #[arg(long)]
    pub no_default_plugins: bool,
}

impl PluginDirArgs {
    /// The folders these flags name, for the libraries.
    pub fn dirs(&self) -> PluginDirs {
        PluginDirs { plugins: self.plugins.clone(), plugin_config: self.plugin_config.clone(), no_default_plugins: self.no_default_plugins }
    }

    /// A manager over these folders, with every library loaded ([`PluginDirs::manager`]).
    pub fn manager(&self) -> anyhow::Result<PluginManager> {
        Ok(self.dirs().manager()?)
    }
}
