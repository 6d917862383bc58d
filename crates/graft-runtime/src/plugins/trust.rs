//! The plugin trust model, enforced.
//!
//! A plugin is native code that runs with the rights of the user who runs graft. graft loads
//! plugins only from the folders it is told about (`--plugins`, a config file's `[plugins] dirs`,
//! the workspace's `target/{release,debug}` unless `--no-default-plugins`), shows each library's
//! path and SHA-256 (`graft plugins list`, `graft plugins check`, the training log), and refuses a
//! library that any other user could have replaced: one in a folder, or itself, writable by
//! everyone (Unix permissions). `GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS=1` overrides the refusal with a
//! warning on every load, for setups that knowingly share a plugin folder. A folder or library
//! writable by its group is loaded with a warning: with the user-private groups of most Linux
//! systems (umask 002) the group is the user alone.
//!
//! See docs/RELIABILITY.md.

use std::path::Path;

use sha2::{Digest, Sha256};

/// The environment variable that lets graft load libraries from folders writable by others.
pub const ALLOW_WRITABLE_ENV: &str = "GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS";

/// SHA-256 of a library's bytes, in hex: what `graft plugins list` shows, to compare with a
/// known build (`sha256sum target/debug/libmy_plugin.so`).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// True when the override is set (`GRAFT_ALLOW_WRITABLE_PLUGIN_DIRS=1`).
pub fn writable_allowed() -> bool {
    std::env::var_os(ALLOW_WRITABLE_ENV).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A library that users other than its owner can replace.
#[derive(Debug, Clone, PartialEq)]
pub struct Writable {
    /// Which file or folder, by whom, its mode.
    pub reason: String,
    /// Writable by everyone (not only by the group).
    pub everyone: bool,
}

/// Whether `path` (a library) could be replaced by another user: the file, its folder, or (for a
/// symbolic link) the real file or its folder is writable by group or others. Everyone-writable
/// wins over group-writable in the answer.
#[cfg(unix)]
pub fn writable_by_others(path: &Path) -> Option<Writable> {
    use std::os::unix::fs::PermissionsExt;
    let mut checks = vec![(path.to_path_buf(), "library")];
    if let Some(dir) = path.parent() {
        checks.push((dir.to_path_buf(), "folder"));
    }
    if let Ok(real) = path.canonicalize() {
        if let Some(dir) = real.parent() {
            checks.push((dir.to_path_buf(), "folder"));
        }
        checks.push((real, "library"));
    }
    let mut found: Option<Writable> = None;
    for (p, what) in checks {
        let p = if p.as_os_str().is_empty() { Path::new(".").to_path_buf() } else { p };
        let Some(mode) = std::fs::metadata(&p).ok().map(|m| m.permissions().mode()) else { continue };
        if mode & 0o022 == 0 {
            continue;
        }
        let everyone = mode & 0o002 != 0;
        if found.as_ref().is_some_and(|f| f.everyone || !everyone) {
            continue;
        }
        found = Some(Writable {
            reason: format!(
                "the {what} {} is writable by {} (mode {:o}), so another user could replace the plugin's code",
                p.display(),
                if everyone { "everyone" } else { "its group" },
                mode & 0o7777
            ),
            everyone,
        });
    }
    found
}

#[cfg(not(unix))]
pub fn writable_by_others(_path: &Path) -> Option<Writable> {
    None
}

/// Checks that `path` may be loaded: `Err(reason)` when it is writable by everyone and the
/// override is not set. With the override, or when only its group may write it, a warning is
/// logged and it may.
pub fn check_library(path: &Path) -> Result<(), String> {
    let Some(w) = writable_by_others(path) else { return Ok(()) };
    if !w.everyone {
        tracing::warn!("loading plugin {} although {}", path.display(), w.reason);
        return Ok(());
    }
    if writable_allowed() {
        tracing::warn!("loading plugin {} although {} ({ALLOW_WRITABLE_ENV} is set)", path.display(), w.reason);
        return Ok(());
    }
    Err(format!("refused: {}; make it writable only by you (chmod o-w), or set {ALLOW_WRITABLE_ENV}=1 to load it anyway", w.reason))
}

/// Makes sure `dir` (where private copies of libraries go) is a folder only this user can write:
/// created with mode 0700 when missing; an existing one that is a symbolic link, is writable by
/// others or belongs to someone else (`probe`, a file just written there, tells the owner) is
/// refused, because whoever can write there could swap a library between its copy and its load.
#[cfg(unix)]
pub fn private_dir_ok(dir: &Path, probe: Option<&Path>) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder (a symbolic link?)", dir.display()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!("{} is writable by other users", dir.display()));
    }
    if let Some(p) = probe {
        let owner = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?.uid();
        if owner != meta.uid() {
            return Err(format!("{} belongs to another user", dir.display()));
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn private_dir_ok(_dir: &Path, _probe: Option<&Path>) -> Result<(), String> {
    Ok(())
}

/// Creates `dir` for private copies (mode 0700 on Unix) if it does not exist.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writable_folders_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libx.so");
        std::fs::write(&lib, b"x").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(writable_by_others(&lib), None);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let w = writable_by_others(&lib).unwrap();
        assert!(w.everyone && w.reason.contains("folder") && w.reason.contains("everyone") && w.reason.contains("777"), "{w:?}");
        assert!(check_library(&lib).unwrap_err().contains("chmod o-w"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o775)).unwrap();
        let w = writable_by_others(&lib).unwrap();
        assert!(!w.everyone && w.reason.contains("library") && w.reason.contains("its group"), "{w:?}");
        assert!(check_library(&lib).is_ok(), "group-writable: a warning only");
    }

    #[test]
    fn private_dirs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("private");
        create_private_dir(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(private_dir_ok(&p, None).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir_ok(&p, None).unwrap_err().contains("writable"));
    }

    #[test]
    fn sha256_of_known_bytes() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
