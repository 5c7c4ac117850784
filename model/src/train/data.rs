//! Training data: a pretraining corpus (tokenized in parallel, FIM applied per document, joined
//! with `<|endoftext|>` and packed into fixed-length sequences) or instruction data in WizardCoder's
//! Alpaca format (loss on the response and EOS only). Order is shuffled with a seed; a slice is held
//! out for eval loss.
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::Deserialize;

use super::fim::{self, FimConfig, FimTokens};
use crate::corpus;
use crate::jsonl::{LineError, Lines};
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// What the data is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Next-token prediction on a code corpus, with FIM.
    Pretrain,
    /// Instruction fine-tuning on `{"instruction", "input"?, "output"}` JSONL.
    Sft,
}

/// How to build the dataset.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Files and directories.
    pub inputs: Vec<PathBuf>,
    /// Pretraining or instruction tuning.
    pub mode: Mode,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// FIM rates (pretraining only).
    pub fim: FimConfig,
    /// Seed of the shuffle and of FIM.
    pub seed: u64,
    /// Share of sequences held out for eval loss.
    pub eval_fraction: f64,
    /// Source-file extensions taken from directories.
    pub extensions: Vec<String>,
    /// Count and skip JSONL lines that do not parse, instead of stopping at the first.
    pub skip_bad_lines: bool,
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Input ids, `seq_len` long.
    pub input: Vec<i64>,
    /// Next-token targets, `IGNORE` where no loss is taken.
    pub labels: Vec<i64>,
}

/// What was read and built, printed before training.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    /// Documents or instruction examples read.
    pub documents: usize,
    /// Tokens after FIM and templating.
    pub tokens: usize,
    /// Documents transformed by FIM.
    pub fim_documents: usize,
    /// Instruction examples longer than `seq_len`, dropped.
    pub dropped_too_long: usize,
    /// JSONL lines that did not parse, skipped (with `skip_bad_lines`).
    pub skipped_lines: usize,
    /// Training sequences.
    pub train: usize,
    /// Held-out sequences.
    pub eval: usize,
}

/// Training and held-out sequences.
pub struct Dataset {
    /// Shuffled training sequences.
    pub train: Vec<Example>,
    /// Held-out sequences.
    pub eval: Vec<Example>,
    /// Counts.
    pub stats: DataStats,
}

/// WizardCoder's prompt for an instruction with no input.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|i| !i.trim().is_empty()) {
        Some(input) => format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
             ### Input:\n{input}\n\n### Response:"
        ),
        None => format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the \
             request.\n\n### Instruction:\n{instruction}\n\n### Response:"
        ),
    }
}

/// Reads, tokenizes, packs, shuffles and splits.
pub fn build(config: &DataConfig, tokenizer: &Tokenizer) -> Result<Dataset> {
    if config.seq_len < 2 {
        return Err(ModelError::Invalid(format!("--seq-len must be at least 2, got {}", config.seq_len)));
    }
    let (mut examples, mut stats) = match config.mode {
        Mode::Pretrain => pretrain_examples(config, tokenizer)?,
        Mode::Sft => sft_examples(config, tokenizer)?,
    };
    if examples.is_empty() {
        return Err(ModelError::Invalid(format!(
            "the data gives no training sequence of {} tokens ({} documents, {} tokens, {} dropped as too long)",
            config.seq_len, stats.documents, stats.tokens, stats.dropped_too_long
        )));
    }
    examples.shuffle(&mut StdRng::seed_from_u64(config.seed));
    let held_out = if examples.len() >= 2 {
        ((examples.len() as f64 * config.eval_fraction).ceil() as usize).clamp(1, examples.len() / 2)
    } else {
        0
    };
    let eval = examples.split_off(examples.len() - held_out);
    stats.train = examples.len();
    stats.eval = eval.len();
    Ok(Dataset { train: examples, eval, stats })
}

fn pretrain_examples(config: &DataConfig, tokenizer: &Tokenizer) -> Result<(Vec<Example>, DataStats)> {
    let (documents, skipped_lines) = corpus::read_documents(&config.inputs, &config.extensions, config.skip_bad_lines)?;
    let fim_tokens = if config.fim.rate > 0.0 { Some(FimTokens::of(tokenizer)?) } else { None };
    let eos = tokenizer.eos_id();
    // Each document has its own RNG, so the result does not depend on rayon's scheduling.
    let encoded: Vec<(Vec<u32>, bool)> = documents
        .par_iter()
        .enumerate()
        .map(|(index, text)| {
            let plain = tokenizer.encode(text)?;
            let Some(fim_tokens) = fim_tokens else { return Ok((plain, false)) };
            let mut rng = StdRng::seed_from_u64(config.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let original = plain.clone();
            let tokens = fim::apply(text, plain, tokenizer, fim_tokens, config.fim, &mut rng)?;
            let transformed = tokens != original;
            Ok((tokens, transformed))
        })
        .collect::<Result<_>>()?;
    let mut stream: Vec<i64> = Vec::new();
    let mut stats = DataStats { documents: documents.len(), skipped_lines, ..Default::default() };
    for (tokens, transformed) in encoded {
        stats.fim_documents += usize::from(transformed);
        stream.extend(tokens.into_iter().map(i64::from));
        stream.push(i64::from(eos));
    }
    stats.tokens = stream.len();
    let seq = config.seq_len;
    let examples = (0..stream.len().saturating_sub(1) / seq)
        .map(|i| {
            let chunk = &stream[i * seq..i * seq + seq + 1];
            Example { input: chunk[..seq].to_vec(), labels: chunk[1..].to_vec() }
        })
        .collect();
    Ok((examples, stats))
}

#[derive(Deserialize)]
struct InstructionLine {
    instruction: String,
    input: Option<String>,
    output: String,
}

fn sft_examples(config: &DataConfig, tokenizer: &Tokenizer) -> Result<(Vec<Example>, DataStats)> {
    let eos = i64::from(tokenizer.eos_id());
    let mut stats = DataStats::default();
    let mut examples = Vec::new();
    for path in &config.inputs {
        let mut lines = Lines::open(path).map_err(|e| ModelError::io(path, e))?;
        loop {
            let item: InstructionLine = match lines.read() {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(LineError::Bad { line, message }) if config.skip_bad_lines => {
                    tracing::warn!("skipping {}: line {line}: {message}", path.display());
                    stats.skipped_lines += 1;
                    continue;
                }
                Err(error) => return Err(ModelError::jsonl(path, error)),
            };
            stats.documents += 1;
            let prompt = alpaca_prompt(&item.instruction, item.input.as_deref());
            let prompt_ids: Vec<i64> = tokenizer.encode(&prompt)?.into_iter().map(i64::from).collect();
            let response_ids: Vec<i64> = tokenizer.encode(&item.output)?.into_iter().map(i64::from).collect();
            let mut ids = prompt_ids.clone();
            ids.extend(&response_ids);
            ids.push(eos);
            stats.tokens += ids.len();
            if ids.len() > config.seq_len + 1 {
                stats.dropped_too_long += 1;
                continue;
            }
            // Targets are the next tokens; only the response and EOS carry loss.
            let mut labels: Vec<i64> = ids[1..].to_vec();
            for label in labels.iter_mut().take(prompt_ids.len() - 1) {
                *label = IGNORE;
            }
            let mut input = ids[..ids.len() - 1].to_vec();
            input.resize(config.seq_len, eos);
            labels.resize(config.seq_len, IGNORE);
            examples.push(Example { input, labels });
        }
    }
    Ok((examples, stats))
}
