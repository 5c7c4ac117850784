//! Sample generation: n samples per problem from a [`Completer`], stored per problem as soon as they
//! exist, so an interrupted run resumes at the first problem that lacks samples.
use model::complete::complete;
use model::generate::{GenerateConfig, Sampling};
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;

use crate::error::Result;
use crate::problems::{extract_code, Benchmark, Problem, PromptFormat};
use crate::samples::Sample;
use crate::store::Store;

/// Something that completes prompts: the model, or a stand-in in tests.
pub trait Completer {
    /// `n` completions of `prompt`, each cut before the first of `stops`; sample i is seeded with `seed + i`.
    fn complete(&mut self, prompt: &str, n: usize, stops: &[String], seed: u64) -> Result<Vec<String>>;
}

/// A GPTBigCode model with its tokenizer; the n samples of a prompt share one prefill.
pub struct ModelCompleter<'m> {
    /// The model.
    pub model: &'m GptBigCode,
    /// Its tokenizer.
    pub tokenizer: &'m Tokenizer,
    /// Most tokens per sample.
    pub max_new_tokens: usize,
    /// Temperature 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
}

impl Completer for ModelCompleter<'_> {
    fn complete(&mut self, prompt: &str, n: usize, stops: &[String], seed: u64) -> Result<Vec<String>> {
        let config = GenerateConfig {
            max_new_tokens: self.max_new_tokens,
            num_samples: n,
            sampling: Sampling { temperature: self.temperature, top_k: None, top_p: self.top_p, seed },
            eos_token_id: self.model.config().eos_token_id.or(Some(i64::from(self.tokenizer.eos_id()))),
        };
        Ok(complete(self.model, self.tokenizer, prompt, &config, stops)?.into_iter().map(|c| c.text).collect())
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// The benchmark (for its stop sequences).
    pub benchmark: Benchmark,
    /// Base completion or instruction template.
    pub format: PromptFormat,
    /// Samples per problem.
    pub samples: usize,
    /// Seed of the first problem's first sample; problem p's samples start at `seed + p * samples`.
    pub seed: u64,
}

/// Generates the missing samples of each problem into the store; `progress` gets (problem index, total).
/// Returns how many problems were generated now (the others were already stored).
pub fn generate(
    completer: &mut dyn Completer,
    problems: &[Problem],
    config: &GenerationConfig,
    store: &mut Store,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize> {
    let stops = match config.format {
        PromptFormat::Base => config.benchmark.stop_sequences(),
        PromptFormat::Instruct => Vec::new(),
    };
    let mut generated = 0;
    for (index, problem) in problems.iter().enumerate() {
        if store.sample_count(&problem.task_id)? >= config.samples {
            progress(index + 1, problems.len());
            continue;
        }
        let seed = config.seed + (index * config.samples) as u64;
        let texts = completer.complete(&problem.prompt_for(config.format), config.samples, &stops, seed)?;
        let samples: Vec<(Sample, String)> = texts
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let completion = match config.format {
                    PromptFormat::Base => raw.clone(),
                    PromptFormat::Instruct => extract_code(&raw),
                };
                (Sample { task_id: problem.task_id.clone(), index: i, completion }, raw)
            })
            .collect();
        store.add_samples(&samples)?;
        generated += 1;
        progress(index + 1, problems.len());
    }
    Ok(generated)
}
