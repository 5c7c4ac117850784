//! Tensors read from a file straight into their own memory: a checkpoint's tensor is in memory once
//! while it loads, not twice (a byte buffer and the tensor copied from it), which at 1B's token table
//! is 400 MB of peak memory.
use std::fs::File;
use std::os::unix::fs::FileExt;

use tch::{Device, Kind, Tensor};

/// A CPU tensor of `shape` and `kind` holding the bytes of `file` from `offset` on.
pub fn tensor_at(file: &File, offset: u64, shape: &[i64], kind: Kind) -> std::io::Result<Tensor> {
    let tensor = Tensor::f_empty(shape, (kind, Device::Cpu)).map_err(std::io::Error::other)?;
    let len = tensor.numel() * kind.elt_size_in_bytes();
    if len > 0 {
        // SAFETY: a new contiguous CPU tensor owns `len` bytes at its data pointer, and nothing else
        // refers to them while they are filled.
        let bytes = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), len) };
        file.read_exact_at(bytes, offset)?;
    }
    Ok(tensor)
}
