//! Broken model directories: every error names the file, tensor or field, and nothing panics.
use std::path::Path;

use model::config::ModelConfig;
use model::generate::{generate, GenerateConfig, NoStop, Sampling};
use model::gpt_bigcode::{Dropout, GptBigCode};
use tch::{Device, Kind, Tensor};

fn tiny_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        n_positions: 16,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        ..Default::default()
    }
}

/// Saves a valid tiny model into a fresh directory, lets `damage` break it, and checks that
/// loading fails with an error containing every one of `expected`.
fn check(damage: impl FnOnce(&Path), expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    GptBigCode::new(tiny_config(), Device::Cpu).unwrap().save(dir.path(), Kind::Float).unwrap();
    damage(dir.path());
    let error = match GptBigCode::load(dir.path(), Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading succeeded; expected {expected:?}"),
        Err(error) => error.to_string(),
    };
    for part in expected {
        assert!(error.contains(part), "expected {part:?} in: {error}");
    }
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    edit(&mut tensors);
    std::fs::remove_file(&file).unwrap();
    Tensor::write_safetensors(&tensors, &file).unwrap();
}

/// Rewrites the weights with the tensor `name` replaced by `replace(tensor)`.
fn replace_tensor(dir: &Path, name: &str, replace: impl Fn(&Tensor) -> Tensor) {
    rewrite_weights(dir, |tensors| {
        let (_, tensor) = tensors.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}"));
        *tensor = replace(tensor);
    })
}

fn edit_config(dir: &Path, from: &str, to: &str) {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{text}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

#[test]
fn missing_files() {
    check(|d| std::fs::remove_file(d.join("config.json")).unwrap(), &["config.json", "No such file"]);
    check(
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        &["model.safetensors", "no model.safetensors"],
    );
    check(
        |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("pytorch_model.bin"), b"pickle").unwrap();
        },
        &["convert it to safetensors"],
    );
}

#[test]
fn corrupt_files() {
    check(
        |d| {
            let file = d.join("model.safetensors");
            let bytes = std::fs::read(&file).unwrap();
            std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        },
        &["model.safetensors", "do not hold shape", "truncated"],
    );
    check(
        |d| std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap(),
        &["model.safetensors", "not a valid safetensors file", "header"],
    );
    check(
        |d| std::fs::write(d.join("model.safetensors"), b"\xff\xff\xff\xff\x00\x00\x00\x00").unwrap(),
        &["model.safetensors", "not a valid safetensors file", "does not fit"],
    );
    check(|d| std::fs::write(d.join("config.json"), "{\"model_type\": ").unwrap(), &["config.json", "line 1"]);
}

#[test]
fn wrong_tensors() {
    check(
        |d| rewrite_weights(d, |t| t.retain(|(name, _)| name != "transformer.h.0.mlp.c_fc.bias")),
        &["model.safetensors", "transformer.h.0.mlp.c_fc.bias", "missing"],
    );
    check(
        |d| replace_tensor(d, "transformer.wpe.weight", |_| Tensor::zeros([8, 16], (Kind::Float, Device::Cpu))),
        &["transformer.wpe.weight", "shape [8, 16]", "[16, 16]"],
    );
    check(
        |d| replace_tensor(d, "transformer.ln_f.bias", |t| t.to_kind(Kind::Int64)),
        &["transformer.ln_f.bias", "I64", "is not a weight type"],
    );
    check(
        |d| {
            rewrite_weights(d, |t| {
                t.push(("transformer.h.7.attn.c_attn.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))))
            })
        },
        &["transformer.h.7.attn.c_attn.weight", "not part of a GPTBigCode model"],
    );
    check(
        |d| replace_tensor(d, "transformer.h.0.ln_1.weight", |t| t.fill(f64::INFINITY)),
        &["model.safetensors", "transformer.h.0.ln_1.weight", "NaN or infinite"],
    );
    check(
        |d| replace_tensor(d, "transformer.h.0.attn.c_attn.weight", |t| t.to_kind(Kind::BFloat16).fill(f64::NAN)),
        &["model.safetensors", "transformer.h.0.attn.c_attn.weight", "NaN or infinite"],
    );
}

#[test]
fn bad_config_fields() {
    check(|d| edit_config(d, "\"gpt_bigcode\"", "\"gpt2\""), &["config.json", "model_type", "\"gpt2\""]);
    check(
        |d| edit_config(d, "\"n_embd\": 16", "\"n_embd\": 24"),
        &["transformer.h.0.attn.c_attn.bias", "shape [32]", "implies [48]"],
    );
    check(|d| edit_config(d, "\"n_head\": 2", "\"n_head\": 3"), &["config.json", "n_head", "not divisible"]);
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let model = GptBigCode::new(tiny_config(), Device::Cpu).unwrap();
    let config = GenerateConfig { max_new_tokens: 4, num_samples: 1, sampling: Sampling::greedy(), eos_token_id: None };
    let error = generate(&model, &[1; 20], &config, &mut NoStop).unwrap_err().to_string();
    assert!(error.contains("20 tokens") && error.contains("n_positions") && error.contains("16"), "{error}");
    let error = tch::no_grad(|| model.forward_full(&Tensor::ones([1, 17], (Kind::Int64, Device::Cpu)), Dropout::Off))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("17 tokens exceed") && error.contains("n_positions = 16"), "{error}");
    // Generation stops at the context instead of overflowing the cache.
    let out = generate(&model, &[1; 10], &GenerateConfig { max_new_tokens: 50, ..config }, &mut NoStop).unwrap();
    assert_eq!(out[0].tokens.len(), 6, "10 prompt tokens + 6 new fill the 16 positions");
}
