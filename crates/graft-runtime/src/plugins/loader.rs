//! Loading one plugin library: private copy, abi_stable layout check, ABI version check,
//! manifest.
//!
//! The library is copied to a unique private path first: the OS hands back the already loaded
//! library for a path (or a hard link) it has seen, and overwriting a mapped library (cargo
//! rebuilding it) corrupts the code that runs from it. Loaded libraries are never unloaded:
//! abi_stable's layout checker keeps pointers into them, and strategy objects of an old build
//! may still be alive. Each reload therefore keeps its build mapped (about a megabyte of address
//! space and page cache for a small plugin). On Unix the private copy is deleted right after it
//! is mapped (the mapping stays valid), so no files pile up.

use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::ROption;
use abi_stable::std_types::{RResult, RSome, RStr};
use graft_abi::{
    ConfigSchemaExtensionV1, GraftError, OpsExtensionV1, PluginModRef, StrategyBox, ABI_VERSION, CONFIG_SCHEMA_EXTENSION,
    CONFIG_SCHEMA_EXTENSION_VERSION, OPS_EXTENSION, OPS_EXTENSION_VERSION,
};
use graft_sdk::schema::ConfigSchema;

/// File name endings of dynamic libraries on this platform family.
pub const LIBRARY_EXTENSIONS: [&str; 3] = ["so", "dylib", "dll"];

/// True when `path` names a dynamic library (by extension).
pub fn is_library(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| LIBRARY_EXTENSIONS.contains(&e))
}

/// The manifest of a loaded plugin, as plain Rust.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PluginManifest {
    pub id: String,
    pub version: String,
    pub abi_version: u32,
    pub description: String,
    pub capabilities: Vec<String>,
    pub config_example: String,
}

impl From<graft_abi::Manifest> for PluginManifest {
    fn from(m: graft_abi::Manifest) -> Self {
        Self {
            id: m.id.into_string(),
            version: m.version.into_string(),
            abi_version: m.abi_version,
            description: m.description.into_string(),
            capabilities: m.capabilities.into_iter().map(|c| c.into_string()).collect(),
            config_example: m.config_example.into_string(),
        }
    }
}

/// A plugin library loaded and checked.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub manifest: PluginManifest,
    /// The library as found in the plugin directory.
    pub source: PathBuf,
    /// The private copy that was mapped (deleted on Unix after mapping).
    pub private_copy: PathBuf,
    /// Hash of the library's bytes (a rebuild with the same bytes is skipped).
    pub hash: u64,
    /// SHA-256 of the library's bytes (hex), shown to the user to identify the build.
    pub sha256: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// Which load this is (unique in the process, grows).
    pub generation: u64,
    module: PluginModRef,
    /// The `graft.ops` extension (built with a graft-sdk that has it), already connected.
    pub ops_ext: Option<&'static OpsExtensionV1>,
    /// The strategy's config schema (`graft.config_schema` extension); none when the plugin
    /// describes none or predates the extension.
    pub config_schema: Option<ConfigSchema>,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("manifest", &self.manifest)
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .field("generation", &self.generation)
            .finish()
    }
}

impl LoadedPlugin {
    /// `id version`.
    pub fn label(&self) -> String {
        format!("{} {}", self.manifest.id, self.manifest.version)
    }

    /// The root module (for extensions).
    pub fn module(&self) -> PluginModRef {
        self.module
    }

    /// A strategy object for one configured run.
    pub fn new_strategy(&self, config_json: &str) -> Result<StrategyBox, GraftError> {
        match (self.module.new_strategy())(RStr::from(config_json)) {
            RResult::ROk(s) => Ok(s),
            RResult::RErr(e) => Err(e),
        }
    }
}

/// Finds the plugin's `graft.ops` extension, checks its layout against this host's and hands it
/// the host's extra ops. None for a plugin built before the extension existed.
fn connect_ops_extension(module: PluginModRef) -> Result<Option<&'static OpsExtensionV1>, LoadError> {
    let RSome(ext) = (module.extension())(OPS_EXTENSION.into(), OPS_EXTENSION_VERSION) else {
        return Ok(None);
    };
    let expected = <OpsExtensionV1 as abi_stable::StableAbi>::LAYOUT;
    if let Err(e) = abi_stable::abi_stability::abi_checking::check_layout_compatibility(expected, ext.layout) {
        return Err(LoadError::Incompatible(format!(
            "its `{OPS_EXTENSION}` extension version {OPS_EXTENSION_VERSION} differs from the host's: {}",
            first_lines(&e.to_string(), 3)
        )));
    }
    // SAFETY: the layout check above proved `module` points to an `OpsExtensionV1`; the plugin
    // leaks it, and the library stays loaded for the life of the process.
    let ext: &'static OpsExtensionV1 = unsafe { &*(ext.module as *const OpsExtensionV1) };
    (ext.connect)(&crate::adapters::ops::HOST_OPS_V1);
    Ok(Some(ext))
}

/// Reads the plugin's config schema through the `graft.config_schema` extension, after checking
/// the extension's layout. None for a plugin without one; an error for an unreadable schema.
fn read_config_schema(module: PluginModRef) -> Result<Option<ConfigSchema>, LoadError> {
    let RSome(ext) = (module.extension())(CONFIG_SCHEMA_EXTENSION.into(), CONFIG_SCHEMA_EXTENSION_VERSION) else {
        return Ok(None);
    };
    let expected = <ConfigSchemaExtensionV1 as abi_stable::StableAbi>::LAYOUT;
    if let Err(e) = abi_stable::abi_stability::abi_checking::check_layout_compatibility(expected, ext.layout) {
        return Err(LoadError::Incompatible(format!(
            "its `{CONFIG_SCHEMA_EXTENSION}` extension version {CONFIG_SCHEMA_EXTENSION_VERSION} differs from the host's: {}",
            first_lines(&e.to_string(), 3)
        )));
    }
    // SAFETY: the layout check above proved `module` points to a `ConfigSchemaExtensionV1`,
    // leaked by the plugin, whose library stays loaded for the life of the process.
    let ext: &'static ConfigSchemaExtensionV1 = unsafe { &*(ext.module as *const ConfigSchemaExtensionV1) };
    match (ext.config_schema)() {
        RResult::ROk(ROption::RNone) => Ok(None),
        RResult::ROk(ROption::RSome(json)) => {
            ConfigSchema::from_json(json.as_str()).map(Some).map_err(|e| LoadError::Manifest(format!("its config schema is unusable: {e}")))
        }
        RResult::RErr(e) => Err(LoadError::Manifest(format!("config_schema() failed: {e}"))),
    }
}

/// Why a library could not be used.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// The file could not be read or copied.
    Io(String),
    /// Not a graft plugin: not a loadable library, or no abi_stable root module in it.
    NotAPlugin(String),
    /// Built against an incompatible interface (abi_stable version, graft-abi version or type
    /// layout).
    Incompatible(String),
    /// Built for another graft ABI version.
    AbiVersion { found: u32 },
    /// The manifest could not be read or is invalid.
    Manifest(String),
    /// Not loaded because of the trust model: another user could have replaced it (see
    /// [`super::trust`]).
    Untrusted(String),
}

impl LoadError {
    /// A short status word for listings.
    pub fn status(&self) -> &'static str {
        match self {
            LoadError::Io(_) => "unreadable",
            LoadError::NotAPlugin(_) => "not a plugin",
            LoadError::Incompatible(_) => "incompatible",
            LoadError::AbiVersion { .. } => "wrong ABI",
            LoadError::Manifest(_) => "bad manifest",
            LoadError::Untrusted(_) => "refused",
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io(m) => write!(f, "cannot read the library: {m}"),
            LoadError::NotAPlugin(m) => write!(f, "not a graft plugin: {m}"),
            LoadError::Incompatible(m) => {
                write!(f, "built against an incompatible plugin interface; rebuild it against this graft's graft-sdk: {m}")
            }
            LoadError::AbiVersion { found } => {
                write!(f, "built for graft plugin ABI {found}, this host speaks ABI {ABI_VERSION}; rebuild it against this graft's graft-sdk")
            }
            LoadError::Manifest(m) => write!(f, "its manifest is unusable: {m}"),
            LoadError::Untrusted(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Hash of a library's bytes.
pub fn content_hash(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: fast (std is optimised) and stable within the process, which
    // is all change detection needs.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write(bytes);
    h.finish()
}

/// The first line of a (possibly long, multi-line) abi_stable error, plus the full text.
fn library_error(e: LibraryError) -> LoadError {
    match e {
        LibraryError::OpenError { err, .. } => LoadError::NotAPlugin(format!(
            "the system cannot load it as a dynamic library (from its private copy): {}",
            first_lines(&err.to_string(), 2)
        )),
        LibraryError::GetSymbolError { .. } => {
            LoadError::NotAPlugin("it exports no abi_stable root module (build it with graft_sdk::export_strategy!)".to_string())
        }
        LibraryError::InvalidAbiHeader(_) => LoadError::Incompatible(format!("its abi_stable version differs from the host's: {e}")),
        LibraryError::IncompatibleVersionNumber { .. } | LibraryError::ParseVersionError(_) => {
            LoadError::Incompatible(format!("its graft-abi version differs from the host's: {e}"))
        }
        LibraryError::AbiInstability(_) => {
            let full = e.to_string();
            tracing::debug!("layout check failed:\n{full}");
            LoadError::Incompatible(format!(
                "the layout of its plugin interface differs from the host's ({}); RUST_LOG=debug prints the full comparison",
                summarize_layout_error(&full)
            ))
        }
        LibraryError::RootModule { .. } => LoadError::Manifest(format!("its root module failed to initialise: {e}")),
        other => LoadError::Incompatible(other.to_string()),
    }
}

/// The gist of abi_stable's (very long) layout comparison: its last `Error:` block, e.g.
/// "mismatched package: expected graft-abi, found other-abi".
fn summarize_layout_error(text: &str) -> String {
    let Some(at) = text.rfind("Error:") else {
        return first_lines(text, 3);
    };
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let block = &text[at + "Error:".len()..];
    let (desc, rest) = block.split_once("Expected:").unwrap_or((block, ""));
    let (expected, found) = rest.split_once("Found:").unwrap_or((rest, ""));
    let mut out = words(desc);
    if !expected.trim().is_empty() {
        out.push_str(&format!(": expected {}, found {}", words(expected), words(found)));
    }
    out
}

fn first_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join(" ")
}

/// Loads the library at `path` from a private copy in `private_dir`, checks its layout, its
/// ABI version and its manifest.
pub fn load_plugin(path: &Path, private_dir: &Path, generation: u64) -> Result<LoadedPlugin, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    load_plugin_bytes(path, &bytes, modified, private_dir, generation)
}

/// Like [`load_plugin`] with the bytes already read.
pub fn load_plugin_bytes(
    path: &Path,
    bytes: &[u8],
    modified: Option<SystemTime>,
    private_dir: &Path,
    generation: u64,
) -> Result<LoadedPlugin, LoadError> {
    super::trust::check_library(path).map_err(LoadError::Untrusted)?;
    let hash = content_hash(bytes);
    super::trust::create_private_dir(private_dir)
        .map_err(|e| LoadError::Io(format!("cannot create the private plugin folder {}: {e}", private_dir.display())))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("so");
    let private_copy = private_dir.join(format!("{stem}.g{generation}.{hash:016x}.{ext}"));
    if let Err(e) = std::fs::write(&private_copy, bytes) {
        // A full disk leaves a partial file; it must not pile up across loads.
        let _ = std::fs::remove_file(&private_copy);
        return Err(LoadError::Io(format!("cannot write the private copy {}: {e}", private_copy.display())));
    }
    // Whoever can write the private folder could swap the copy before it is mapped.
    if let Err(why) = super::trust::private_dir_ok(private_dir, Some(&private_copy)) {
        let _ = std::fs::remove_file(&private_copy);
        return Err(LoadError::Untrusted(format!("refused: the private plugin folder is unsafe: {why}")));
    }

    let header = lib_header_from_path(&private_copy);
    // The mapping keeps the file's contents alive; on Unix the name can go now.
    if cfg!(unix) {
        let _ = std::fs::remove_file(&private_copy);
    }
    let header = header.map_err(library_error)?;
    // Checks the graft-abi version strings and the layout of every type reachable from the
    // root module, then runs the module's constructor.
    let module = header.init_root_module::<PluginModRef>().map_err(library_error)?;

    let found = (module.abi_version())();
    if found != ABI_VERSION {
        return Err(LoadError::AbiVersion { found });
    }
    let manifest: PluginManifest = match (module.manifest())() {
        RResult::ROk(m) => m.into(),
        RResult::RErr(e) => return Err(LoadError::Manifest(format!("manifest() failed: {e}"))),
    };
    if manifest.abi_version != ABI_VERSION {
        return Err(LoadError::AbiVersion { found: manifest.abi_version });
    }
    if manifest.id.is_empty() || !manifest.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(LoadError::Manifest(format!("invalid id {:?}: use letters, digits, `-`, `_` and `.`", manifest.id)));
    }
    let ops_ext = connect_ops_extension(module)?;
    let config_schema = read_config_schema(module)?;
    Ok(LoadedPlugin {
        manifest,
        ops_ext,
        config_schema,
        source: path.to_path_buf(),
        private_copy,
        hash,
        sha256: super::trust::sha256_hex(bytes),
        size: bytes.len() as u64,
        modified,
        generation,
        module,
    })
}
