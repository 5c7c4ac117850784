//! A [`GptBigCode`] to and from a Hugging Face model directory (`config.json` and safetensors):
//! tensors are copied name for name into and out of the model's variables.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::files;
use crate::gpt_bigcode::{dtype_name, GptBigCode, Weights};
use crate::{ModelError, Result};

/// Buffers that old checkpoints carry and `transformers` ignores.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with(".attn.masked_bias") || name.ends_with(".attn.bias")
}

impl GptBigCode {
    /// Loads a Hugging Face model directory (`config.json` + safetensors) in `kind` on `device`.
    /// Tensors are read one at a time straight into the weights.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<GptBigCode> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tied = config.tie_word_embeddings;
        let model = GptBigCode::build(config, device, kind, Weights::Zeros)?;
        let mut pending = model.vars().variables();
        tch::no_grad(|| {
            checkpoint::for_each_tensor(dir, |name, tensor, file| {
                let tensor_error = |message: String| ModelError::Tensor {
                    path: file.to_path_buf(),
                    tensor: name.to_string(),
                    message,
                };
                let Some(var) = pending.remove(name) else {
                    let tied_head = name == "lm_head.weight" && tied;
                    return if tied_head || is_ignored_buffer(name) {
                        Ok(())
                    } else {
                        Err(tensor_error("is not part of a GPTBigCode model".into()))
                    };
                };
                if tensor.size() != var.size() {
                    let message = format!("has shape {:?}, config.json implies {:?}", tensor.size(), var.size());
                    return Err(tensor_error(message));
                }
                var.shallow_clone().f_copy_(&tensor)?;
                Ok(())
            })
        })?;
        let mut missing: Vec<String> = pending.into_keys().collect();
        missing.sort();
        if let Some(first) = missing.first() {
            let file = checkpoint::weight_files(dir)?.remove(0);
            let message = format!("missing from the checkpoint ({} missing in all)", missing.len());
            return Err(ModelError::Tensor { path: file, tensor: first.clone(), message });
        }
        Ok(model)
    }

    /// Writes `config.json` and `model.safetensors` in `kind` into `dir` (created if needed), each
    /// replaced atomically.
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut tensors: Vec<(String, Tensor)> = self.vars().variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        checkpoint::save(dir, &tensors, kind)?;
        let config = dir.join("config.json");
        files::write_atomically(&config, self.config().to_json(dtype_name(kind)).as_bytes())
            .map_err(|e| ModelError::io(&config, e))
    }
}
