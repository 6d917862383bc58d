//! The SDK's error: a message with an [`ErrorKind`], converted to the ABI's `GraftError`.

use std::fmt;

use graft_abi::{ErrorKind, GraftError};

/// An error a plugin returns. Any `std::error::Error` converts into it with `?`.
#[derive(Clone, PartialEq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn msg(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OTHER, message)
    }

    /// A bad strategy configuration.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CONFIG, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self { kind: self.kind, message: format!("{what}: {}", self.message) }
    }

    pub(crate) fn into_abi(self) -> GraftError {
        GraftError::new(self.kind, self.message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.message)
    }
}

impl<E: std::error::Error + 'static> From<E> for Error {
    fn from(e: E) -> Self {
        // Keep the kind of an error that came from the host.
        if let Some(g) = (&e as &dyn std::any::Any).downcast_ref::<GraftError>() {
            return Self::new(g.kind, g.message.as_str());
        }
        Self::msg(e.to_string())
    }
}
