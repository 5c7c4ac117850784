//! Broken model directories: every error names the file, tensor or field, and nothing panics.
use std::io::Write;
use std::path::Path;

use kernels::quantized::Format;
use model::checkpoint;
use model::config::ModelConfig;
use model::engine::{Engine, EngineConfig, Request, Speculation};
use model::generate::{generate, GenerateConfig, NoStop, Sampling};
use model::gpt_bigcode::{Dropout, GptBigCode, Precision};
use model::speculative::{self, Drafter, SpeculativeConfig};
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

/// Rewrites the safetensors header of `dir`'s weights through `edit`, the data as it was.
fn rewrite_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + length..]);
    std::fs::write(&file, out).unwrap();
}

/// Splits the weights into two shards listed by an index (in name order: `transformer.wte.weight`
/// in the second); with `duplicate`, the second shard also holds the first's first tensor, and
/// `moved` (a tensor, a shard) has the index place that tensor in that shard.
fn shard(dir: &Path, duplicate: bool, moved: Option<(&str, &str)>) {
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::remove_file(&file).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut second: Vec<(String, Tensor)> = second.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    if duplicate {
        second.push((first[0].0.clone(), first[0].1.copy()));
    }
    let mut map = serde_json::Map::new();
    for (shard, tensors) in
        [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", &second[..])]
    {
        Tensor::write_safetensors(tensors, dir.join(shard)).unwrap();
        for (name, _) in tensors {
            let placed = moved.filter(|(tensor, _)| tensor == name).map_or(shard, |(_, elsewhere)| elsewhere);
            // An index names one shard for a tensor: the first.
            map.entry(name.clone()).or_insert_with(|| placed.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
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
        &["model.safetensors", "past the end of the file's", "truncated"],
    );
    check(
        |d| {
            std::fs::OpenOptions::new().append(true).open(d.join("model.safetensors")).unwrap().write_all(b"x").unwrap()
        },
        &["model.safetensors", "its tensors hold", "the file has"],
    );
    // Tensors must lie end to end: one over another's bytes would load them as its own (here
    // leaving a gap where its own were).
    check(
        |d| {
            rewrite_header(d, |header| {
                // Both [16, 16].
                let first = header["transformer.wpe.weight"]["data_offsets"].clone();
                header["transformer.h.0.attn.c_proj.weight"]["data_offsets"] = first;
            })
        },
        &["model.safetensors", "tensors lie end to end"],
    );
    check(
        |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::fs::create_dir(d.join("model.safetensors")).unwrap();
        },
        &["model.safetensors", "not a regular file"],
    );
    check(
        |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::os::unix::fs::symlink(d.join("gone.safetensors"), d.join("model.safetensors")).unwrap();
        },
        &["model.safetensors", "No such file"],
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
    // A FIFO would block the read for ever (the quantization format is read first).
    check(
        |d| {
            std::fs::remove_file(d.join("config.json")).unwrap();
            let status = std::process::Command::new("mkfifo").arg(d.join("config.json")).status().unwrap();
            assert!(status.success());
        },
        &["config.json", "not a regular file"],
    );
}

#[test]
fn bad_shards() {
    check(
        |d| shard(d, true, None),
        &["model-00002-of-00002.safetensors", "is also in", "model-00001-of-00002.safetensors"],
    );
    check(
        |d| shard(d, false, Some(("transformer.wpe.weight", "../elsewhere.safetensors"))),
        &["model.safetensors.index.json", "transformer.wpe.weight", "not a path inside the model directory"],
    );
    check(
        |d| shard(d, false, Some(("transformer.wte.weight", "model-00001-of-00002.safetensors"))),
        &["transformer.wte.weight", "is in this shard", "places it in"],
    );
    // An index entry no shard holds.
    check(
        |d| {
            shard(d, false, None);
            let path = d.join("model.safetensors.index.json");
            let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
            std::fs::write(&path, index.to_string()).unwrap();
        },
        &["model.safetensors.index.json", "ghost.weight", "model-00001-of-00002.safetensors does not hold it"],
    );
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
    // A tied model's head, stored anyway, is unused but must fit the token table.
    check(
        |d| {
            rewrite_weights(d, |t| {
                t.push(("lm_head.weight".into(), Tensor::zeros([50, 8], (Kind::Float, Device::Cpu))))
            })
        },
        &["model.safetensors", "lm_head.weight", "shape [50, 8]", "[50, 16]"],
    );
    check(
        |d| replace_tensor(d, "transformer.h.0.mlp.c_fc.weight", |t| (t * 100.0).to_kind(Kind::Int8)),
        &["model.safetensors", "transformer.h.0.mlp.c_fc.weight", "stored as Int8", "quantization_config"],
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
    // Sizes are checked against the checkpoint before anything of that size is allocated.
    check(
        |d| edit_config(d, "\"n_embd\": 16", "\"n_embd\": 1099511627776"),
        &["transformer.wpe.weight", "shape [16, 16]", "n_positions and n_embd imply [16, 1099511627776]"],
    );
    check(
        |d| edit_config(d, "\"n_layer\": 1", "\"n_layer\": 1000000000"),
        &["transformer.h.999999999.ln_1.weight", "missing from the checkpoint"],
    );
    check(
        |d| edit_config(d, "\"vocab_size\": 50", "\"vocab_size\": 5000000000000"),
        &["vocab_size 5000000000000", "token table has shape [50, 16]"],
    );
    // Without a token table there is nothing to check vocab_size against: refused, not allocated.
    check(
        |d| {
            rewrite_weights(d, |t| t.retain(|(name, _)| name != "transformer.wte.weight"));
            edit_config(d, "\"vocab_size\": 50", "\"vocab_size\": 5000000000000");
        },
        &["model.safetensors", "holds no token table", "transformer.wte.weight"],
    );
    check(
        |d| edit_config(d, "\"n_inner\": null", "\"n_inner\": 100000000000"),
        &["transformer.h.0.mlp.c_fc.bias", "[64]"],
    );
    check(
        |d| edit_config(d, "\"layer_norm_epsilon\": 0.00001", "\"layer_norm_epsilon\": 1e300"),
        &["config.json", "layer_norm_epsilon", "(0, 1]"],
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

/// Weights that make the activations overflow (finite, but far past what float32 sums hold): every
/// inference path refuses the NaN logits instead of answering token 0 (end of text) as if all were
/// well.
#[test]
fn overflowing_weights_are_an_error_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let good = GptBigCode::new(tiny_config(), Device::Cpu).unwrap();
    good.save(dir.path(), Kind::Float).unwrap();
    for name in ["transformer.ln_f.weight", "transformer.ln_f.bias"] {
        replace_tensor(dir.path(), name, |t| t.ones_like() * 3e38);
    }
    let broken = GptBigCode::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
    let prompt = [5, 6, 7, 5, 6];
    let sampled = Sampling { temperature: 0.8, seed: 3, ..Sampling::greedy() };
    let check = |outcome: Result<(), String>, whose: &str| {
        let error = outcome.expect_err("generation succeeded on NaN logits");
        assert!(error.contains(&format!("the {whose}'s logits are NaN or infinite")), "{error}");
    };
    for sampling in [Sampling::greedy(), sampled.clone()] {
        let plain =
            GenerateConfig { max_new_tokens: 4, num_samples: 2, sampling: sampling.clone(), eos_token_id: None };
        check(generate(&broken, &prompt, &plain, &mut NoStop).map(drop).map_err(|e| e.to_string()), "model");
        let speculative = |target: &GptBigCode, drafter: &Drafter| {
            let config = SpeculativeConfig {
                max_new_tokens: 4,
                sampling: sampling.clone(),
                gamma: 2,
                max_gamma: 2,
                adaptive: false,
                ..Default::default()
            };
            speculative::generate(target, drafter, &prompt, &config, &mut NoStop).map(drop).map_err(|e| e.to_string())
        };
        check(speculative(&broken, &Drafter::PromptLookup { max_ngram: 2 }), "model");
        check(speculative(&good, &Drafter::Model(&broken)), "draft model");
        check(speculative(&broken, &Drafter::Model(&good)), "model");
    }
    let path = dir.path().to_path_buf();
    let engine =
        Engine::start(EngineConfig::default(), move || GptBigCode::load(&path, Kind::Float, Device::Cpu)).unwrap();
    let requests = [
        Request { n: 2, ..Request::new(prompt.to_vec(), 4) },
        Request { n: 2, sampling: sampled.clone(), ..Request::new(prompt.to_vec(), 4) },
        // Alone, speculating with prompt lookup.
        Request {
            speculation: Some(Speculation { gamma: 2, fixed: true, reuse_prefix: false }),
            ..Request::new(prompt.to_vec(), 4)
        },
    ];
    for request in requests {
        check(engine.generate(request).map(drop).map_err(|e| e.to_string()), "model");
    }
}

/// A weight file truncated by another process while its tensors are mapped: the bytes it lost read
/// as zeros instead of ending the process (SIGBUS), and the load, asking its files once the tensors
/// are used up, is refused, even where the file was written whole again meanwhile.
#[test]
fn a_file_truncated_while_mapped_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    GptBigCode::new(tiny_config(), Device::Cpu).unwrap().save(dir.path(), Kind::Float).unwrap();
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let tensors = checkpoint::shapes(dir.path()).unwrap().len();
    let mut kept = Vec::new();
    let read = checkpoint::for_each_tensor(
        dir.path(),
        |_| true,
        |_, tensor, _| {
            kept.push(tensor);
            if kept.len() == tensors {
                let writer = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                writer.set_len(bytes.len() as u64 / 2).unwrap();
            }
            Ok(())
        },
    )
    .unwrap();
    let sum: f64 = kept.iter().map(|t| t.abs().sum(Kind::Double).double_value(&[])).sum();
    assert!(sum.is_finite() && sum > 0.0, "{sum}");
    std::fs::write(&file, &bytes).unwrap();
    let error = read.check_whole().unwrap_err().to_string();
    assert!(error.contains("model.safetensors") && error.contains("changed while it was read"), "{error}");
    // A later load that loses nothing passes.
    let mut sums = 0.0;
    let again = checkpoint::for_each_tensor(
        dir.path(),
        |_| true,
        |_, tensor, _| {
            sums += tensor.abs().sum(Kind::Double).double_value(&[]);
            Ok(())
        },
    );
    again.unwrap().check_whole().unwrap();
    assert!(sums > sum, "the first read saw zeros where the file lost bytes: {sum} of {sums}");
}

/// A file truncated while a load reads it (here between two layers quantized as they are read):
/// the tensors after the cut are refused as changed, naming the file.
#[test]
fn a_file_truncated_while_it_loads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    GptBigCode::new(tiny_config(), Device::Cpu).unwrap().save(dir.path(), Kind::Float).unwrap();
    let file = dir.path().join("model.safetensors");
    let truncate = |done: usize, _| {
        if done == 1 {
            std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(16).unwrap();
        }
    };
    let loaded = GptBigCode::load_as(dir.path(), Precision::Quantized(Format::Int8), Device::Cpu, truncate);
    let Err(error) = loaded.map(drop) else { panic!("the load succeeded") };
    let error = error.to_string();
    assert!(error.contains("model.safetensors") && error.contains("changed while it was read"), "{error}");
}
