//! Tensors from a checkpoint file: read straight into their own memory (a tensor is in memory once
//! while it loads, not twice: a byte buffer and the tensor copied from it), or mapped, for tensors
//! used up while a model loads (quantized, narrowed, or packed): no copy into new memory at all.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr;

use tch::{Device, Kind, Tensor};

use crate::ffi;

/// A CPU tensor of `shape` and `kind` holding the bytes of `file` from `offset` on.
pub fn tensor_at(file: &File, offset: u64, shape: &[i64], kind: Kind) -> io::Result<Tensor> {
    let tensor = Tensor::f_empty(shape, (kind, Device::Cpu)).map_err(io::Error::other)?;
    let len = tensor.numel() * kind.elt_size_in_bytes();
    if len > 0 {
        // SAFETY: a new contiguous CPU tensor owns `len` bytes at its data pointer, and nothing else
        // refers to them while they are filled.
        let bytes = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), len) };
        file.read_exact_at(bytes, offset)?;
    }
    Ok(tensor)
}

/// [`tensor_at`], with the file's pages mapped as the tensor's memory instead of copied into new
/// memory (which in a VM costs more than the read), copy-on-write: writes to the tensor stay in this
/// process. The mapping ends when the tensor is freed. A mapping follows its file, so a file changed
/// while the tensor lives changes it, and pages the file loses (truncated by another process, or a
/// storage error) read as zeros, which [`lost_mapped_pages`] counts: for tensors used up while a
/// model loads, not for weights kept. Bytes not aligned to `kind`, a file that cannot be mapped, or
/// a mapping past the thousands held at once are read instead (which says why bytes beyond the file's
/// end cannot be had).
pub fn mapped_tensor_at(file: &File, offset: u64, shape: &[i64], kind: Kind) -> io::Result<Tensor> {
    let read = || tensor_at(file, offset, shape, kind);
    let Ok(start) = i64::try_from(offset) else { return read() };
    if !offset.is_multiple_of(kind.elt_size_in_bytes() as u64) {
        return read();
    }
    let length = (shape.iter())
        .try_fold(kind.elt_size_in_bytes() as i64, |bytes, &size| bytes.checked_mul(size))
        .filter(|&bytes| bytes >= 0)
        .ok_or_else(|| io::Error::other(format!("shape {shape:?} of {kind:?} does not fit in memory")))?;
    let mut handle = ptr::null_mut();
    // SAFETY: the descriptor is open for the call; on success the output is a new heap tensor
    // (owning its mapping) whose ownership passes to us.
    let status = unsafe { ffi::wizard_map_bytes(file.as_raw_fd(), start, length, &mut handle) };
    if ffi::check(status, "map a tensor").is_err() {
        return read();
    }
    // SAFETY: see above.
    let bytes = unsafe { Tensor::from_ptr(handle as *mut torch_sys::C_tensor) };
    bytes.f_view_dtype(kind).and_then(|typed| typed.f_reshape(shape)).map_err(io::Error::other)
}

/// How often mappings of `file` ([`mapped_tensor_at`]), live or freed, lost pages in this process
/// (each time, the rest of the mapping from the lost page on reads as zeros): a count that moves while
/// tensors mapped from the file are in use spoils what is made of them.
pub fn lost_mapped_pages(file: &File) -> io::Result<u64> {
    let mut lost = 0;
    // SAFETY: the descriptor is open for the call and `lost` outlives it.
    let status = unsafe { ffi::wizard_mapped_file_lost(file.as_raw_fd(), &mut lost) };
    ffi::check(status, "ask about a mapped file").map_err(io::Error::other)?;
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A mapped tensor holds its file's bytes at any offset (on a page boundary or not, or unaligned
    /// and read instead) and outlives the file handle; writes to it leave the file as it was; bytes
    /// beyond the file's end are refused.
    #[test]
    fn a_mapped_tensor_holds_its_bytes_and_leaves_the_file_alone() {
        let path = std::env::temp_dir().join(format!("wizard-mapped-{}", std::process::id()));
        let mut file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let values: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all(&bytes).unwrap();
        let mut tensors = vec![];
        for (offset, shape) in
            [(0u64, vec![2i64, 3]), (4096, vec![40]), (4, vec![1]), (8, vec![0]), (1000, vec![7, 100])]
        {
            let tensor = mapped_tensor_at(&file, offset, &shape, Kind::Float).unwrap();
            let first = offset as usize / 4;
            let expected = Tensor::from_slice(&values[first..first + tensor.numel()]).reshape(&shape);
            assert!(tensor.equal(&expected), "offset {offset}, shape {shape:?}");
            tensors.push((tensor, expected));
        }
        let unaligned = mapped_tensor_at(&file, 2, &[3], Kind::Float).unwrap();
        let expected: Vec<f32> = bytes[2..14].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(unaligned.equal(&Tensor::from_slice(&expected)));
        let beyond = mapped_tensor_at(&file, 11_996, &[2], Kind::Float).unwrap_err();
        assert_eq!(beyond.kind(), io::ErrorKind::UnexpectedEof, "{beyond}");
        drop(file);
        for (tensor, expected) in &mut tensors {
            assert!(tensor.equal(expected), "after the file was closed");
            let _ = tensor.fill_(-1.0);
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "a write reached the file");
        std::fs::remove_file(&path).unwrap();
    }

    /// A file truncated under a mapped tensor does not end the process (SIGBUS): the lost bytes read
    /// as zeros, what is left as it was, and the file's count of lost pages grows, kept once the
    /// tensor is freed and the file whole again; another file's does not.
    #[test]
    fn a_truncated_file_reads_as_zeros_and_counts_its_lost_pages() {
        let path = std::env::temp_dir().join(format!("wizard-truncated-{}", std::process::id()));
        let mut file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let values: Vec<f32> = (0..8192).map(|i| i as f32 + 1.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all(&bytes).unwrap();
        let whole = mapped_tensor_at(&file, 0, &[16], Kind::Float).unwrap();
        let tensor = mapped_tensor_at(&file, 4, &[8000], Kind::Float).unwrap();
        assert_eq!(lost_mapped_pages(&file).unwrap(), 0);
        file.set_len(4096 * 3).unwrap();
        let kept = Vec::<f32>::try_from(&tensor).unwrap();
        assert_eq!(kept[..3071], values[1..3072], "the bytes the file still holds");
        assert!(kept[3071..].iter().all(|&v| v == 0.0), "the bytes it lost");
        let lost = lost_mapped_pages(&file).unwrap();
        assert!(lost > 0, "while the tensor lives");
        drop(tensor);
        file.write_all_at(&bytes, 0).unwrap();
        assert_eq!(lost_mapped_pages(&file).unwrap(), lost, "after, the file whole again");
        assert_eq!(Vec::<f32>::try_from(&whole).unwrap(), values[..16]);
        let other = File::open(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(lost_mapped_pages(&other).unwrap(), 0);
        std::fs::remove_file(&path).unwrap();
    }

    /// Hundreds of tensors mapped at once (a quantized 1B directory's layers while it loads) are all
    /// mappings, not reads: each follows a write to the file.
    #[test]
    fn hundreds_of_tensors_map_at_once() {
        let path = std::env::temp_dir().join(format!("wizard-many-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4096 * 600).unwrap();
        let tensors: Vec<Tensor> =
            (0..600).map(|i| mapped_tensor_at(&file, i * 4096, &[4], Kind::Float).unwrap()).collect();
        for i in 0..600u64 {
            file.write_all_at(&(i as f32).to_le_bytes(), i * 4096).unwrap();
        }
        for (i, tensor) in tensors.iter().enumerate() {
            assert_eq!(tensor.double_value(&[0]), i as f64, "tensor {i} was read, not mapped");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
