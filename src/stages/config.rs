//! `wizard.toml`: the pipeline's configuration. Unknown keys are errors (serde `deny_unknown_fields`),
//! and `validate` rejects impossible values naming the key (`pretrain.seq_len`, ...).
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: Run,
    /// Train a tokenizer (with `pretrain`); absent when `base` names an existing checkpoint.
    pub tokenizer: Option<TokenizerSection>,
    /// FIM-pretrain the base model from random weights.
    pub pretrain: Option<Pretrain>,
    /// Start from an existing Hugging Face checkpoint instead of `tokenizer` + `pretrain`.
    pub base: Option<Base>,
    /// A smaller model pretrained on the same data with the same tokenizer, for speculative decoding.
    pub draft: Option<Draft>,
    pub evolve: Evolve,
    /// Fine-tuning of the base model on each round's data.
    pub sft: TrainSettings,
    pub eval: Eval,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Output folder, relative to the config file; everything the pipeline makes goes there.
    pub out: PathBuf,
    /// Most evolution rounds (the pipeline stops earlier when pass@1 stops rising).
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// `cpu`, `cuda`, `cuda:N` or `auto`, for generation (evolve with the local model, eval).
    #[serde(default = "default_device")]
    pub device: String,
    /// Weights for generation: `float32`, `bfloat16`, `float16`, `int8` or `int4` (CPU); absent: bfloat16 on a
    /// GPU, float32 on the CPU.
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// Files or directories; `@stdlib/NAME` is NAME in the standard library of the setup's Python.
    pub inputs: Vec<String>,
    pub vocab_size: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    #[serde(default = "default_positions")]
    pub n_positions: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pretrain {
    /// Corpus (default: the tokenizer's inputs).
    pub inputs: Option<Vec<String>>,
    pub model: Shape,
    #[serde(default = "default_fim_rate")]
    pub fim_rate: f64,
    /// `wizard train` settings, as a `[pretrain.train]` table.
    pub train: TrainSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Draft {
    pub model: Shape,
    /// `wizard train` settings, as a `[draft.train]` table.
    pub train: TrainSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// Hugging Face model directory with its tokenizer (e.g. a downloaded starcoderbase-1b).
    pub checkpoint: PathBuf,
}

/// `wizard train` flags shared by pretraining, the draft and SFT.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub steps: usize,
    pub seq_len: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Local ranks (`wizard train --nproc`).
    #[serde(default = "one")]
    pub nproc: usize,
    /// ZeRO stage 0, 1, 2 or 3.
    #[serde(default)]
    pub zero: u8,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Evolve {
    /// Code Alpaca JSONL seeds (default: the 68 shipped with wizard).
    pub seeds: Option<PathBuf>,
    /// OpenAI-compatible endpoint; absent: the base model answers locally, offline.
    pub base_url: Option<String>,
    pub model: Option<String>,
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
    /// Remove items close to HumanEval (and `eval.mbpp`) problems.
    #[serde(default = "yes")]
    pub decontaminate: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Eval {
    /// Only the first N HumanEval problems (all 164 by default).
    pub limit: Option<usize>,
    #[serde(default = "one")]
    pub samples: usize,
    #[serde(default)]
    pub temperature: f64,
    pub top_p: Option<f64>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// `instruct` (WizardCoder's template) or `base`.
    #[serde(default = "default_format")]
    pub format: String,
    /// MBPP too, from this file (Google's JSONL, sanitized JSON or MBPP+).
    pub mbpp: Option<PathBuf>,
    /// Seconds a sample may run.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_rounds() -> u32 {
    3
}
fn default_device() -> String {
    "auto".into()
}
fn default_positions() -> i64 {
    512
}
fn default_fim_rate() -> f64 {
    0.5
}
fn default_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    3e-4
}
fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_concurrency() -> usize {
    16
}
fn default_max_tokens() -> u32 {
    512
}
fn default_temperature() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_new_tokens() -> usize {
    512
}
fn default_format() -> String {
    "instruct".into()
}
fn default_timeout() -> f64 {
    3.0
}

impl Config {
    /// Reads, parses and validates `path`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Config::parse(&text, dir).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Config> {
        let mut config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        config.validate()?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                // `components` drops the `.` of `out = "."`.
                *p = dir.join(&*p).components().collect();
            }
        };
        resolve(&mut config.run.out);
        if let Some(base) = &mut config.base {
            resolve(&mut base.checkpoint);
        }
        if let Some(seeds) = &mut config.evolve.seeds {
            resolve(seeds);
        }
        if let Some(mbpp) = &mut config.eval.mbpp {
            resolve(mbpp);
        }
        let dir = dir.to_path_buf();
        let fix = |inputs: &mut Vec<String>| {
            for input in inputs.iter_mut() {
                if !input.starts_with("@stdlib") && Path::new(input.as_str()).is_relative() {
                    *input = dir.join(&*input).to_string_lossy().into_owned();
                }
            }
        };
        if let Some(tokenizer) = &mut config.tokenizer {
            fix(&mut tokenizer.inputs);
        }
        if let Some(inputs) = config.pretrain.as_mut().and_then(|p| p.inputs.as_mut()) {
            fix(inputs);
        }
        Ok(config)
    }

    /// Impossible values, each error naming its key.
    fn validate(&self) -> anyhow::Result<()> {
        let fail = |key: &str, why: String| Err(anyhow::anyhow!("`{key}`: {why}"));
        if self.run.rounds == 0 {
            return fail("run.rounds", "must be at least 1".into());
        }
        if let Some(dtype) = &self.run.dtype {
            let precision =
                model::gpt_bigcode::parse_precision(dtype).map_err(|e| anyhow::anyhow!("`run.dtype`: {e}"))?;
            if precision.is_quantized() && self.run.device.starts_with("cuda") {
                return fail(
                    "run.dtype",
                    format!("{dtype} runs on the CPU, not on `run.device` = {:?}", self.run.device),
                );
            }
        }
        match (&self.base, &self.tokenizer, &self.pretrain) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            (Some(_), ..) => return fail("base", "give either [base] or [tokenizer] with [pretrain], not both".into()),
            (None, None, _) => return fail("tokenizer", "missing: give [tokenizer] and [pretrain], or [base]".into()),
            (None, Some(_), None) => return fail("pretrain", "missing: [tokenizer] needs [pretrain]".into()),
        }
        if let Some(tokenizer) = &self.tokenizer {
            let min = model::tokenizer::MIN_VOCAB_SIZE;
            if tokenizer.vocab_size < min {
                return fail(
                    "tokenizer.vocab_size",
                    format!("{} is below {min} (special + byte tokens)", tokenizer.vocab_size),
                );
            }
            if tokenizer.inputs.is_empty() {
                return fail("tokenizer.inputs", "is empty".into());
            }
        }
        if let Some(pretrain) = &self.pretrain {
            check_shape("pretrain.model", &pretrain.model)?;
            check_train("pretrain.train", &pretrain.train, Some(pretrain.model.n_positions))?;
            if !(0.0..=1.0).contains(&pretrain.fim_rate) {
                return fail("pretrain.fim_rate", format!("{} is not a probability", pretrain.fim_rate));
            }
        }
        if let Some(draft) = &self.draft {
            if self.pretrain.is_none() {
                return fail("draft", "needs [pretrain] (the draft shares its tokenizer and corpus)".into());
            }
            check_shape("draft.model", &draft.model)?;
            check_train("draft.train", &draft.train, Some(draft.model.n_positions))?;
        }
        check_train("sft", &self.sft, self.pretrain.as_ref().map(|p| p.model.n_positions))?;
        let evolve = &self.evolve;
        if evolve.base_url.is_some() != evolve.model.is_some() {
            return fail("evolve.model", "`evolve.base_url` and `evolve.model` go together".into());
        }
        if evolve.concurrency == 0 {
            return fail("evolve.concurrency", "must be at least 1".into());
        }
        if evolve.max_tokens == 0 {
            return fail("evolve.max_tokens", "must be at least 1".into());
        }
        if !(evolve.temperature >= 0.0 && evolve.temperature.is_finite()) {
            return fail("evolve.temperature", format!("{} is not a temperature", evolve.temperature));
        }
        let eval = &self.eval;
        if eval.samples == 0 {
            return fail("eval.samples", "must be at least 1".into());
        }
        if eval.limit == Some(0) {
            return fail("eval.limit", "must be at least 1".into());
        }
        if !(eval.temperature >= 0.0 && eval.temperature.is_finite()) {
            return fail("eval.temperature", format!("{} is not a temperature", eval.temperature));
        }
        if eval.samples > 1 && eval.temperature == 0.0 {
            return fail("eval.samples", "several samples per problem need `eval.temperature` above 0".into());
        }
        if eval.max_new_tokens == 0 {
            return fail("eval.max_new_tokens", "must be at least 1".into());
        }
        if eval.format != "instruct" && eval.format != "base" {
            return fail("eval.format", format!("{:?}: use instruct or base", eval.format));
        }
        if !eval::sandbox::TIMEOUT_SECONDS.contains(&eval.timeout) {
            return fail("eval.timeout", "must be 0.001 to 86400 seconds (as wizard eval's --timeout)".into());
        }
        Ok(())
    }
}

fn check_shape(key: &str, shape: &Shape) -> anyhow::Result<()> {
    for (name, value) in [
        ("n_embd", shape.n_embd),
        ("n_layer", shape.n_layer),
        ("n_head", shape.n_head),
        ("n_positions", shape.n_positions),
    ] {
        anyhow::ensure!(value > 0, "`{key}.{name}`: must be positive, not {value}");
    }
    anyhow::ensure!(
        shape.n_embd % shape.n_head == 0,
        "`{key}.n_head`: {} does not divide n_embd = {}",
        shape.n_head,
        shape.n_embd
    );
    Ok(())
}

fn check_train(key: &str, train: &TrainSettings, positions: Option<i64>) -> anyhow::Result<()> {
    for (name, value) in [
        ("steps", train.steps),
        ("seq_len", train.seq_len),
        ("batch_size", train.batch_size),
        ("grad_accum", train.grad_accum),
        ("nproc", train.nproc),
    ] {
        anyhow::ensure!(value > 0, "`{key}.{name}`: must be at least 1");
    }
    anyhow::ensure!(train.lr > 0.0 && train.lr.is_finite(), "`{key}.lr`: {} is not a learning rate", train.lr);
    anyhow::ensure!(train.zero <= 3, "`{key}.zero`: stage {} does not exist (use 0, 1, 2 or 3)", train.zero);
    if let Some(positions) = positions {
        anyhow::ensure!(
            train.seq_len as i64 <= positions,
            "`{key}.seq_len`: {} is longer than the model's n_positions = {positions}",
            train.seq_len
        );
    }
    Ok(())
}
