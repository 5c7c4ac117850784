use thiserror::Error;

/// Errors raised below tch, in libtorch or in the shim.
#[derive(Debug, Error)]
pub enum KernelError {
    /// A C++ exception, caught at the shim boundary.
    #[error("libtorch: {operation}: {message}")]
    Torch {
        /// The shim call that failed.
        operation: &'static str,
        /// What libtorch said.
        message: String,
    },
    /// The parts of a quantized weight do not fit together (they come from files users give), or a
    /// weight cannot be quantized; the message starts with the format (`int8 weight: ...`).
    #[error("{0}")]
    QuantizedWeight(String),
}
