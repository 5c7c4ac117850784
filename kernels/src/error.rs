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
}
