//! What is wrong with a configuration, as data: the key (its dotted
//! path) and the words, and the file once it is known. Never a string
//! the key is parsed back out of.

use std::path::{Path, PathBuf};

/// What is wrong with one key of a configuration: its dotted path (e.g.
/// `limits.hold_timeout`) and the words for it. Carried as data, so the
/// key is never parsed back out of a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyedError {
    pub key: String,
    pub message: String,
}

impl KeyedError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The error as it names the file it was found in.
    pub fn in_file(self, file: &Path) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            key: self.key,
            message: self.message,
        }
    }
}

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the offending key, e.g. `limits.hold_timeout`.
    pub key: String,
    pub message: String,
}
