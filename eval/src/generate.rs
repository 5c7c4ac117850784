//! Sample generation: n samples per problem from a [`Completer`], stored per problem as soon as they
//! exist, so an interrupted run resumes at the problems that lack samples. The model completes many
//! problems at once through the shared inference engine ([`ModelCompleter`]); the editor prompt mode
//! asks the completer for the middle between a prefix and a suffix ([`Completer::infill`]), which the
//! CLI answers through the language server's own request path.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use model::complete::StopSequences;
use model::engine::{Engine, Event, Request, SubmitError};
use model::generate::Sampling;
use model::tokenizer::Tokenizer;

use crate::error::{EvalError, Result};
use crate::problems::{extract_code, Benchmark, Problem, PromptFormat, FIM_STOPS};
use crate::samples::Sample;
use crate::store::Store;

/// What one problem asks of a [`Completer`]: `n` samples, sample i seeded with `seed + i`.
#[derive(Debug, Clone)]
pub struct Job<'p> {
    /// What to complete.
    pub input: Input<'p>,
    /// Samples.
    pub n: usize,
    /// The first sample's seed.
    pub seed: u64,
}

/// A prompt to continue, or the two sides of an editor's cursor.
#[derive(Debug, Clone)]
pub enum Input<'p> {
    /// Continue this text, cutting each sample before the first stop sequence.
    Prompt(String),
    /// Fill the middle between `prefix` and `suffix` (the editor prompt mode).
    Cursor {
        /// The text before the cursor.
        prefix: &'p str,
        /// The text after it.
        suffix: &'p str,
    },
}

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

    /// Completes every job (prompts cut before the first of `stops`), calling `done(j, completions)`
    /// once job j's samples all exist, in whatever order jobs end; an error from `done` ends the
    /// call. By default one job at a time, in order, through [`complete`](Completer::complete) and
    /// [`infill`](Completer::infill).
    fn complete_all(
        &mut self,
        jobs: &[Job],
        stops: &[String],
        done: &mut dyn FnMut(usize, Vec<String>) -> Result<()>,
    ) -> Result<()> {
        for (j, job) in jobs.iter().enumerate() {
            let texts = match &job.input {
                Input::Prompt(prompt) => self.complete(prompt, job.n, stops, job.seed)?,
                Input::Cursor { prefix, suffix } => self.infill(prefix, suffix, job.n, job.seed)?,
            };
            done(j, texts)?;
        }
        Ok(())
    }
}

/// A GPTBigCode model behind the shared inference engine. Problems run side by side: whenever samples
/// end, the next samples (in problem order) take their rows in the engine's batch, so it stays full;
/// the samples of one request share its prefill. A sample's tokens depend on its prompt and seed only,
/// not on what shares the batch, so `max_batch` 1 and 16 give the same samples.
pub struct ModelCompleter {
    /// The engine; its `max_batch` is how many samples decode together.
    pub engine: Engine,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Most tokens per sample.
    pub max_new_tokens: usize,
    /// Temperature 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// The token that ends a sample (not part of it).
    pub eos_token_id: i64,
}

/// Samples `first..first + n` of job `job`, as one engine request.
#[derive(Debug, Clone, Copy)]
struct Part {
    job: usize,
    first: usize,
    n: usize,
}

/// What a request's events come to, sent to the `complete_all` loop.
enum Ended {
    /// Sample `index` of job `job` ended: its text, cut before the first stop sequence.
    Sample { job: usize, index: usize, text: Result<String> },
    /// The request failed.
    Failed(String),
}

/// What every request of one `complete_all` call shares.
struct Shared {
    stops: Arc<[String]>,
    cancel: Arc<AtomicBool>,
    ended: mpsc::Sender<Ended>,
}

impl Drop for Shared {
    /// Cancels the requests still running when `complete_all` returns early (an error).
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A sample's text: its tokens decoded and cut before the first stop sequence, as
/// `model::complete::complete` cuts it.
fn text_of(tokenizer: &Tokenizer, stops: &[String], tokens: &[i64]) -> Result<String> {
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&ids, false)?;
    Ok(StopSequences::new(tokenizer, stops).cut(&text).0.to_string())
}

impl ModelCompleter {
    fn prompt_ids(&self, input: &Input) -> Result<Vec<i64>> {
        let Input::Prompt(prompt) = input else {
            return Err(EvalError::Invalid("the model completer continues prompts; it has no editor path".into()));
        };
        Ok(self.tokenizer.encode(prompt)?.into_iter().map(i64::from).collect())
    }

    /// Submits `part` of a job whose first sample has seed `seed`; a thread of its own collects the
    /// request's tokens and sends each sample's text as it ends.
    fn submit(&self, shared: &Shared, prompt: &[i64], seed: u64, part: Part) -> Result<()> {
        let stop = (!shared.stops.is_empty())
            .then(|| Box::new(StopSequences::new(self.tokenizer.clone(), &shared.stops)) as model::engine::Stop);
        let request = Request {
            n: part.n,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: None,
                top_p: self.top_p,
                seed: seed.wrapping_add(part.first as u64),
            },
            stop_tokens: vec![self.eos_token_id],
            stop,
            cancel: shared.cancel.clone(),
            ..Request::new(prompt.to_vec(), self.max_new_tokens)
        };
        let mut events = self.engine.submit(request)?;
        let (tokenizer, stops, ended) = (self.tokenizer.clone(), shared.stops.clone(), shared.ended.clone());
        let collect = move || {
            let mut tokens = vec![Vec::new(); part.n];
            let mut open = part.n;
            while open > 0 {
                let message = match events.blocking_recv() {
                    Some(Event::Token { sample, token, .. }) => {
                        tokens[sample].push(token);
                        continue;
                    }
                    Some(
                        Event::Started { .. }
                        | Event::Speculated(_)
                        | Event::PromptLogprobs { .. }
                        | Event::StopToken { .. },
                    ) => continue,
                    Some(Event::Finished { sample, .. }) => {
                        open -= 1;
                        let text = text_of(&tokenizer, &stops, &tokens[sample]);
                        Ended::Sample { job: part.job, index: part.first + sample, text }
                    }
                    Some(Event::Failed(message)) => Ended::Failed(message),
                    None => Ended::Failed(SubmitError::Stopped.to_string()),
                };
                let failed = matches!(message, Ended::Failed(_));
                if ended.send(message).is_err() || failed {
                    return;
                }
            }
        };
        std::thread::Builder::new()
            .name("eval-samples".into())
            .spawn(collect)
            .map_err(|e| EvalError::Invalid(format!("cannot start a thread: {e}")))?;
        Ok(())
    }
}

impl Completer for ModelCompleter {
    fn complete(&mut self, prompt: &str, n: usize, stops: &[String], seed: u64) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let job = Job { input: Input::Prompt(prompt.to_string()), n, seed };
        self.complete_all(&[job], stops, &mut |_, texts| {
            out = texts;
            Ok(())
        })?;
        Ok(out)
    }

    fn complete_all(
        &mut self,
        jobs: &[Job],
        stops: &[String],
        done: &mut dyn FnMut(usize, Vec<String>) -> Result<()>,
    ) -> Result<()> {
        let rows = self.engine.config().max_batch.max(1);
        // Submit once this many rows are free (or what is left of a problem): a request's samples
        // share its prefill, so a few rows may wait a little for company.
        let group = (rows / 4).max(1);
        let (ended_tx, ended) = mpsc::channel();
        let shared = Shared {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            cancel: Arc::new(AtomicBool::new(false)),
            ended: ended_tx,
        };
        let mut texts: Vec<Vec<Option<String>>> = jobs.iter().map(|job| vec![None; job.n]).collect();
        let mut open: Vec<usize> = jobs.iter().map(|job| job.n).collect();
        let mut unfinished = jobs.len();
        let (mut next, mut first, mut prompt, mut free) = (0, 0, Vec::new(), rows);
        loop {
            // The next samples, in problem order, into the free rows.
            while next < jobs.len() && free >= group.min(jobs[next].n - first) {
                let job = &jobs[next];
                if job.n == 0 {
                    done(next, Vec::new())?;
                    (next, unfinished) = (next + 1, unfinished - 1);
                    continue;
                }
                if first == 0 {
                    prompt = self.prompt_ids(&job.input)?;
                }
                let n = free.min(job.n - first);
                self.submit(&shared, &prompt, job.seed, Part { job: next, first, n })?;
                (free, first) = (free - n, first + n);
                if first == job.n {
                    (next, first) = (next + 1, 0);
                }
            }
            if unfinished == 0 {
                return Ok(());
            }
            match ended.recv().expect("complete_all holds a sender") {
                Ended::Sample { job, index, text } => {
                    free += 1;
                    texts[job][index] = Some(text?);
                    open[job] -= 1;
                    if open[job] == 0 {
                        let samples = std::mem::take(&mut texts[job]).into_iter().flatten().collect();
                        done(job, samples)?;
                        unfinished -= 1;
                    }
                }
                Ended::Failed(message) => return Err(SubmitError::Invalid(message).into()),
            }
        }
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

/// Generates the missing samples of each problem into the store, each problem's as soon as they all
/// exist; `progress` gets (problems done, total). Returns how many problems were generated now (the
/// others were already stored).
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
    let mut finished = 0;
    let (mut pending, mut jobs) = (Vec::new(), Vec::new());
    for (index, problem) in problems.iter().enumerate() {
        if store.sample_count(&problem.task_id)? >= config.samples {
            finished += 1;
            progress(finished, problems.len());
            continue;
        }
        let input = match config.format {
            PromptFormat::Editor => Input::Cursor { prefix: &problem.prompt, suffix: &problem.suffix },
            format => Input::Prompt(problem.prompt_for(format)),
        };
        jobs.push(Job { input, n: config.samples, seed: config.seed + (index * config.samples) as u64 });
        pending.push(problem);
    }
    completer.complete_all(&jobs, &stops, &mut |job, texts| {
        let problem: &Problem = pending[job];
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
        finished += 1;
        progress(finished, problems.len());
        Ok(())
    })?;
    Ok(jobs.len())
}

#[cfg(test)]
mod tests {
    use model::complete::complete;
    use model::generate::{Finish, GenerateConfig};
    use model::gpt_bigcode::GptBigCode;

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

    /// A tokenizer trained on small Python functions, and a random model over it saved in `dir`.
    fn tiny_model(dir: &std::path::Path) -> Arc<Tokenizer> {
        let corpus = dir.join("corpus.py");
        let text: String = (0..40).map(|i| format!("def f_{i}(x):\n    return g(x) + {i}\n")).collect();
        std::fs::write(&corpus, text).unwrap();
        model::tokenizer::train(&model::tokenizer::TrainConfig::new(vec![corpus], 300), dir).unwrap();
        let tokenizer = Tokenizer::from_dir(dir).unwrap();
        tch::manual_seed(3);
        let config = model::config::ModelConfig {
            vocab_size: tokenizer.vocab_size() as i64,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            initializer_range: 0.2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..model::config::ModelConfig::default()
        };
        GptBigCode::new(config, tch::Device::Cpu).unwrap().save(dir, tch::Kind::Float).unwrap();
        Arc::new(tokenizer)
    }

    fn load_model(dir: &std::path::Path) -> model::Result<GptBigCode> {
        GptBigCode::load(dir, tch::Kind::Float, tch::Device::Cpu)
    }

    const SAMPLING: Sampling = Sampling { temperature: 0.9, top_k: None, top_p: Some(0.95), seed: 0 };

    /// Every prompt's `n` samples through the engine with `max_batch`, all prompts in one call (job p
    /// seeded with `100 + p * n`).
    fn through_engine(dir: &std::path::Path, max_batch: usize, prompts: &[&str], n: usize) -> Result<Vec<Vec<String>>> {
        let config = model::engine::EngineConfig { max_batch, ..model::engine::EngineConfig::default() };
        let model_dir = dir.to_path_buf();
        let engine = Engine::start(config, move || load_model(&model_dir)).unwrap();
        let mut completer = ModelCompleter {
            engine,
            tokenizer: Arc::new(Tokenizer::from_dir(dir).unwrap()),
            max_new_tokens: 24,
            temperature: SAMPLING.temperature,
            top_p: SAMPLING.top_p,
            eos_token_id: 0,
        };
        let jobs: Vec<Job> = (0..prompts.len())
            .map(|p| Job { input: Input::Prompt(prompts[p].into()), n, seed: 100 + (p * n) as u64 })
            .collect();
        let mut out = vec![Vec::new(); prompts.len()];
        completer.complete_all(&jobs, &stops(), &mut |job, texts| {
            out[job] = texts;
            Ok(())
        })?;
        Ok(out)
    }

    fn stops() -> Vec<String> {
        vec!["\n  ".into(), " 3".into()]
    }

    /// Samples through the engine are those `model::complete::complete` gave before it, prompt by
    /// prompt, whatever the batch: one sequence at a time, a problem split over requests (3 rows for 5
    /// samples), or several problems together.
    #[test]
    fn engine_samples_equal_complete_at_any_batch() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = tiny_model(dir.path());
        let model = load_model(dir.path()).unwrap();
        let prompts = ["def f_3(x):\n", "def f_1", "    return g(x) + 7\n", "x"];
        let n = 5;
        let mut finishes = Vec::new();
        let expected: Vec<Vec<String>> = (0..prompts.len())
            .map(|p| {
                let sampling = Sampling { seed: 100 + (p * n) as u64, ..SAMPLING };
                let config = GenerateConfig { max_new_tokens: 24, num_samples: n, sampling, eos_token_id: Some(0) };
                let completions = complete(&model, &tokenizer, prompts[p], &config, &stops()).unwrap();
                finishes.extend(completions.iter().map(|c| c.finish));
                completions.into_iter().map(|c| c.text).collect()
            })
            .collect();
        // Some samples end at a stop sequence (cut before it), others run to the token limit.
        assert!(finishes.contains(&Finish::Stop) && finishes.contains(&Finish::Length), "{finishes:?}");
        for max_batch in [1, 3, 16] {
            assert_eq!(through_engine(dir.path(), max_batch, &prompts, n).unwrap(), expected, "max_batch {max_batch}");
        }
        // An empty prompt and one past the context are refused, not cut.
        let long = "def f_1(x):\n".repeat(40);
        for prompt in ["", long.as_str()] {
            let refused = through_engine(dir.path(), 16, &["x", prompt], 2);
            assert!(matches!(refused, Err(EvalError::Engine(SubmitError::Invalid(_)))), "{refused:?}");
        }
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
