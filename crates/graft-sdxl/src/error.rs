//! The errors of loading a model: which file or folder, which config, which tokenizer, and
//! what is wrong with it. Tensor errors inside the models stay candle's; a missing or
//! misshapen weight is reported by the loader's checks as one [`LoadError::Weights`].

use std::path::PathBuf;

use crate::tokenizer::TokenizerError;

/// Why [`SdxlModel::load`](crate::SdxlModel::load) or
/// [`SdxlConfig::from_diffusers_folder`](crate::SdxlConfig::from_diffusers_folder) failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or folder that is missing, cannot be read, or is not what an SDXL model needs.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// A component config (`config.json`, `scheduler_config.json`) that cannot be used; the
    /// message names the file and the key.
    #[error("{message}")]
    Config { path: PathBuf, message: String },
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
