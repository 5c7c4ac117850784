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
    Ok(shards(dir)?.files)
}

/// Where a directory's tensors are: its weight files, and for a sharded checkpoint the index's
/// placement of each tensor.
struct Shards {
    files: Vec<PathBuf>,
    /// The index file and the shard it names for each tensor.
    placement: Option<(PathBuf, BTreeMap<String, PathBuf>)>,
}

fn shards(dir: &Path) -> Result<Shards> {
    let single = dir.join(SINGLE);
    // A dangling link is there too: followed, it says what is wrong with it.
    if single.symlink_metadata().is_ok() {
        return Ok(Shards { files: vec![single], placement: None });
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
    let text = files::read_regular_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Json { path: index.clone(), message: e.to_string() })?;
    let map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Json { path: index.clone(), message: "no `weight_map` object".into() })?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut placement = BTreeMap::new();
    for (tensor, file) in map {
        let shard_error =
            |message: &str| ModelError::Tensor { path: index.clone(), tensor: tensor.clone(), message: message.into() };
        let file = file.as_str().ok_or_else(|| shard_error("its shard is not a file name"))?;
        // Shards lie in the model directory (or below it), as transformers writes them.
        let inside = Path::new(file).components().all(|part| matches!(part, std::path::Component::Normal(_)));
        if !inside {
            return Err(shard_error(&format!("its shard `{file}` is not a path inside the model directory")));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path.clone());
        }
        placement.insert(tensor.clone(), path);
    }
    files.sort();
    Ok(Shards { files, placement: Some((index, placement)) })
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

/// A weight file, opened for reading if it is a regular file.
fn open_weights(path: &Path) -> Result<File> {
    files::open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => {
            ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() }
        }
        _ => ModelError::io(path, e),
    })
}

/// Reads a safetensors header: the entries by name, and where the data section starts. The
/// entries' bytes must lie end to end and fill the data section, as the format requires: a header
/// whose tensors overlap would load one tensor's bytes as another's.
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
    let data_len = (file_len - data_start) as usize;
    let entries: BTreeMap<String, HeaderEntry> = entries
        .into_iter()
        .map(|(name, value)| {
            let entry: HeaderEntry =
                serde_json::from_value(value).map_err(|e| invalid(format!("header entry `{name}`: {e}")))?;
            let tensor_error =
                |message: String| ModelError::Tensor { path: path.to_path_buf(), tensor: name.clone(), message };
            if !entry.dtype.bitsize().is_multiple_of(8) {
                return Err(tensor_error(format!("dtype {:?} is not a weight type", entry.dtype)));
            }
            let (begin, end) = entry.data_offsets;
            // Checked: a hostile header's shape must not wrap around to the byte count it gives.
            let expected = entry
                .shape
                .iter()
                .try_fold(entry.dtype.bitsize() / 8, |bytes, &d| bytes.checked_mul(d))
                .filter(|&bytes| i64::try_from(bytes).is_ok());
            if end < begin || Some(end - begin) != expected {
                let takes = expected.map_or("more than a file holds".into(), |bytes| format!("{bytes}"));
                return Err(tensor_error(format!(
                    "bytes {begin}..{end} do not hold shape {:?} of {:?}, which takes {takes} bytes",
                    entry.shape, entry.dtype
                )));
            }
            if end > data_len {
                return Err(tensor_error(format!(
                    "bytes {begin}..{end} lie past the end of the file's {data_len} bytes of data (truncated?)"
                )));
            }
            Ok((name, entry))
        })
        .collect::<Result<_>>()?;
    let mut spans: Vec<(usize, usize, &str)> =
        entries.iter().map(|(name, entry)| (entry.data_offsets.0, entry.data_offsets.1, name.as_str())).collect();
    spans.sort_unstable();
    let mut covered = 0;
    for (begin, end, name) in spans {
        if begin != covered {
            let how = if begin < covered {
                "overlap the previous tensor's"
            } else {
                "leave a gap after the previous tensor's"
            };
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                message: format!("bytes {begin}..{end} {how}, which end at {covered} (tensors lie end to end)"),
            });
        }
        covered = end;
    }
    if covered != data_len {
        return Err(invalid(format!(
            "its tensors hold {covered} bytes of data, the file has {data_len} after the header"
        )));
    }
    Ok((entries, data_start))
}

/// Streams every tensor of the model directory to `visit(name, tensor, file)`, in its stored dtype on
/// the CPU, in name order, reading one tensor at a time: peak memory is the destination plus about
/// twice the largest tensor, never a whole file. A tensor whose name `mapped` takes is the file's
/// pages, mapped (no copy into new memory), for tensors that are used up while a model loads (a
/// mapping follows its file: weights kept must be copied out, and [`ReadFiles::check_whole`] asked
/// once they are used up).
pub fn for_each_tensor(
    dir: &Path,
    mapped: impl Fn(&str) -> bool,
    mut visit: impl FnMut(&str, Tensor, &Path) -> Result<()>,
) -> Result<ReadFiles> {
    let mut files = Vec::new();
    for Header { path, file, entries, data_start } in headers(dir)? {
        let lost_before = kernels::read::lost_mapped_pages(&file).map_err(|e| ModelError::io(&path, e))?;
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
            let tensor = read(&file, offset, &shape, kind).map_err(|e| match e.kind() {
                // The header was read whole: the file shrank since.
                std::io::ErrorKind::UnexpectedEof => {
                    tensor_error("the file ends before its bytes: it changed while it was read (truncated?)".into())
                }
                _ => tensor_error(e.to_string()),
            })?;
            visit(&name, tensor, &path)?;
        }
        files.push((path, file, lost_before));
    }
    Ok(ReadFiles(files))
}

/// The weight files a load read, held open with the pages their mappings had lost before: asked, once
/// the tensors mapped from them are used up, whether a mapping lost pages meanwhile (the file
/// truncated by another process, or a storage error), whose bytes then read as zeros.
#[must_use = "a load asks its files whether they stayed whole once it has used their mapped tensors up"]
pub struct ReadFiles(Vec<(PathBuf, File, u64)>);

impl ReadFiles {
    /// Refuses the load if any of its files lost mapped pages while it read them.
    pub fn check_whole(self) -> Result<()> {
        for (path, file, lost_before) in &self.0 {
            if kernels::read::lost_mapped_pages(file).map_err(|e| ModelError::io(path, e))? != *lost_before {
                return Err(ModelError::ChangedWhileRead { path: path.clone() });
            }
        }
        Ok(())
    }
}

/// Each tensor's stored shape and file, from the headers alone: what a model's sizes can be
/// compared with before anything is allocated.
pub fn shapes(dir: &Path) -> Result<BTreeMap<String, (Vec<usize>, PathBuf)>> {
    let mut shapes = BTreeMap::new();
    for header in headers(dir)? {
        for (name, entry) in header.entries {
            shapes.insert(name, (entry.shape, header.path.clone()));
        }
    }
    Ok(shapes)
}

/// One weight file, open, with its checked header.
struct Header {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, HeaderEntry>,
    data_start: u64,
}

/// The headers of a directory's weight files, each checked, and their names across files: no
/// tensor in two files, each in the shard the index names.
fn headers(dir: &Path) -> Result<Vec<Header>> {
    let shards = shards(dir)?;
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut headers = Vec::with_capacity(shards.files.len());
    for path in shards.files {
        let file = open_weights(&path)?;
        let (entries, data_start) = read_header(&file, &path)?;
        for name in entries.keys() {
            let tensor_error =
                |message: String| ModelError::Tensor { path: path.clone(), tensor: name.clone(), message };
            if let Some(first) = seen.insert(name.clone(), path.clone()) {
                return Err(tensor_error(format!("is also in {}: which one is meant?", first.display())));
            }
            if let Some((index, placement)) = &shards.placement {
                if placement.get(name) != Some(&path) {
                    let placed = placement
                        .get(name)
                        .map_or("does not list it".into(), |p| format!("places it in {}", p.display()));
                    return Err(tensor_error(format!("is in this shard, but {} {placed}", index.display())));
                }
            }
        }
        headers.push(Header { path, file, entries, data_start });
    }
    // The index lists no tensor that no shard holds (a shard from another checkpoint, cut short).
    if let Some((index, placement)) = &shards.placement {
        if let Some((name, path)) = placement.iter().find(|(name, _)| !seen.contains_key(*name)) {
            let message = format!("is listed in {}, but {} does not hold it", index.display(), path.display());
            return Err(ModelError::Tensor { path: index.clone(), tensor: name.clone(), message });
        }
    }
    Ok(headers)
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
