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

/// One buffer that tensors are read into in turn, for tensors that are used up before the next is
/// read (quantized or narrowed as they load): memory is touched once, not once per tensor. New memory
/// costs a page fault and a page cleared on first touch, which in a VM can cost more than the read.
#[derive(Default)]
pub struct ReadBuffer {
    bytes: Option<Tensor>,
}

impl ReadBuffer {
    /// [`tensor_at`], in this buffer: the tensor is valid until the next read, which overwrites it.
    pub fn tensor_at(&mut self, file: &File, offset: u64, shape: &[i64], kind: Kind) -> std::io::Result<Tensor> {
        let len = shape.iter().product::<i64>() * kind.elt_size_in_bytes() as i64;
        if self.bytes.as_ref().is_none_or(|bytes| bytes.numel() < len as usize) {
            self.bytes = None; // the old buffer goes before the new one comes
            self.bytes = Some(Tensor::f_empty([len], (Kind::Uint8, Device::Cpu)).map_err(std::io::Error::other)?);
        }
        let buffer = self.bytes.as_ref().expect("just made").narrow(0, 0, len);
        if len > 0 {
            // SAFETY: the buffer is a contiguous CPU byte tensor of at least `len` bytes that only
            // this reader writes, and the tensors it gave before are documented as overwritten.
            let bytes = unsafe { std::slice::from_raw_parts_mut(buffer.data_ptr().cast::<u8>(), len as usize) };
            file.read_exact_at(bytes, offset)?;
        }
        buffer.f_view_dtype(kind).and_then(|typed| typed.f_reshape(shape)).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Tensors read one after the other into one buffer hold their own bytes, whatever their sizes.
    #[test]
    fn a_read_buffer_gives_each_tensor_its_bytes() {
        let path = std::env::temp_dir().join(format!("wizard-read-buffer-{}", std::process::id()));
        let mut file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all(&bytes).unwrap();
        let mut buffer = ReadBuffer::default();
        for (offset, shape) in [(0u64, vec![2i64, 3]), (16, vec![40]), (4, vec![1]), (0, vec![4, 16])] {
            let tensor = buffer.tensor_at(&file, offset, &shape, Kind::Float).unwrap();
            let first = offset as usize / 4;
            let expected = Tensor::from_slice(&values[first..first + tensor.numel()]).reshape(&shape);
            assert!(tensor.equal(&expected), "offset {offset}, shape {shape:?}");
        }
    }
}
