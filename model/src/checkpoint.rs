//! Weights in Hugging Face's safetensors layout: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Reading goes tensor by tensor, each read or mapped on its own (a
//! whole file is never mapped, so it never counts against peak memory); writing uses the
//! `safetensors` crate.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::{files, ModelError, Result};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The weight files of a model directory, in reading order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX);
    if !index.exists() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is a pickle, which wizard does not load: convert it to safetensors)"
        } else {
            ""
        };
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE} or {INDEX} in the model directory{hint}"),
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Json { path: index.clone(), message: e.to_string() })?;
    let map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Json { path: index.clone(), message: "no `weight_map` object".into() })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::Tensor {
            path: index.clone(),
            tensor: tensor.clone(),
            message: "its shard is not a file name".into(),
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        _ => return None,
    })
}

/// One tensor's entry in a safetensors header.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Reads a safetensors header: the entries by name, and where the data section starts.
fn read_header(file: &File, path: &Path) -> Result<(BTreeMap<String, HeaderEntry>, u64)> {
    let invalid = |message: String| ModelError::Safetensors { path: path.to_path_buf(), message };
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|_| invalid("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(invalid(format!("header length {header_len} does not fit a file of {file_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| ModelError::io(path, e))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("header: {e}")))?;
    entries.remove("__metadata__");
    let data_start = 8 + header_len;
    entries
        .into_iter()
        .map(|(name, value)| {
            let entry: HeaderEntry =
                serde_json::from_value(value).map_err(|e| invalid(format!("header entry `{name}`: {e}")))?;
            let (begin, end) = entry.data_offsets;
            // Checked: a hostile header's shape must not wrap around to the byte count it gives.
            let expected = entry
                .shape
                .iter()
                .try_fold(entry.dtype.bitsize() / 8, |bytes, &d| bytes.checked_mul(d))
                .filter(|&bytes| i64::try_from(bytes).is_ok())
                .unwrap_or(usize::MAX);
            if end < begin || end - begin != expected || data_start + end as u64 > file_len {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    message: format!(
                        "bytes {begin}..{end} do not hold shape {:?} of {:?} within the file (truncated?)",
                        entry.shape, entry.dtype
                    ),
                });
            }
            Ok((name, entry))
        })
        .collect::<Result<_>>()
        .map(|entries| (entries, data_start))
}

/// Streams every tensor of the model directory to `visit(name, tensor, file)`, in its stored dtype on
/// the CPU, in name order, reading one tensor at a time: peak memory is the destination plus about
/// twice the largest tensor, never a whole file. A tensor whose name `mapped` takes is the file's
/// pages, mapped (no copy into new memory), for tensors that are used up while a model loads (a
/// mapping follows its file: weights kept must be copied out).
pub fn for_each_tensor(
    dir: &Path,
    mapped: impl Fn(&str) -> bool,
    mut visit: impl FnMut(&str, Tensor, &Path) -> Result<()>,
) -> Result<()> {
    for path in weight_files(dir)? {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let (entries, data_start) = read_header(&file, &path)?;
        for (name, entry) in entries {
            let tensor_error =
                |message: String| ModelError::Tensor { path: path.clone(), tensor: name.clone(), message };
            let kind = kind_of(entry.dtype).ok_or_else(|| {
                tensor_error(format!(
                    "dtype {:?} is not a weight type (F32, F16, BF16, F64, or I8/U8 quantized values)",
                    entry.dtype
                ))
            })?;
            let begin = entry.data_offsets.0;
            let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
            let offset = data_start + begin as u64;
            let read = if mapped(&name) { kernels::read::mapped_tensor_at } else { kernels::read::tensor_at };
            let tensor = read(&file, offset, &shape, kind).map_err(|e| tensor_error(e.to_string()))?;
            visit(&name, tensor, &path)?;
        }
    }
    Ok(())
}

/// A tensor copied to host memory for writing.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        other => return Err(ModelError::Invalid(format!("cannot save weights of kind {other:?}"))),
    })
}

/// Writes `model.safetensors` atomically, with the
/// `{"format": "pt"}` metadata that `transformers` expects.
pub fn save(dir: &Path, tensors: &[(String, Tensor)], kind: Kind) -> Result<()> {
    let converted: Vec<(String, Tensor)> = tensors.iter().map(|(name, t)| (name.clone(), t.to_kind(kind))).collect();
    save_as_they_are(dir, &converted)
}

/// [`save`] keeping each tensor's own dtype (a quantized model's int8 or uint8 values beside fp32 scales).
pub fn save_as_they_are(dir: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut host: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let kind = tensor.kind();
        let dtype = dtype_of(kind)?;
        let tensor = tensor.detach().to_device(Device::Cpu).contiguous();
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        host.insert(name.clone(), HostTensor { dtype, shape, bytes });
    }
    let target = dir.join(SINGLE);
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    files::replace_with(&target, |temporary| {
        safetensors::serialize_to_file(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), temporary)
            .map_err(std::io::Error::other)
    })
    .map_err(|e| ModelError::io(&target, e))
}
