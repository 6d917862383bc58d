//! The trainer's errors that are not tensor errors: what was wrong, in words that name the
//! key, file or group, and what to do. Callers see the kind. A variant that wraps another
//! error (its `cause`) puts that error's text in its own message rather than behind
//! `source()`, so `{}` is the whole story and the binary's `{:#}` does not say it twice.

use std::path::{Path, PathBuf};

/// Any error a reader, writer or parser of a file gives (io, image, PNG, JSON, TOML).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// An error of training: the datasets, caches, buckets and optimizers, the trainer, the
/// session, checkpoints, samples and exports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot be used (an option, an optimizer, its arguments or groups, the
    /// buckets, a training config).
    #[error("{0}")]
    Config(String),
    /// The dataset: its config, its files, its images.
    #[error("{0}")]
    Dataset(String),
    /// Saved state that cannot be used or written: an optimizer state file, a cache folder, a
    /// checkpoint, a loss log.
    #[error("{0}")]
    State(String),
    /// A sample prompt (file) that cannot be used, or images that cannot be put in a grid.
    #[error("{0}")]
    Sample(String),
    /// An export of a strategy that cannot be written.
    #[error("{0}")]
    Export(String),
    /// A file or folder that cannot be read, written or parsed; `what` names it.
    #[error("{what}: {cause}")]
    Io { what: String, path: PathBuf, cause: Cause },
    /// The model could not be loaded.
    #[error("loading model {}: {cause}", path.display())]
    Model { path: PathBuf, cause: graft_sdxl::LoadError },
    /// The runtime failed: a plugin, the adapter set, the parameter store (boxed: it is large).
    #[error(transparent)]
    Runtime(Box<graft_runtime::Error>),
    /// Where an error happened (a step, a line of a file, a layer, a sample): `cause` says what.
    #[error("{what}: {cause}")]
    At { what: String, cause: Box<Error> },
    /// A broken invariant of graft itself.
    #[error("{0}")]
    Internal(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<graft_runtime::Error> for Error {
    fn from(e: graft_runtime::Error) -> Self {
        Error::Runtime(Box::new(e))
    }
}

impl From<graft_runtime::plugins::PluginError> for Error {
    fn from(e: graft_runtime::plugins::PluginError) -> Self {
        Error::Runtime(Box::new(e.into()))
    }
}

impl Error {
    /// This error, as happening at `what` (a step, a line, a layer).
    pub fn at(self, what: impl Into<String>) -> Error {
        Error::At { what: what.into(), cause: Box::new(self) }
    }
}

/// For `map_err`: a read / write / parse failure of `path`, described by `what`.
pub(crate) fn io<E: Into<Cause>>(what: impl Into<String>, path: &Path) -> impl FnOnce(E) -> Error {
    let (what, path) = (what.into(), path.to_path_buf());
    move |e| Error::Io { what, path, cause: e.into() }
}

/// `Result::context` for the trainer's errors: says where an error happened.
pub(crate) trait At<T> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> At<T> for std::result::Result<T, E> {
    fn at(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.into().at(what()))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
