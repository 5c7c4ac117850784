//! Everything below tch: the C++ shim compiled against libtorch's own headers, and the tensor
//! kernels built on it. This is the only crate with `unsafe` code or C++; the rest of wizard sees
//! safe Rust types and [`KernelError`].
#![deny(missing_docs)]

pub mod attention;
pub mod block;
pub mod calibrate;
pub mod collectives;
pub mod cpu;
pub mod cuda_graph;
mod cuda_object;
mod error;
mod ffi;
pub mod linear;
pub mod memory;
pub mod optim;
pub mod precision;
pub mod process;
pub mod quantized;
pub mod read;
pub mod reducer;
pub mod runtime;

pub use error::KernelError;

/// Whether every value of `tensor` is finite. A sum reads it once without allocating; only a sum
/// that is not finite is looked at value by value, since finite values can overflow it.
pub fn all_finite(tensor: &tch::Tensor) -> Result<bool, tch::TchError> {
    if !tensor.is_floating_point() || tensor.f_sum(tensor.kind())?.f_double_value(&[])?.is_finite() {
        return Ok(true);
    }
    Ok(tensor.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1)
}
