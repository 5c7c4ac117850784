//! Weights in Hugging Face's safetensors layout: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped and each tensor is copied once, straight
//! into its destination dtype and device.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::{PipelineError, Result};

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
        return Err(PipelineError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE} or {INDEX} in the model directory{hint}"),
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| PipelineError::io(&index, e))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PipelineError::Json { path: index.clone(), message: e.to_string() })?;
    let map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| PipelineError::Json { path: index.clone(), message: "no `weight_map` object".into() })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| PipelineError::Tensor {
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
        _ => return None,
    })
}

/// Reads every tensor of the model directory, converted to `kind` on `device`.
pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<HashMap<String, (Tensor, PathBuf)>> {
    let mut tensors = HashMap::new();
    for path in weight_files(dir)? {
        let file = File::open(&path).map_err(|e| PipelineError::io(&path, e))?;
        // SAFETY: the map is read-only and dropped before this function returns; a concurrent writer
        // truncating the file is the one hazard, as with every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| PipelineError::io(&path, e))?;
        let parsed = SafeTensors::deserialize(&mmap)
            .map_err(|e| PipelineError::Safetensors { path: path.clone(), message: e.to_string() })?;
        for (name, view) in parsed.tensors() {
            let tensor_error =
                |message: String| PipelineError::Tensor { path: path.clone(), tensor: name.clone(), message };
            let source = kind_of(view.dtype())
                .ok_or_else(|| tensor_error(format!("dtype {:?} is not a floating-point weight type", view.dtype())))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, source)
                .map_err(|e| tensor_error(e.to_string()))?
                .to_device(device)
                .to_kind(kind);
            tensors.insert(name, (tensor, path.clone()));
        }
    }
    Ok(tensors)
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
        other => return Err(PipelineError::Invalid(format!("cannot save weights of kind {other:?}"))),
    })
}

/// Writes `model.safetensors` atomically (a temporary file renamed into place), with the
/// `{"format": "pt"}` metadata that `transformers` expects.
pub fn save(dir: &Path, tensors: &[(String, Tensor)], kind: Kind) -> Result<()> {
    let dtype = dtype_of(kind)?;
    let mut host: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let tensor = tensor.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        host.insert(name.clone(), HostTensor { dtype, shape, bytes });
    }
    let target = dir.join(SINGLE);
    let partial = dir.join(format!(".{SINGLE}.partial"));
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), &partial)
        .map_err(|e| PipelineError::Safetensors { path: partial.clone(), message: e.to_string() })?;
    std::fs::rename(&partial, &target).map_err(|e| PipelineError::io(&target, e))?;
    Ok(())
}
