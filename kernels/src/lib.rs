//! Everything below tch: the C++ shim compiled against libtorch's own headers, and the tensor
//! kernels built on it. This is the only crate with `unsafe` code or C++; the rest of wizard sees
//! safe Rust types and [`KernelError`].
#![deny(missing_docs)]

pub mod attention;
pub mod block;
pub mod calibrate;
pub mod collectives;
pub mod cpu;
mod error;
mod ffi;
pub mod int8;
pub mod linear;
mod nccl;
pub mod optim;
pub mod precision;
pub mod process;
pub mod reducer;
pub mod runtime;

pub use error::KernelError;
