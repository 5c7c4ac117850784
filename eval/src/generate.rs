//! Sample generation: n samples per problem from a [`Completer`], stored per problem as soon as they
//! exist, so an interrupted run resumes at the first problem that lacks samples. The editor prompt mode
//! asks the completer for the middle between a prefix and a suffix ([`Completer::infill`]); the CLI
//! answers through the language server's own request path.
use model::complete::complete;
use model::generate::{GenerateConfig, Sampling};
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;

use crate::error::{EvalError, Result};
use crate::problems::{extract_code, Benchmark, Problem, PromptFormat, FIM_STOPS};
use crate::samples::Sample;
use crate::store::Store;

/// Something that completes prompts: the model, or a stand-in in tests.
pub trait Completer {
    /// `n` completions of `prompt`, each cut before the first of `stops`; sample i is seeded with `seed + i`.
    fn complete(&mut self, prompt: &str, n: usize, stops: &[String], seed: u64) -> Result<Vec<String>>;

    /// `n` completions of a cursor between `prefix` and `suffix` as an editor gets them from `wizard
    /// serve`; sample i is seeded with `seed + i`.
    fn infill(&mut self, prefix: &str, suffix: &str, n: usize, seed: u64) -> Result<Vec<String>> {
        let _ = (prefix, suffix, n, seed);
        Err(EvalError::Invalid("this completer has no editor path (--prompt-mode editor)".into()))
    }
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
        PromptFormat::Fim => FIM_STOPS.iter().map(|s| s.to_string()).collect(),
        PromptFormat::Instruct | PromptFormat::Editor => Vec::new(),
    };
    let mut generated = 0;
    for (index, problem) in problems.iter().enumerate() {
        if store.sample_count(&problem.task_id)? >= config.samples {
            progress(index + 1, problems.len());
            continue;
        }
        let seed = config.seed + (index * config.samples) as u64;
        let texts = match config.format {
            PromptFormat::Editor => completer.infill(&problem.prompt, &problem.suffix, config.samples, seed)?,
            format => completer.complete(&problem.prompt_for(format), config.samples, &stops, seed)?,
        };
        let samples: Vec<(Sample, String)> = texts
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let completion = match config.format {
                    PromptFormat::Instruct => extract_code(&raw),
                    PromptFormat::Base | PromptFormat::Fim | PromptFormat::Editor => raw.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problems::{load, LoadOptions};

    /// Answers with what it was asked: the prompt and stops, or the prefix and suffix.
    struct Echo;

    impl Completer for Echo {
        fn complete(&mut self, prompt: &str, n: usize, stops: &[String], seed: u64) -> Result<Vec<String>> {
            Ok((0..n)
                .map(|i| format!("complete({prompt:?}, stops {}, seed {})", stops.len(), seed + i as u64))
                .collect())
        }

        fn infill(&mut self, prefix: &str, suffix: &str, n: usize, seed: u64) -> Result<Vec<String>> {
            Ok((0..n).map(|i| format!("infill({prefix:?}, {suffix:?}, seed {})", seed + i as u64)).collect())
        }
    }

    /// Generates 2 samples of the one infilling problem in `format` with seed 5; the stored completions.
    fn check(format: PromptFormat, expect: &[&str]) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        let problem = r#"{"task_id": "SingleLineInfilling/HumanEval/0/L0", "prompt": "def f():\n", "suffix": "    return x\n", "canonical_solution": "    x = 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}"#;
        std::fs::write(&data, problem).unwrap();
        let problems = load(Benchmark::HumanEvalInfilling, &data, LoadOptions { all_tasks: false }).unwrap();
        let mut store = Store::open(&dir.path().join("eval.sqlite"), "humaneval-infilling").unwrap();
        let config = GenerationConfig { benchmark: Benchmark::HumanEvalInfilling, format, samples: 2, seed: 5 };
        generate(&mut Echo, &problems, &config, &mut store, |_, _| {}).unwrap();
        let got: Vec<String> = store.scored().unwrap().into_iter().map(|(sample, _)| sample.completion).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn prompt_modes() {
        check(
            PromptFormat::Fim,
            &[
                r#"complete("<fim_prefix>def f():\n<fim_suffix>    return x\n<fim_middle>", stops 7, seed 5)"#,
                r#"complete("<fim_prefix>def f():\n<fim_suffix>    return x\n<fim_middle>", stops 7, seed 6)"#,
            ],
        );
        check(
            PromptFormat::Editor,
            &[r#"infill("def f():\n", "    return x\n", seed 5)"#, r#"infill("def f():\n", "    return x\n", seed 6)"#],
        );
        check(
            PromptFormat::Base,
            &[r#"complete("def f():\n", stops 7, seed 5)"#, r#"complete("def f():\n", stops 7, seed 6)"#],
        );
    }
}
