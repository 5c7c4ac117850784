use std::path::PathBuf;

use thiserror::Error;

use crate::jsonl::LineError;

/// Everything that can go wrong in the model crate. Each variant names the file, field or tensor.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, not chained, so it is printed once).
        error: std::io::Error,
    },
    /// A JSON file is not valid JSON or does not have the expected shape.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde said, with line and column.
        message: String,
    },
    /// A config field is missing, unknown or has an impossible value.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// Why it is rejected.
        message: String,
    },
    /// A checkpoint tensor is missing, has the wrong shape or dtype, or the file is corrupt.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        /// The safetensors file (or the index that should have named it).
        path: PathBuf,
        /// The tensor name as the checkpoint spells it.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// A safetensors file could not be parsed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The tokenizer could not be loaded, trained or saved.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A request the model cannot serve, e.g. a prompt longer than the context.
    #[error("{0}")]
    Invalid(String),
    /// A weight file lost pages while they were mapped (truncated by another process, or a storage
    /// error): what was made of them read zeros.
    #[error(
        "{path}: the file changed while it was read (truncated by another process, or a storage error); load it again"
    )]
    ChangedWhileRead {
        /// The weight file.
        path: PathBuf,
    },
    /// A model's logits hold NaN or +infinity (or nothing finite): its activations overflowed, so
    /// every token picked from them would be garbage.
    #[error(
        "the {0}'s logits are NaN or infinite: its activations overflow (in float16, load it as bfloat16 \
         or float32; else weights far too large for their layer: is the checkpoint damaged?)"
    )]
    NotFinite(&'static str),
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The kernels layer raised an error.
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), error: source }
    }

    /// Wraps an error of a JSON Lines file with the file's path.
    pub(crate) fn jsonl(path: impl Into<PathBuf>, error: LineError) -> Self {
        match error {
            LineError::Io(error) => ModelError::io(path, error),
            bad @ LineError::Bad { .. } => ModelError::Json { path: path.into(), message: bad.to_string() },
        }
    }
}
