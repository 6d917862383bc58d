//! Strategy plugins: finding and loading them (with the ABI checks), hot reload, calling them.
//!
//! - [`loader`]: one library: private copy, abi_stable layout check, ABI version, manifest.
//! - [`manager`]: the search directories, one active build per plugin id, the directory
//!   watcher and the reload queue ([`PluginManager::poll_reloads`]).
//! - [`strategy`]: [`StrategyInstance`], a configured strategy object with checked calls
//!   (`plan`, `forward_linear`, `forward_attention`, `delta_weight`, `export`, `on_step`,
//!   state, and `reload` onto a new build).

pub mod loader;
pub mod manager;
pub mod strategy;
pub mod trust;

use std::path::{Path, PathBuf};

pub use loader::{load_plugin, LoadError, LoadedPlugin, PluginManifest};
pub use manager::{default_target_dirs, DirOrigin, FileEntry, FileStatus, PluginManager, ReloadEvent, SearchDir};
pub use strategy::{check_plan, layer_to_abi, layers_to_abi, CallContext, ExportedLayer, PluginError, StrategyInstance};

/// Where to look for plugins (the `graft` command fills it from `--plugins`, `--plugin-config`
/// and `--no-default-plugins`).
#[derive(Debug, Clone, Default)]
pub struct PluginDirs {
    /// Folders with plugin libraries (*.so, *.dylib, *.dll), searched first.
    pub plugins: Vec<PathBuf>,
    /// A TOML file whose `[plugins] dirs = ["..."]` lists more plugin folders (relative to the
    /// file). Default: $GRAFT_CONFIG, else ./graft.toml when it exists.
    pub plugin_config: Option<PathBuf>,
    /// Do not search the workspace's target/release and target/debug.
    pub no_default_plugins: bool,
}

#[derive(serde::Deserialize)]
struct ConfigFile {
    plugins: Option<PluginsSection>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsSection {
    #[serde(default)]
    dirs: Vec<PathBuf>,
}

/// The plugin folders listed in a config file, resolved against the file's folder.
pub fn config_dirs(file: &Path) -> crate::Result<Vec<PathBuf>> {
    let io = |what: String, cause: Box<dyn std::error::Error + Send + Sync>| crate::Error::Io { what, path: Some(file.to_path_buf()), cause };
    let text = std::fs::read_to_string(file).map_err(|e| io(format!("cannot read config file {}", file.display()), e.into()))?;
    let config: ConfigFile = toml::from_str(&text)
        .map_err(|e| io(format!("config file {}: invalid [plugins] section (expected `dirs = [\"folder\", ...]`)", file.display()), e.into()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    Ok(config.plugins.map(|p| p.dirs).unwrap_or_default().into_iter().map(|d| base.join(d)).collect())
}

impl PluginDirs {
    /// The config file in effect, if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        if let Some(f) = &self.plugin_config {
            return Some(f.clone());
        }
        if let Some(f) = std::env::var_os("GRAFT_CONFIG") {
            return Some(PathBuf::from(f));
        }
        let local = PathBuf::from("graft.toml");
        local.is_file().then_some(local)
    }

    /// The search directories, in priority order. A `--plugins` folder that does not exist is
    /// an error; so is a config file that cannot be read.
    pub fn search_dirs(&self) -> crate::Result<Vec<SearchDir>> {
        let mut dirs = Vec::new();
        for d in &self.plugins {
            if !d.is_dir() {
                return Err(crate::Error::Config(format!("--plugins {}: not a folder", d.display())));
            }
            dirs.push(SearchDir { path: d.clone(), origin: DirOrigin::Flag });
        }
        if let Some(file) = self.config_file() {
            for d in config_dirs(&file)? {
                dirs.push(SearchDir { path: d, origin: DirOrigin::Config });
            }
        }
        if !self.no_default_plugins {
            dirs.extend(default_target_dirs().into_iter().map(|path| SearchDir { path, origin: DirOrigin::Default }));
        }
        Ok(dirs)
    }

    /// A manager over these directories, with every library loaded. Failures are logged as
    /// warnings (and kept in the manager's file list); they are not errors here.
    pub fn manager(&self) -> crate::Result<PluginManager> {
        let mut manager = PluginManager::new(self.search_dirs()?);
        for event in manager.scan() {
            // A broken library in a folder the user named is worth a warning; the default
            // target folders hold every cdylib of the workspace (test fixtures too), so their
            // failures only show in `graft plugins list` and in the error for a missing id.
            let named = |path: &Path| manager.files().get(path).is_some_and(|e| e.origin != DirOrigin::Default);
            match &event {
                ReloadEvent::Failed { error: LoadError::Untrusted(_), .. } => tracing::warn!("{event}"),
                ReloadEvent::Failed { path, error, .. } if named(path) && !matches!(error, LoadError::NotAPlugin(_)) => {
                    tracing::warn!("{event}")
                }
                _ => tracing::debug!("{event}"),
            }
        }
        Ok(manager)
    }
}

#[cfg(test)]
mod tests {
    /// The loop that owns them may live on another thread than the one that made them.
    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<super::LoadedPlugin>();
        send_sync::<super::StrategyInstance>();
        send::<super::PluginManager>();
        send_sync::<crate::adapters::store::ParamStore>();
    }
}
