use std::path::{Path, PathBuf};

use model::jsonl::LineError;

use thiserror::Error;

/// Everything that can go wrong while evaluating. Each variant names the file (and line) or program at fault.
#[derive(Debug, Error)]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A line of a JSONL file (samples or benchmark) is malformed: bad JSON, a missing field, an unknown task.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A benchmark or samples file is unusable as a whole (wrong format, empty, incomplete).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The Python interpreter for the sandbox cannot be started or its worker misbehaved.
    #[error("sandbox python {python}: {message}")]
    Python {
        /// The interpreter.
        python: PathBuf,
        /// What happened.
        message: String,
    },
    /// Samples cannot be isolated on this machine (no namespaces) and isolation was not turned off.
    #[error(
        "the sandbox cannot isolate samples here ({0}); refusing to run them unisolated (--no-isolation runs \
         them anyway, with access to the network and the host's files and sockets)"
    )]
    Isolation(String),
    /// Running as root, the sandbox cannot drop samples to uid nobody.
    #[error(
        "the sandbox refuses to run samples: uid nobody cannot run {} (a directory on its path is closed to \
         other users), so samples would run as root; give --python an interpreter every user can read",
        .0.display()
    )]
    AsRoot(std::path::PathBuf),
    /// The SQLite store failed or belongs to another evaluation.
    #[error("store {path}: {message}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// Generation failed.
    #[error("generation: {0}")]
    Generation(#[from] model::ModelError),
    /// The inference engine refused or failed a request.
    #[error("generation: {0}")]
    Engine(#[from] model::engine::SubmitError),
    /// An impossible setting (e.g. zero samples).
    #[error("{0}")]
    Invalid(String),
}

/// Results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EvalError {
    let path = path.into();
    move |error| EvalError::Io { path, error }
}

/// A JSON Lines read error as an [`EvalError`] naming the file: a line that does not parse is bad JSON.
pub(crate) fn line_error(path: &Path) -> impl Fn(LineError) -> EvalError + '_ {
    move |error| match error {
        LineError::Io(error) => EvalError::Io { path: path.into(), error },
        LineError::Bad { line, message } => {
            EvalError::Line { path: path.into(), line, message: format!("bad JSON: {message}") }
        }
    }
}
