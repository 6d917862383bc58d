//! The runtime's errors: what failed, naming the strategy, layer, parameter, file or folder.
//! Callers match on the kind. A variant that wraps another error (its `cause`) puts that
//! error's text in its own message rather than behind `source()`, so `{}` is the whole story
//! and the binary's `{:#}` does not say it twice.

use std::path::PathBuf;

use graft_sdxl::overrides::OverrideError;

use crate::adapters::store::ParamKey;
use crate::plugins::PluginError;

/// An error of the adapter set, the file adapters, the parameter store or the plugin loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A plugin entry point failed (or returned something the host cannot use). Boxed, as
    /// the variants below with a parameter key: they would make every `Result` large.
    #[error(transparent)]
    Plugin(Box<PluginError>),
    /// No active plugin has this id; the message lists what was found and what failed.
    #[error("{message}")]
    NoPlugin { id: String, message: String },
    /// A strategy's plan the runtime cannot use.
    #[error("plan of strategy `{strategy}`: {problem}")]
    Plan { strategy: String, layer: Option<String>, problem: String },
    /// A directive or request of a strategy that the runtime cannot carry out.
    #[error("{problem}")]
    Strategy { strategy: String, layer: Option<String>, problem: String },
    /// Two strategies of one set under one name.
    #[error("a strategy named `{0}` is already in use: give the second one another name")]
    DuplicateStrategy(String),
    /// A layer name that is no hook point of the model.
    #[error("no hook point named `{0}`")]
    NoLayer(String),
    /// A base-weight change at a hook point without a linear or conv weight.
    #[error("`{0}` is not a linear layer")]
    NotLinear(String),
    /// A base-weight override refused by the layer's stack (popped under another owner's, ...).
    #[error(transparent)]
    Override(#[from] OverrideError),
    /// A strategy could not be taken out of the model: `cause` says which layer refused.
    #[error("eject of strategy `{strategy}`: {cause}")]
    Eject { strategy: String, cause: Box<OverrideError> },
    /// Eject while the set's adapters are fused.
    #[error("eject of strategy `{0}` while adapters are fused: unfuse first")]
    EjectFused(String),
    /// No parameter with this key in the store.
    #[error("no parameter {0} in the store")]
    NoParam(ParamKey),
    /// A parameter asked for in another shape than it has.
    #[error("parameter {key} exists with shape {have:?}, asked for {want:?}")]
    ParamShape { key: Box<ParamKey>, have: Vec<usize>, want: Vec<usize> },
    /// A value for a parameter in another shape than it has.
    #[error("parameter {key} has shape {have:?}, the new value {value:?}")]
    ValueShape { key: Box<ParamKey>, have: Vec<usize>, value: Vec<usize> },
    /// An init a parameter cannot be made with.
    #[error("parameter {key}: {problem}")]
    ParamInit { key: ParamKey, problem: String },
    /// An init kind this host does not know.
    #[error("unknown parameter init kind `{0}` (this host knows zeros, normal, kaiming_uniform, constant, from_layer)")]
    UnknownInit(String),
    /// Setting a parameter failed: `cause` says why.
    #[error("parameter {key}: {cause}")]
    SetParam { key: ParamKey, cause: Box<Error> },
    /// An adapter file that does not fit this model or cannot be used here.
    #[error("{}: {problem}", path.display())]
    AdapterFile { path: PathBuf, layer: Option<String>, problem: String },
    /// An adapter file's module that its format's checks refuse.
    #[error("{}: {cause}", path.display())]
    AdapterModule { path: PathBuf, cause: candle_core::Error },
    /// An adapter file's entry or parameter that could not be used: `cause` says why.
    #[error("{}: {what}: {cause}", path.display())]
    InFile { path: PathBuf, what: String, cause: Box<Error> },
    /// An adapter file that could not be read (the reader's message names the file).
    #[error(transparent)]
    Read(candle_core::Error),
    /// A file adapter index that is not loaded.
    #[error("no file adapter number {0}")]
    NoFileAdapter(usize),
    /// Weights an adapter cannot be applied at.
    #[error("adapter `{name}`: weights must be finite numbers, got te {te}, unet {unet}")]
    AdapterWeights { name: String, te: f64, unet: f64 },
    /// A file or folder that cannot be read, or a watcher that cannot start.
    #[error("{what}: {cause}")]
    Io { what: String, path: Option<PathBuf>, cause: Box<dyn std::error::Error + Send + Sync> },
    /// A config file or flag that cannot be used.
    #[error("{0}")]
    Config(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        Error::Plugin(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
