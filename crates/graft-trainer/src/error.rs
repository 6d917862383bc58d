//! The trainer's errors that are not tensor errors: what was wrong, in words that name the
//! key, file or group, and what to do. Callers see the kind; the binary prints the message.

/// An error of the datasets, caches, buckets and optimizers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot be used (an optimizer, its arguments or groups, the buckets).
    #[error("{0}")]
    Config(String),
    /// The dataset: its config, its files, its images.
    #[error("{0}")]
    Dataset(String),
    /// Saved state that cannot be used or written: an optimizer state file, a cache folder.
    #[error("{0}")]
    State(String),
    /// A broken invariant of graft itself.
    #[error("{0}")]
    Internal(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
