//! Finding, loading and hot-reloading plugin libraries.
//!
//! The manager searches plugin directories (from `--plugins`, a config file, and by default the
//! workspace's `target/release` and `target/debug`) for `*.so` / `*.dylib` / `*.dll`, loads each
//! (see [`super::loader`]) and keeps one active build per plugin id. With [`PluginManager::watch`]
//! it watches the directories (not the files: cargo replaces the file's inode) through
//! notify-debouncer-full; changes queue up until [`PluginManager::poll_reloads`], which the
//! training and generation loops call between steps or requests. A changed library whose bytes
//! are unchanged is skipped; one that fails to load is reported and the old build keeps running.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

use super::loader::{content_hash, is_library, load_plugin_bytes, LoadError, LoadedPlugin};

/// Load numbers are unique in the process, so private copies never collide.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
static NEXT_MANAGER: AtomicU64 = AtomicU64::new(0);

/// How long the watcher waits for a directory to go quiet before it reports a change.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Where a search directory came from; earlier origins win when two libraries have one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum DirOrigin {
    /// `--plugins DIR`
    Flag,
    /// A config file's `[plugins] dirs`.
    Config,
    /// The workspace's target/release or target/debug.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SearchDir {
    pub path: PathBuf,
    pub origin: DirOrigin,
}

/// What happened to a library file.
#[derive(Debug, Clone, PartialEq)]
pub enum FileStatus {
    /// The build in use for its id.
    Active,
    /// Loaded fine, but another library with the same id wins.
    Shadowed { by: PathBuf },
    /// Not loadable.
    Failed(LoadError),
    /// The file was deleted (a build loaded from it keeps running).
    Removed,
}

/// A library file the manager has seen.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub path: PathBuf,
    pub origin: DirOrigin,
    pub status: FileStatus,
    /// Hash of the bytes last looked at.
    pub hash: Option<u64>,
    /// The last successful load from this file.
    pub plugin: Option<LoadedPlugin>,
}

/// A change reported by [`PluginManager::scan`] or [`PluginManager::poll_reloads`].
#[derive(Debug, Clone)]
pub enum ReloadEvent {
    /// A plugin id appeared.
    Loaded { id: String, version: String, path: PathBuf },
    /// A new build of a plugin id replaced the active one: switch strategies to it (see
    /// `StrategyInstance::reload`).
    /// `old_build` and `new_build` tell builds of one version apart: the first 12 hex digits of
    /// each library's SHA-256.
    Reloaded { id: String, old_version: String, new_version: String, old_build: String, new_build: String, path: PathBuf, generation: u64 },
    /// Loaded, but another library with the same id stays in use.
    Shadowed { id: String, path: PathBuf, by: PathBuf },
    /// The library could not be loaded; `still_running` is the build that stays in use.
    Failed { path: PathBuf, error: LoadError, still_running: Option<String> },
    /// The library file was deleted; `still_running` is the build that stays in use.
    Removed { path: PathBuf, still_running: Option<String> },
}

impl fmt::Display for ReloadEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadEvent::Loaded { id, version, path } => write!(f, "loaded plugin {id} {version} from {}", path.display()),
            ReloadEvent::Reloaded { id, old_version, new_version, old_build, new_build, path, generation } => write!(
                f,
                "reloaded plugin {id}: {old_version} (build {old_build}) -> {new_version} (build {new_build}) from {} (load #{generation})",
                path.display()
            ),
            ReloadEvent::Shadowed { id, path, by } => {
                write!(f, "plugin {id} at {} is shadowed by {}", path.display(), by.display())
            }
            ReloadEvent::Failed { path, error, still_running } => {
                write!(f, "plugin library {} failed to load: {error}", path.display())?;
                if let Some(p) = still_running {
                    write!(f, " (plugin {p} keeps running)")?;
                }
                Ok(())
            }
            ReloadEvent::Removed { path, still_running } => {
                write!(f, "plugin library {} was removed", path.display())?;
                if let Some(p) = still_running {
                    write!(f, " (plugin {p} keeps running)")?;
                }
                Ok(())
            }
        }
    }
}

struct DirWatcher {
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    rx: mpsc::Receiver<DebounceEventResult>,
}

/// The plugins of a running host.
pub struct PluginManager {
    dirs: Vec<SearchDir>,
    private_dir: PathBuf,
    active: BTreeMap<String, LoadedPlugin>,
    files: BTreeMap<PathBuf, FileEntry>,
    watcher: Option<DirWatcher>,
}

impl fmt::Debug for PluginManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginManager")
            .field("dirs", &self.dirs)
            .field("active", &self.active.keys().collect::<Vec<_>>())
            .field("watching", &self.watcher.is_some())
            .finish()
    }
}

/// The workspace `target` directories near the running program and the working directory:
/// `$CARGO_TARGET_DIR`, the `target` folder the executable runs from, `./target`.
pub fn default_target_dirs() -> Vec<PathBuf> {
    let target_env = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    let (exe, cwd) = (std::env::current_exe().ok(), std::env::current_dir().ok());
    default_dirs_for(target_env.as_deref(), exe.as_deref(), cwd.as_deref()).into_iter().filter(|d| d.is_dir()).collect()
}

/// [`default_target_dirs`] before the existence check: the running executable's own folder (a
/// binary copied elsewhere, or built into another target folder, with its plugins beside it),
/// then `release` and `debug` under `$CARGO_TARGET_DIR`, under the `target` folder the
/// executable sits in, and under `./target`. Cargo's `deps` folders (test binaries) are left
/// out: they hold every dependency's library.
fn default_dirs_for(target_env: Option<&Path>, exe: Option<&Path>, cwd: Option<&Path>) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(folder) = exe.and_then(Path::parent).filter(|f| f.file_name().is_some_and(|n| n != "deps")) {
        candidates.push(folder.to_path_buf());
    }
    let mut roots: Vec<PathBuf> = target_env.map(Path::to_path_buf).into_iter().collect();
    if let Some(t) = exe.and_then(|e| e.ancestors().find(|a| a.file_name().is_some_and(|n| n == "target"))) {
        roots.push(t.to_path_buf());
    }
    roots.extend(cwd.map(|c| c.join("target")));
    for root in roots {
        candidates.extend(["release", "debug"].iter().map(|p| root.join(p)));
    }
    let mut seen = BTreeSet::new();
    candidates.into_iter().filter(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone()))).collect()
}

/// The private copies are unlinked once mapped (Unix); their folder goes with the manager.
/// Elsewhere a copy still mapped stays, and so does the folder.
impl Drop for PluginManager {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.private_dir);
    }
}

impl PluginManager {
    /// A manager over `dirs` (nothing loaded yet: call [`Self::scan`]).
    pub fn new(dirs: Vec<SearchDir>) -> Self {
        let n = NEXT_MANAGER.fetch_add(1, Ordering::Relaxed);
        let private_dir = std::env::temp_dir().join(format!("graft-plugins-{}-{n}", std::process::id()));
        let mut unique = Vec::new();
        for mut d in dirs {
            // Absolute and canonical, so the watcher's event paths compare equal.
            if let Ok(c) = d.path.canonicalize() {
                d.path = c;
            }
            if !unique.iter().any(|u: &SearchDir| u.path == d.path) {
                unique.push(d);
            }
        }
        Self { dirs: unique, private_dir, active: BTreeMap::new(), files: BTreeMap::new(), watcher: None }
    }

    pub fn dirs(&self) -> &[SearchDir] {
        &self.dirs
    }

    /// Every library file seen, by path.
    pub fn files(&self) -> &BTreeMap<PathBuf, FileEntry> {
        &self.files
    }

    /// The active build of each plugin id.
    pub fn plugins(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.active.values()
    }

    pub fn get(&self, id: &str) -> Option<&LoadedPlugin> {
        self.active.get(id)
    }

    /// The active build of `id`, or an error listing what was found and what failed.
    pub fn require(&self, id: &str) -> crate::Result<&LoadedPlugin> {
        if let Some(p) = self.active.get(id) {
            return Ok(p);
        }
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.path.display().to_string()).collect();
        let mut msg = format!("no plugin with id `{id}` in {}", if dirs.is_empty() { "any plugin folder".to_string() } else { dirs.join(", ") });
        if self.active.is_empty() {
            msg.push_str("; no plugin was found");
        } else {
            let ids: Vec<&str> = self.active.keys().map(String::as_str).collect();
            msg.push_str(&format!("; available: {}", ids.join(", ")));
        }
        for e in self.files.values() {
            if let FileStatus::Failed(err) = &e.status {
                msg.push_str(&format!("\n  {} failed: {err}", e.path.display()));
            }
        }
        msg.push_str("\n(build the plugin with `cargo build -p <crate>`, or point --plugins at its folder)");
        Err(crate::Error::NoPlugin { id: id.to_string(), message: msg })
    }

    fn library_files(&self) -> Vec<(PathBuf, DirOrigin)> {
        let mut out = Vec::new();
        for d in &self.dirs {
            let Ok(rd) = std::fs::read_dir(&d.path) else {
                tracing::debug!("plugin folder {} is not readable; skipped", d.path.display());
                continue;
            };
            let mut found: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file() && is_library(p)).collect();
            found.sort();
            out.extend(found.into_iter().map(|p| (p, d.origin)));
        }
        out
    }

    fn origin_of(&self, path: &Path) -> Option<DirOrigin> {
        let parent = path.parent()?;
        self.dirs.iter().find(|d| d.path == parent).map(|d| d.origin)
    }

    /// Loads every library in the search directories (the first scan, or a manual rescan).
    pub fn scan(&mut self) -> Vec<ReloadEvent> {
        let files = self.library_files();
        let mut events = Vec::new();
        for (path, origin) in files {
            events.extend(self.process(&path, origin));
        }
        events
    }

    /// Loads (or reloads) one library file that lies in a search directory or anywhere else.
    pub fn load_file(&mut self, path: &Path) -> Option<ReloadEvent> {
        let origin = self.origin_of(path).unwrap_or(DirOrigin::Flag);
        self.process(path, origin)
    }

    /// True when the library at `a` (origin, modified) should win over the active build `b`.
    fn wins(&self, origin: DirOrigin, modified: Option<SystemTime>, current: &LoadedPlugin) -> bool {
        let current_origin = self.files.get(&current.source).map(|e| e.origin).unwrap_or(DirOrigin::Default);
        if origin != current_origin {
            return origin < current_origin;
        }
        // Same origin: the newest build wins.
        modified >= current.modified
    }

    fn process(&mut self, path: &Path, origin: DirOrigin) -> Option<ReloadEvent> {
        let previous_id = self.files.get(path).and_then(|e| e.plugin.as_ref()).map(|p| p.manifest.id.clone());
        let running = |m: &Self| previous_id.as_ref().and_then(|id| m.active.get(id)).map(|p| p.label());

        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let entry = self.files.get_mut(path)?;
                if entry.status == FileStatus::Removed {
                    return None;
                }
                entry.status = FileStatus::Removed;
                entry.hash = None;
                return Some(ReloadEvent::Removed { path: path.to_path_buf(), still_running: running(self) });
            }
            Err(e) => {
                let error = LoadError::Io(format!("{}: {e}", path.display()));
                return Some(self.failed(path, origin, None, error, running(self)));
            }
        };
        let hash = content_hash(&bytes);
        if let Some(entry) = self.files.get(path) {
            if entry.hash == Some(hash) {
                tracing::debug!("plugin library {} changed on disk but its bytes did not; skipped", path.display());
                return None;
            }
        }
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let plugin = match load_plugin_bytes(path, &bytes, modified, &self.private_dir, generation) {
            Ok(p) => p,
            // A refused library is looked at again on the next change (a chmod fixes it).
            Err(error @ LoadError::Untrusted(_)) => return Some(self.failed(path, origin, None, error, running(self))),
            Err(error) => return Some(self.failed(path, origin, Some(hash), error, running(self))),
        };

        let id = plugin.manifest.id.clone();
        let entry = FileEntry { path: path.to_path_buf(), origin, status: FileStatus::Active, hash: Some(hash), plugin: Some(plugin.clone()) };
        self.files.insert(path.to_path_buf(), entry);

        let event = match self.active.get(&id) {
            None => ReloadEvent::Loaded { id: id.clone(), version: plugin.manifest.version.clone(), path: path.to_path_buf() },
            Some(current) if current.source == path || self.wins(origin, modified, current) => {
                let old_source = current.source.clone();
                if old_source != path {
                    if let Some(e) = self.files.get_mut(&old_source) {
                        e.status = FileStatus::Shadowed { by: path.to_path_buf() };
                    }
                }
                ReloadEvent::Reloaded {
                    id: id.clone(),
                    old_version: current.manifest.version.clone(),
                    new_version: plugin.manifest.version.clone(),
                    old_build: current.sha256.chars().take(12).collect(),
                    new_build: plugin.sha256.chars().take(12).collect(),
                    path: path.to_path_buf(),
                    generation,
                }
            }
            Some(current) => {
                let by = current.source.clone();
                if let Some(e) = self.files.get_mut(path) {
                    e.status = FileStatus::Shadowed { by: by.clone() };
                }
                return Some(ReloadEvent::Shadowed { id, path: path.to_path_buf(), by });
            }
        };
        self.active.insert(id, plugin);
        Some(event)
    }

    fn failed(&mut self, path: &Path, origin: DirOrigin, hash: Option<u64>, error: LoadError, still_running: Option<String>) -> ReloadEvent {
        let entry = self.files.entry(path.to_path_buf()).or_insert_with(|| FileEntry {
            path: path.to_path_buf(),
            origin,
            status: FileStatus::Removed,
            hash: None,
            plugin: None,
        });
        entry.status = FileStatus::Failed(error.clone());
        entry.hash = hash;
        ReloadEvent::Failed { path: path.to_path_buf(), error, still_running }
    }

    /// Starts watching the search directories. Changes are queued until
    /// [`Self::poll_reloads`]. Directories that do not exist are skipped with a warning.
    pub fn watch(&mut self) -> crate::Result<()> {
        if self.watcher.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let mut debouncer = new_debouncer(DEBOUNCE, None, tx).map_err(|e| crate::Error::Io {
            what: "cannot start the plugin folder watcher".to_string(),
            path: None,
            cause: Box::new(e),
        })?;
        for d in &self.dirs {
            if !d.path.is_dir() {
                tracing::warn!("plugin folder {} does not exist; not watched", d.path.display());
                continue;
            }
            debouncer.watch(&d.path, RecursiveMode::NonRecursive).map_err(|e| crate::Error::Io {
                what: format!("cannot watch plugin folder {}", d.path.display()),
                path: Some(d.path.clone()),
                cause: Box::new(e),
            })?;
        }
        self.watcher = Some(DirWatcher { _debouncer: debouncer, rx });
        Ok(())
    }

    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// The library paths touched by queued watcher events (create / modify / remove / rename
    /// only: notify also reports opens and reads).
    fn collect(&self, batch: DebounceEventResult, into: &mut BTreeSet<PathBuf>) {
        match batch {
            Ok(events) => {
                for ev in events {
                    let relevant = matches!(ev.event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_));
                    if !relevant {
                        continue;
                    }
                    for p in &ev.event.paths {
                        if is_library(p) && self.origin_of(p).is_some() {
                            into.insert(p.clone());
                        }
                    }
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!("plugin folder watcher: {e}");
                }
            }
        }
    }

    fn process_paths(&mut self, paths: BTreeSet<PathBuf>) -> Vec<ReloadEvent> {
        let mut events = Vec::new();
        for p in paths {
            let origin = self.origin_of(&p).unwrap_or(DirOrigin::Default);
            events.extend(self.process(&p, origin));
        }
        events
    }

    /// Applies the queued library changes and returns what happened. Never blocks. Call it
    /// between training steps or generation requests, then switch the strategies of every
    /// `Reloaded` id (`StrategyInstance::reload`).
    pub fn poll_reloads(&mut self) -> Vec<ReloadEvent> {
        let mut paths = BTreeSet::new();
        if let Some(w) = &self.watcher {
            let batches: Vec<DebounceEventResult> = w.rx.try_iter().collect();
            for b in batches {
                self.collect(b, &mut paths);
            }
        }
        self.process_paths(paths)
    }

    /// Like [`Self::poll_reloads`], but waits up to `timeout` for a change that produces an
    /// event (changes whose bytes are unchanged do not count).
    pub fn wait_reloads(&mut self, timeout: Duration) -> Vec<ReloadEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut paths = BTreeSet::new();
            let Some(w) = &self.watcher else {
                return Vec::new();
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let first = match w.rx.recv_timeout(left) {
                Ok(b) => b,
                Err(_) => return Vec::new(),
            };
            let rest: Vec<DebounceEventResult> = w.rx.try_iter().collect();
            self.collect(first, &mut paths);
            for b in rest {
                self.collect(b, &mut paths);
            }
            let events = self.process_paths(paths);
            if !events.is_empty() || Instant::now() >= deadline {
                return events;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executables_folder_comes_first_and_deps_folders_never() {
        let dirs = default_dirs_for(None, Some(Path::new("/opt/graft/bin/graft")), Some(Path::new("/work")));
        assert_eq!(dirs, ["/opt/graft/bin", "/work/target/release", "/work/target/debug"].map(PathBuf::from));
        let dirs = default_dirs_for(Some(Path::new("/t")), Some(Path::new("/w/target/debug/deps/test-123")), Some(Path::new("/w")));
        assert_eq!(dirs, ["/t/release", "/t/debug", "/w/target/release", "/w/target/debug"].map(PathBuf::from));
    }

    /// Every test host makes a manager; their private folders must not fill the disk.
    #[test]
    fn the_private_folder_goes_with_the_manager() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libnot_a_plugin.so"), b"not a library").unwrap();
        let mut m = PluginManager::new(vec![SearchDir { path: dir.path().to_path_buf(), origin: DirOrigin::Flag }]);
        let events = m.scan();
        assert!(matches!(events.as_slice(), [ReloadEvent::Failed { .. }]), "{events:?}");
        let private = m.private_dir.clone();
        assert!(private.is_dir());
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0, "the copy of a library that failed to load stays behind");
        drop(m);
        assert!(!private.exists());
    }
}
