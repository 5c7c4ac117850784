//! The errors of the evolve crate.
use std::path::PathBuf;

use model::jsonl::LineError;

use crate::backend::BackendError;

/// `Result` with [`EvolveError`].
pub type Result<T, E = EvolveError> = std::result::Result<T, E>;

/// Everything that can stop a run. The store keeps all answers received before the error, so
/// re-running the same command continues where it stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvolveError {
    /// A seed or benchmark line that is not what it should be.
    #[error("{path}:{line}: {message}")]
    BadLine {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite failed (a full disk shows here as "database or disk is full").
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer wizard.
    #[error(
        "database {path} has schema version {found}, newer than version {supported} that this wizard knows; \
         use a newer wizard or another --db"
    )]
    NewerSchema {
        /// The database file.
        path: String,
        /// Its `user_version`.
        found: i64,
        /// The newest version this build reads.
        supported: i64,
    },
    /// The database belongs to a run with other settings.
    #[error("the database was started with {what} = {stored}, this command asks for {requested}; use the same value or another --db")]
    Mismatch {
        /// The setting.
        what: &'static str,
        /// Its value in the database.
        stored: String,
        /// Its value in this command.
        requested: String,
    },
    /// The LLM backend failed in a way that retrying will not fix.
    #[error("{0}; the answers received so far are stored, re-run the same command to continue")]
    Backend(#[from] BackendError),
    /// The local model could not be loaded or run.
    #[error("local model: {0}")]
    Pipeline(#[from] model::ModelError),
    /// A setting or argument that cannot work.
    #[error("{0}")]
    Invalid(String),
}

impl EvolveError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvolveError::Io { path: path.into(), source }
    }

    /// A JSON Lines error of `path`; `what` says what a line that does not parse should have been.
    pub(crate) fn line(path: &str, error: LineError, what: &str) -> Self {
        match error {
            LineError::Io(source) => EvolveError::io(path, source),
            LineError::Bad { line, message } => {
                EvolveError::BadLine { path: path.to_string(), line, message: format!("{what}: {message}") }
            }
        }
    }
}
