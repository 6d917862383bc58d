//! The errors of loading a model: which file or folder, which config, which tokenizer, and
//! what is wrong with it. Tensor errors inside the models stay candle's; a missing or
//! misshapen weight is reported by the loader's checks as one [`LoadError::Weights`].

use std::path::PathBuf;

use crate::tokenizer::TokenizerError;

/// A component config (UNet, CLIP, VAE, scheduler) that cannot be read or used: the file (or
/// built-in config) and what is wrong, naming the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { file: file.into(), problem: problem.into() }
    }
}

/// For callers that report candle errors (the models' builders): the same message.
impl From<ConfigError> for candle_core::Error {
    fn from(e: ConfigError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Why [`SdxlModel::load`](crate::SdxlModel::load) or
/// [`SdxlConfig::from_diffusers_folder`](crate::SdxlConfig::from_diffusers_folder) failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or folder that is missing, cannot be read, or is not what an SDXL model needs.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// A component config (`config.json`, `scheduler_config.json`) that cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tokenizer folder that cannot be read.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Reading or building the weights failed (every missing key and wrong shape in one message).
    #[error(transparent)]
    Weights(#[from] candle_core::Error),
}

/// For callers that report candle errors: the same message.
impl From<LoadError> for candle_core::Error {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Weights(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}
