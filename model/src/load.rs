//! A [`GptBigCode`] to and from a Hugging Face model directory (`config.json` and safetensors):
//! tensors are copied name for name into and out of the model's variables.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kernels::cpu::WeightFormat;
use kernels::quantized::{Format, QuantizedWeight};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::files;
use crate::gpt_bigcode::{dtype_name, GptBigCode, Precision, Weights};
use crate::{ModelError, Result};

/// `quantization_config.quant_method` of a directory written by [`GptBigCode::save_quantized`]:
/// `wizard_int8` or `wizard_int4`.
pub fn quant_method(format: Format) -> String {
    format!("wizard_{}", format.name())
}

/// The suffix of a quantized layer's scales tensor.
const SCALE_SUFFIX: &str = "_scale";

/// The format `dir`'s config.json says its dense layers are quantized to, if any (another
/// quantization is refused).
fn directory_format(dir: &Path) -> Result<Option<Format>> {
    let path = dir.join("config.json");
    let text = crate::files::read_regular_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.clone(), message: e.to_string() })?;
    let Some(quantization) = config.get("quantization_config") else { return Ok(None) };
    let error = |field: &str, message: String| ModelError::Config {
        path: path.clone(),
        field: format!("quantization_config.{field}"),
        message,
    };
    let method = quantization.get("quant_method").and_then(|m| m.as_str());
    let Some(format) = [Format::Int8, Format::Int4].into_iter().find(|&f| method == Some(quant_method(f).as_str()))
    else {
        let message = match method {
            Some(method) => format!("`{method}` is not supported (only wizard_int8 and wizard_int4)"),
            None => "is missing or not a string (wizard_int8 or wizard_int4)".to_string(),
        };
        return Err(error("quant_method", message));
    };
    // What our records hold; a directory that says otherwise was written by something else.
    for (field, expected) in [("bits", format.bits()), ("block_size", kernels::quantized::BLOCK)] {
        match quantization.get(field) {
            Some(value) if value.as_i64() == Some(expected) => {}
            Some(value) => {
                return Err(error(field, format!("is {value}, but {} holds {expected}", quant_method(format))))
            }
            None => return Err(error(field, format!("is missing ({} holds {expected})", quant_method(format)))),
        }
    }
    Ok(Some(format))
}

/// Buffers that old checkpoints carry and `transformers` ignores.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with(".attn.masked_bias") || name.ends_with(".attn.bias")
}

/// config.json's sizes against tensors every checkpoint stores as they are (quantized or not), before
/// the model is built: a size the checkpoint does not hold must be named, not allocated.
fn check_sizes(
    config: &ModelConfig,
    shapes: &BTreeMap<String, (Vec<usize>, PathBuf)>,
    config_path: &Path,
) -> Result<()> {
    let (d, last) = (config.n_embd as usize, config.n_layer.max(1) - 1);
    let expected = [
        ("transformer.wpe.weight".to_string(), vec![config.n_positions as usize, d], "n_positions and n_embd"),
        (format!("transformer.h.{last}.ln_1.weight"), vec![d], "n_layer and n_embd"),
        (format!("transformer.h.{last}.mlp.c_fc.bias"), vec![config.inner_dim() as usize], "n_layer and n_inner"),
    ];
    let Some((shape, file)) = ["transformer.wte.weight", "lm_head.weight"].iter().find_map(|name| shapes.get(*name))
    else {
        let files: BTreeSet<String> = shapes.values().map(|(_, file)| file.display().to_string()).collect();
        let files = files.into_iter().collect::<Vec<_>>().join(", ");
        return Err(ModelError::Invalid(format!(
            "{files}: holds no token table (neither transformer.wte.weight nor lm_head.weight)"
        )));
    };
    if shape.first() != Some(&(config.vocab_size as usize)) {
        return Err(ModelError::Invalid(format!(
            "{}: vocab_size {} disagrees with {}, whose token table has shape {shape:?}",
            config_path.display(),
            config.vocab_size,
            file.display()
        )));
    }
    for (name, shape, fields) in expected {
        match shapes.get(&name) {
            Some((stored, _)) if *stored == shape => {}
            Some((stored, file)) => {
                return Err(ModelError::Tensor {
                    path: file.clone(),
                    tensor: name,
                    message: format!("has shape {stored:?}, {}'s {fields} imply {shape:?}", config_path.display()),
                })
            }
            None => {
                let file = shapes.values().next().map_or_else(|| config_path.to_path_buf(), |(_, file)| file.clone());
                let message = format!("missing from the checkpoint, which {}'s {fields} imply", config_path.display());
                return Err(ModelError::Tensor { path: file, tensor: name, message });
            }
        }
    }
    Ok(())
}

impl GptBigCode {
    /// The precision `dir`'s weights are stored in when `wizard quantize` wrote it (int8 or int4),
    /// else None; what a command loads when no `--dtype` is given. A quantization that is not ours
    /// is refused, naming the field.
    pub fn stored_precision(dir: &Path) -> Result<Option<Precision>> {
        Ok(directory_format(dir)?.map(Precision::Quantized))
    }

    /// Loads a Hugging Face model directory (`config.json` + safetensors) in `kind` on `device`.
    /// Tensors are read one at a time straight into the weights.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<GptBigCode> {
        let (model, read) = GptBigCode::load_into(dir, kind, device, Weights::Zeros, false, &mut |_, _| {})?;
        read.check_whole()?;
        Ok(model)
    }

    /// [`load`](Self::load) into a model whose zeros are laid out as `zeros` says; with
    /// [`Weights::ZerosQuantizedDense`] each dense layer is quantized as it is read, and `progress`
    /// hears (done, total) layers. `blocks_mapped`: the blocks' fp32 dense weights are the file's
    /// pages, mapped, until the caller packs or copies them ([`GptBigCode::own_dense_weights`]); the
    /// caller asks the files it returns whether they stayed whole once nothing is mapped.
    fn load_into(
        dir: &Path,
        kind: Kind,
        device: Device,
        zeros: Weights,
        blocks_mapped: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(GptBigCode, checkpoint::ReadFiles)> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let stored = directory_format(dir)?;
        let quantized = stored.is_some();
        if let Some(stored) = stored.filter(|_| kind != Kind::Float || device != Device::Cpu) {
            let name = stored.name();
            return Err(ModelError::Invalid(format!(
                "{} holds {name} weights: load it with --dtype {name} on the CPU",
                dir.display()
            )));
        }
        check_sizes(&config, &checkpoint::shapes(dir)?, &dir.join("config.json"))?;
        let tied = config.tie_word_embeddings;
        // A quantized directory's own format wins (a request for another is refused by the caller).
        let (quantize_as_read, format) = match zeros {
            Weights::ZerosQuantizedDense(format) => (true, stored.unwrap_or(format)),
            _ => (false, stored.unwrap_or(Format::Int8)),
        };
        let narrow_as_read = zeros == Weights::ZerosBf16Dense;
        let table = [config.vocab_size, config.n_embd];
        // Tied and narrowed, the token table lives in the head: read once, into it.
        let head_name = if tied { "transformer.wte.weight" } else { "lm_head.weight" };
        let layers = config.n_layer as usize * 4 + 1;
        let mut quantized_layers = 0;
        let mut model = GptBigCode::build(config, device, kind, zeros)?;
        let mut pending = model.vars().variables();
        // Quantized layers: name -> (values, scales, the file they came from).
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>, PathBuf)> = BTreeMap::new();
        // Quantized or narrowed as read, or packed from quantized parts, tensors are used up while
        // the model loads: they are mapped from the file, not read into new memory (what is kept
        // is copied out).
        let mapped = quantized || quantize_as_read || narrow_as_read;
        let in_a_block = |name: &str| name.starts_with("transformer.h.") && model.dense_shape(name).is_some();
        let kept_mapped: BTreeSet<String> =
            (model.vars().variables().into_keys()).filter(|name| blocks_mapped && in_a_block(name)).collect();
        let mapped_here = |name: &str| mapped || kept_mapped.contains(name);
        let read = tch::no_grad(|| {
            let visit = |name: &str, tensor: Tensor, file: &Path| {
                let tensor_error = |message: String| ModelError::Tensor {
                    path: file.to_path_buf(),
                    tensor: name.to_string(),
                    message,
                };
                if !quantized && !tensor.is_floating_point() && !is_ignored_buffer(name) {
                    let message = format!(
                        "is stored as {:?}, where a checkpoint holds floating-point weights (a directory from \
                         `wizard quantize` says so in config.json's quantization_config)",
                        tensor.kind()
                    );
                    return Err(tensor_error(message));
                }
                if quantized {
                    if let Some(layer) = name.strip_suffix(SCALE_SUFFIX) {
                        parts.entry(layer.to_string()).or_insert((None, None, file.to_path_buf())).1 = Some(tensor);
                        return Ok(());
                    }
                    if tensor.kind() == format.values_kind() && model.dense_shape(name).is_some() {
                        if name != "lm_head.weight" && pending.remove(name).is_none() {
                            return Err(tensor_error("is stored more than once".into()));
                        }
                        parts.entry(name.to_string()).or_insert((None, None, file.to_path_buf())).0 = Some(tensor);
                        return Ok(());
                    }
                    if model.dense_shape(name).is_some() {
                        let (format, kind) = (format.name(), format.values_kind());
                        let message = format!(
                            "is stored as {:?}, but an {format} directory holds {kind:?} values",
                            tensor.kind()
                        );
                        return Err(tensor_error(message));
                    }
                    if !tensor.is_floating_point() && !is_ignored_buffer(name) {
                        let message = format!(
                            "is stored as {:?}, where an {} directory holds floating-point tensors besides its \
                             quantized layers' values",
                            tensor.kind(),
                            format.name()
                        );
                        return Err(tensor_error(message));
                    }
                }
                if name == head_name && (quantized || quantize_as_read || narrow_as_read) {
                    if tensor.size() != table {
                        let message = format!("has shape {:?}, config.json implies {table:?}", tensor.size());
                        return Err(tensor_error(message));
                    }
                    pending.remove(name);
                    if quantize_as_read && !quantized {
                        let weight =
                            QuantizedWeight::quantize(&tensor, format).map_err(|e| tensor_error(e.to_string()))?;
                        model.set_quantized_layer("lm_head.weight", weight);
                        quantized_layers += 1;
                        progress(quantized_layers, layers);
                    } else if narrow_as_read {
                        if !kernels::all_finite(&tensor)? {
                            return Err(tensor_error("holds NaN or infinite values".into()));
                        }
                        model.set_bf16_head(&tensor);
                    }
                    // A quantized directory's own head holds the table; an fp32 copy beside it is unused.
                    return Ok(());
                }
                let dense_shape = model.dense_shape(name).filter(|_| !(tied && name == "lm_head.weight"));
                if let (true, Some((out, inputs))) = (quantize_as_read, dense_shape) {
                    if tensor.size() != [out, inputs] {
                        let message = format!("has shape {:?}, config.json implies {:?}", tensor.size(), [out, inputs]);
                        return Err(tensor_error(message));
                    }
                    let weight = QuantizedWeight::quantize(&tensor, format).map_err(|e| tensor_error(e.to_string()))?;
                    drop(tensor);
                    pending.remove(name);
                    model.set_quantized_layer(name, weight);
                    quantized_layers += 1;
                    progress(quantized_layers, layers);
                    return Ok(());
                }
                let Some(var) = pending.remove(name) else {
                    // A tied head stored anyway (transformers may save it) is unused, but must fit.
                    let tied_head = name == "lm_head.weight" && tied;
                    return if tied_head && tensor.size() != table {
                        let message = format!("has shape {:?}, config.json implies {table:?}", tensor.size());
                        Err(tensor_error(message))
                    } else if tied_head || is_ignored_buffer(name) {
                        Ok(())
                    } else {
                        Err(tensor_error("is not part of a GPTBigCode model".into()))
                    };
                };
                if tensor.size() != var.size() {
                    let message = format!("has shape {:?}, config.json implies {:?}", tensor.size(), var.size());
                    return Err(tensor_error(message));
                }
                if tensor.kind() == var.kind() && var.device() == Device::Cpu && (!mapped || kept_mapped.contains(name))
                {
                    // The tensor just read becomes the variable's storage: no second copy.
                    var.shallow_clone().set_data(&tensor);
                } else {
                    var.shallow_clone().f_copy_(&tensor)?;
                }
                if !kernels::all_finite(&var)? {
                    return Err(tensor_error("holds NaN or infinite values".into()));
                }
                Ok(())
            };
            checkpoint::for_each_tensor(dir, mapped_here, visit)
        })?;
        let untied_head = !tied && parts.contains_key("lm_head.weight");
        // The table of a tied quantized directory is its quantized head.
        let table_in_quantized_head = quantized && tied;
        let mut missing: Vec<String> = pending
            .into_keys()
            .filter(|name| !(untied_head && name == "lm_head.weight"))
            .filter(|name| !(table_in_quantized_head && name == "transformer.wte.weight"))
            .collect();
        missing.sort();
        if let Some(first) = missing.first() {
            let file = checkpoint::weight_files(dir)?.remove(0);
            let message = format!("missing from the checkpoint ({} missing in all)", missing.len());
            return Err(ModelError::Tensor { path: file, tensor: first.clone(), message });
        }
        if quantized && !parts.contains_key("lm_head.weight") {
            let file = checkpoint::weight_files(dir)?.remove(0);
            let message = format!("missing from an {0} checkpoint (the head is {0} there)", format.name());
            return Err(ModelError::Tensor { path: file, tensor: "lm_head.weight".into(), message });
        }
        for (name, (values, scales, file)) in parts {
            let error = |message: String| ModelError::Tensor { path: file.clone(), tensor: name.clone(), message };
            let values = values.ok_or_else(|| {
                let (format, kind) = (format.name(), format.values_kind());
                error(format!("has a scale ({name}{SCALE_SUFFIX}) but no {format} values (stored as {kind:?})"))
            })?;
            let scales = scales.ok_or_else(|| error(format!("has no scale tensor {name}{SCALE_SUFFIX}")))?;
            let (out, in_features) = model.dense_shape(&name).ok_or_else(|| error("is not a dense layer".into()))?;
            if values.size().first() != Some(&out) {
                let message =
                    format!("has shape {:?}: config.json implies {out} rows of {in_features} inputs", values.size());
                return Err(error(message));
            }
            let weight =
                QuantizedWeight::from_parts(values, scales, in_features, format).map_err(|e| error(e.to_string()))?;
            model.set_quantized_layer(&name, weight);
        }
        Ok((model, read))
    }

    /// Loads `dir` in `precision` for inference: a dense dtype (bf16 on the CPU: bf16 dense weights
    /// over fp32 activations), or int8 or int4 (quantized here unless the directory already holds
    /// such weights, from `wizard quantize`). `progress` hears (done, total) layers. On the CPU each
    /// fp32 dense shape's product is chosen by a measurement ([`kernels::calibrate`]).
    pub fn load_as(
        dir: &Path,
        precision: Precision,
        device: Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<GptBigCode> {
        // bf16 on the CPU: bf16 dense weights over fp32 activations (what the dense kernel reads at
        // half the bytes; libtorch's CPU ops in bf16 cost more than they save).
        let narrow = precision == Precision::Dense(Kind::BFloat16) && device == Device::Cpu;
        if let (Precision::Quantized(format), false) = (precision, device == Device::Cpu) {
            return Err(ModelError::Invalid(format!(
                "{} weights are for the CPU: use --dtype bfloat16 on a GPU",
                format.name()
            )));
        }
        // Dense weights are narrowed or quantized as they are read: peak memory is the bf16 or
        // quantized model's, not fp32's.
        let zeros = match precision {
            _ if narrow => Weights::ZerosBf16Dense,
            Precision::Quantized(format) => Weights::ZerosQuantizedDense(format),
            Precision::Dense(_) => Weights::Zeros,
        };
        let kind = if narrow { Kind::Float } else { precision.kind() };
        // fp32 on the CPU: the blocks' dense weights are packed in panels (most) or copied below, so
        // they are mapped from the file meanwhile rather than read into memory packing replaces.
        let blocks_mapped = precision == Precision::Dense(Kind::Float) && device == Device::Cpu;
        let mut progress = progress;
        let (mut model, read) = kernels::memory::loading_weights(|| {
            let (mut model, read) = GptBigCode::load_into(dir, kind, device, zeros, blocks_mapped, &mut progress)?;
            if let Some(stored) = model.quantized_format().filter(|&f| precision != Precision::Quantized(f)) {
                let name = stored.name();
                return Err(ModelError::Invalid(format!(
                    "{} holds {name} weights (from `wizard quantize`): load it as {name} (its --dtype or --draft-dtype {name}, or none)",
                    dir.display()
                )));
            }
            if let Precision::Quantized(format) = precision {
                // What was not quantized as it was read: a head tied to the embeddings.
                if model.quantized_format().is_none() {
                    model.quantize(format, &mut progress)?;
                }
            }
            if narrow {
                model.narrow_dense_weights()?;
            }
            Ok((model, read))
        })?;
        if device == Device::Cpu {
            note_kernel_fallback(precision);
            // The dense kernel, libtorch or panels, per shape, by a measurement on this machine (cached).
            let cache = kernels::calibrate::default_cache_file();
            let measured = kernels::calibrate::calibrate(&model.dense_weights(), cache.as_deref());
            for m in measured {
                tracing::debug!(
                    shape = ?m.shape,
                    choice = ?m.choice,
                    kernel_us = ?m.kernel_us,
                    libtorch_us = ?m.libtorch_us,
                    panels_us = ?m.panels_us,
                    cached = m.cached,
                    "dense product"
                );
            }
            // Packed weights are new tensors: in 2 MiB pages too.
            let packed = kernels::memory::loading_weights(|| -> Result<usize> {
                let packed = model.pack_panels()?;
                if blocks_mapped {
                    // What is still mapped from the file (shapes not packed) becomes the model's own.
                    model.own_dense_weights();
                }
                Ok(packed)
            })?;
            if packed > 0 {
                tracing::debug!(layers = packed, "dense layers packed in panels");
            }
            // Whether decode steps prefetch the next weight rows, and take bf16 on AMX tiles, by a
            // measurement too (cached).
            let weights = model.dense_weights();
            let quantized: Vec<&QuantizedWeight> =
                model.quantized_layers().into_iter().map(|(_, weight)| weight).collect();
            for m in kernels::calibrate::calibrate_one_row(&weights, &quantized, cache.as_deref()) {
                tracing::debug!(
                    question = ?m.question,
                    kind = ?m.kind,
                    quantized = ?m.quantized,
                    size_mib = m.size_mib,
                    on_us = m.on_us,
                    off_us = m.off_us,
                    cached = m.cached,
                    "one-row products: {}",
                    if m.on { "on" } else { "off" }
                );
            }
        }
        // Nothing is mapped from the files any more.
        read.check_whole()?;
        Ok(model)
    }

    /// Writes a quantized model (from [`quantize`](Self::quantize)) into `dir`: the values (int8, or
    /// int4 two to a uint8 byte) under each dense layer's name, their fp32 scales under
    /// `NAME_scale`, the rest in fp32, and config.json with a `quantization_config`.
    pub fn save_quantized(&self, dir: &Path) -> Result<()> {
        let Some(format) = self.quantized_format() else {
            return Err(ModelError::Invalid("the model is not quantized".into()));
        };
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let layers = self.quantized_layers();
        let mut tensors: Vec<(String, Tensor)> = self
            .vars()
            .variables()
            .into_iter()
            .filter(|(name, _)| !layers.iter().any(|(layer, _)| layer == name))
            // Tied, the table is the quantized head.
            .filter(|(name, _)| !(self.table_in_head() && name == "transformer.wte.weight"))
            .collect();
        for (name, weight) in layers {
            let (values, scales) = weight.parts();
            tensors.push((format!("{name}{SCALE_SUFFIX}"), scales));
            tensors.push((name, values));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        checkpoint::save_as_they_are(dir, &tensors)?;
        let mut config: serde_json::Value =
            serde_json::from_str(&self.config().to_json(dtype_name(Kind::Float))).expect("config is JSON");
        let values = match format {
            Format::Int8 => "int8 [out, in padded to a multiple of 32], in NAME",
            Format::Int4 => {
                "uint8 [out, in padded to a multiple of 32 / 2], in NAME: value 2i in the low nibble, 2i + 1 in the \
                 high one, each stored plus 8 (values -8..=7)"
            }
        };
        config["quantization_config"] = serde_json::json!({
            "quant_method": quant_method(format),
            "bits": format.bits(),
            "block_size": kernels::quantized::BLOCK,
            "values": values,
            "scales": "float32, one per block of 32 input features of each output row, in NAME_scale; each a \
                       float16 times a power of two shared by the tensor",
            "modules": "every attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj and lm_head",
        });
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("config serializes");
        files::write_atomically(&path, text.as_bytes()).map_err(|e| ModelError::io(&path, e))
    }

    /// Writes `config.json` and `model.safetensors` in `kind` into `dir` (created if needed), each
    /// replaced atomically.
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        if self.table_in_head() || self.quantized_format().is_some() {
            return Err(ModelError::Invalid(
                "a quantized or bf16-narrowed model is saved with save_quantized or not at all".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        // Layers packed in panels for inference are written in the checkpoint's [out, in].
        let as_stored = |tensor: Tensor| match kernels::linear::is_panels(&tensor) {
            true => kernels::linear::unpack_panels(&tensor).map_err(|e| ModelError::Invalid(e.to_string())),
            false => Ok(tensor),
        };
        let mut tensors = self
            .vars()
            .variables()
            .into_iter()
            .map(|(name, tensor)| Ok((name, as_stored(tensor)?)))
            .collect::<Result<Vec<(String, Tensor)>>>()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        checkpoint::save(dir, &tensors, kind)?;
        let config = dir.join("config.json");
        files::write_atomically(&config, self.config().to_json(dtype_name(kind)).as_bytes())
            .map_err(|e| ModelError::io(&config, e))
    }
}

/// Warns, once per process and message, when this CPU runs slower kernels for `precision` than one
/// with the instructions they want (or `WIZARD_CPU_MAX` is not a cap the kernels know).
fn note_kernel_fallback(precision: Precision) {
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let format = match precision {
        Precision::Quantized(_) => WeightFormat::Quantized,
        Precision::Dense(Kind::BFloat16) => WeightFormat::Bfloat16,
        Precision::Dense(Kind::Float) => WeightFormat::Float32,
        Precision::Dense(_) => return,
    };
    let mut said = SAID.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for note in [kernels::cpu::unknown_cap(), kernels::cpu::fallback(format)].into_iter().flatten() {
        if said.insert(note.clone()) {
            tracing::warn!("{note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file truncated while the blocks' fp32 weights are still its mapped pages (before they are
    /// packed or copied): the copies read zeros where it lost bytes, and the load is refused.
    #[test]
    fn a_load_whose_file_lost_mapped_pages_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig {
            vocab_size: 64,
            n_positions: 32,
            n_embd: 256,
            n_layer: 2,
            n_head: 4,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..Default::default()
        };
        GptBigCode::new(config, Device::Cpu).unwrap().save(dir.path(), Kind::Float).unwrap();
        let loaded = GptBigCode::load_into(dir.path(), Kind::Float, Device::Cpu, Weights::Zeros, true, &mut |_, _| {});
        let (mut model, read) = loaded.unwrap();
        let file = dir.path().join("model.safetensors");
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();
        model.own_dense_weights();
        match read.check_whole() {
            Err(ModelError::ChangedWhileRead { path }) => assert_eq!(path, file),
            other => panic!("expected the file named as changed, got {other:?}"),
        }
    }
}
