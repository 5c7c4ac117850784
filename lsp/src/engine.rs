//! Completions for the server: each job builds its prompt and waits for the shared batching engine
//! ([`model::engine`]) on a blocking thread, so no tensor work or tokenization runs on the async
//! runtime and many editors' requests batch. Each job carries a cancel flag that the engine reads
//! every step; each job runs under `catch_unwind`, so a panicking request answers with an error and
//! the server goes on.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use model::engine::{panic_message, EngineConfig, Event, Request, Speculation};
use model::generate::StopCriterion;
use model::gpt_bigcode::{GptBigCode, Precision};
use model::sampling::Sampling;
use model::speculative::MAX_GAMMA;
use model::tokenizer::Tokenizer;
use tch::Device;
use tokio::sync::watch;

use crate::prompt::{self, Budget, PromptParts};
use crate::syntax::{trim_suffix_overlap, BlockEnd, Decision, Language, Mode};

/// Why a job produced no completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A newer request or `$/cancelRequest` cancelled it.
    #[error("the request was cancelled")]
    Cancelled,
    /// The model did not load; the message says why.
    #[error("the model is not available: {0}")]
    Unavailable(String),
    /// The job panicked; the server carries on.
    #[error("the completion failed: {0}")]
    Panicked(String),
    /// The model or tokenizer returned an error.
    #[error("{0}")]
    Model(String),
    /// The inference thread is gone.
    #[error("the inference thread has stopped")]
    Stopped,
}

/// Generation settings a client can change.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Settings {
    /// Most tokens per completion.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling when temperature > 0.
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens when temperature > 0.
    pub top_k: Option<usize>,
    /// Most prompt tokens.
    pub context_budget: usize,
    /// Share of the budget the suffix may take.
    pub suffix_share: f64,
    /// Languages (LSP ids) to complete; empty means all.
    pub languages: Vec<String>,
    /// Snippets of other open files in the prompt.
    pub snippets: bool,
    /// The longest draft for speculative decoding (0 turns drafting off); each draft's length is
    /// chosen by the cost model measured for the model pair unless `fixed_gamma`.
    pub gamma: usize,
    /// Every draft has `gamma` tokens.
    pub fixed_gamma: bool,
    /// Keep the last request's keys and values, so the next prompt only prefills from where it
    /// differs (typing on in the same document).
    pub reuse_prefix: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_tokens: 64,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            context_budget: 1024,
            suffix_share: 0.25,
            languages: Vec::new(),
            snippets: true,
            gamma: 8,
            fixed_gamma: false,
            reuse_prefix: true,
        }
    }
}

impl Settings {
    /// How completions pick their tokens (seed 0: the same request gives the same completion).
    pub fn sampling(&self) -> Sampling {
        Sampling { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: 0 }
    }

    /// Refuses values that would not make a completion: sampling out of range, a suffix share outside
    /// [0, 1], an empty budget.
    pub fn validate(&self) -> Result<(), String> {
        self.sampling().validate().map_err(|e| e.to_string())?;
        if !(0.0..=1.0).contains(&self.suffix_share) {
            return Err(format!("suffixShare must be in [0, 1], got {}", self.suffix_share));
        }
        if self.context_budget == 0 {
            return Err("contextBudget must be at least 1".into());
        }
        if self.gamma > MAX_GAMMA {
            return Err(format!("gamma must be at most {MAX_GAMMA}, got {}", self.gamma));
        }
        Ok(())
    }
}

/// One completion to compute.
#[derive(Debug, Clone)]
pub struct Job {
    /// Prompt material.
    pub parts: PromptParts,
    /// What kind of completion, and the block-complete rule.
    pub decision: Decision,
    /// The document's language.
    pub language: Language,
    /// Settings at request time.
    pub settings: Settings,
    /// Use FIM (the suffix) or not.
    pub fim: bool,
    /// Seed of the sampler (the server's requests use 0).
    pub seed: u64,
    /// Set to stop decoding.
    pub cancel: Arc<AtomicBool>,
}

/// Figures of one completion, for the request's span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub tokens: usize,
    /// Milliseconds of the prompt's prefill.
    pub prefill_ms: f64,
    /// Prompt tokens whose keys and values the previous request had computed.
    pub reused_tokens: usize,
    /// Milliseconds until the first token (prompt building + prefill + first step).
    pub first_token_ms: f64,
    /// Milliseconds in all.
    pub total_ms: f64,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
}

/// A completion and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Text to insert at the cursor.
    pub text: String,
    /// Figures.
    pub figures: Figures,
}

/// A completion model: the real one, or a stand-in in tests. Called on blocking threads, several at
/// once (the real one batches them).
pub trait CompletionModel: Send + Sync {
    /// Computes a completion; stops soon after `job.cancel` is set.
    fn complete(&self, job: &Job) -> Result<Output, EngineError>;
}

/// Whether the model is usable.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Still loading.
    Loading,
    /// Loaded.
    Ready,
    /// Failed to load: why.
    Failed(String),
}

/// The handle the async side holds: runs jobs on blocking threads against the loaded model.
#[derive(Clone)]
pub struct Engine {
    model: Arc<OnceLock<Arc<dyn CompletionModel>>>,
    status: watch::Receiver<Status>,
}

impl Engine {
    /// Loads the model with `load` on a loading thread; a failure leaves the server up, answering errors.
    pub fn start<F>(load: F) -> Engine
    where
        F: FnOnce() -> Result<Box<dyn CompletionModel>, String> + Send + 'static,
    {
        let (status_sender, status) = watch::channel(Status::Loading);
        let model = Arc::new(OnceLock::new());
        let slot = model.clone();
        std::thread::Builder::new()
            .name("model-loader".into())
            .spawn(move || {
                match catch_unwind(AssertUnwindSafe(load)).unwrap_or_else(|panic| Err(panic_message(&panic))) {
                    Ok(loaded) => {
                        let _ = slot.set(Arc::from(loaded));
                        let _ = status_sender.send(Status::Ready);
                    }
                    Err(message) => {
                        tracing::error!("model failed to load: {message}");
                        let _ = status_sender.send(Status::Failed(message));
                    }
                }
            })
            .expect("the loading thread starts");
        Engine { model, status }
    }

    /// An engine around a model that is already loaded (one shared with the HTTP API).
    pub fn with_model(model: Arc<dyn CompletionModel>) -> Engine {
        let (_, status) = watch::channel(Status::Ready);
        let slot = OnceLock::new();
        let _ = slot.set(model);
        Engine { model: Arc::new(slot), status }
    }

    /// The model's status, waiting while it loads.
    pub async fn ready(&self) -> Status {
        let mut status = self.status.clone();
        let result = status.wait_for(|s| *s != Status::Loading).await.map(|s| s.clone());
        result.unwrap_or(Status::Failed("the loading thread has stopped".into()))
    }

    /// Runs `job` on a blocking thread; a panic answers an error and the server goes on.
    pub async fn complete(&self, job: Job) -> Result<Output, EngineError> {
        if let Status::Failed(message) = self.ready().await {
            return Err(EngineError::Unavailable(message));
        }
        let model = self.model.get().cloned().ok_or(EngineError::Stopped)?;
        if job.cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        let cancel = job.cancel.clone();
        let result = tokio::task::spawn_blocking(move || {
            catch_unwind(AssertUnwindSafe(|| model.complete(&job)))
                .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_message(&panic))))
        })
        .await
        .unwrap_or(Err(EngineError::Stopped));
        match result {
            Ok(_) if cancel.load(Ordering::Relaxed) => Err(EngineError::Cancelled),
            other => other,
        }
    }
}

/// Where the models come from.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// The target model directory (with `tokenizer.json`).
    pub model: PathBuf,
    /// A draft model sharing the tokenizer.
    pub draft: Option<PathBuf>,
    /// Device.
    pub device: Device,
    /// Weight dtype (or int8).
    pub precision: Precision,
    /// The draft's (its int8 copy drafting for the target itself is self-speculation).
    pub draft_precision: Precision,
    /// libtorch intra-op threads on the inference thread (0: libtorch's default, one per core).
    pub threads: usize,
}

impl ModelPaths {
    /// Loads the target and the draft (call on the inference thread).
    pub fn load_models(&self) -> model::Result<(GptBigCode, Option<GptBigCode>)> {
        if self.threads > 0 {
            tch::set_num_threads(self.threads as i32);
        }
        let target = GptBigCode::load_as(&self.model, self.precision, self.device, |_, _| {})?;
        let draft = match &self.draft {
            Some(dir) => {
                let draft = GptBigCode::load_as(dir, self.draft_precision, self.device, |_, _| {})?;
                model::speculative::check_draft(&target, &draft)
                    .map_err(|e| model::ModelError::Invalid(format!("{}: {e}", dir.display())))?;
                let role =
                    if draft.is_copy_of(&target) { "the target's own copy: self-speculation" } else { "a draft model" };
                tracing::info!(draft = %dir.display(), precision = ?self.draft_precision, "drafts come from {role}");
                Some(draft)
            }
            None => None,
        };
        Ok((target, draft))
    }
}

/// The real model: requests go to the shared batching engine ([`model::engine`]); alone, an editor's
/// request is decoded speculatively with the kept prefix of the last one.
pub struct ModelBackend {
    engine: model::engine::Engine,
    tokenizer: Arc<Tokenizer>,
    /// Tokens that end a completion: EOS, FIM and file separators.
    stop_ids: Vec<i64>,
}

impl ModelBackend {
    /// Loads the tokenizer, then the models on a new engine thread.
    pub fn load(paths: &ModelPaths) -> Result<ModelBackend, String> {
        let tokenizer = Arc::new(Tokenizer::from_dir(&paths.model).map_err(|e| e.to_string())?);
        let models = paths.clone();
        let engine = model::engine::Engine::start_with_draft(EngineConfig::default(), move || models.load_models())
            .map_err(|e| e.to_string())?;
        Ok(ModelBackend::new(engine, tokenizer))
    }

    /// A backend over a running engine (whose model `tokenizer` belongs to).
    pub fn new(engine: model::engine::Engine, tokenizer: Arc<Tokenizer>) -> ModelBackend {
        let stop_ids = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<file_sep>"]
            .iter()
            .filter_map(|name| tokenizer.token_id(name).map(i64::from))
            .chain([i64::from(tokenizer.eos_id())])
            .collect();
        ModelBackend { engine, tokenizer, stop_ids }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Ends decoding when the completion's block is complete (runs on the engine thread).
struct BlockStop {
    tokenizer: Arc<Tokenizer>,
    block_end: BlockEnd,
}

impl StopCriterion for BlockStop {
    fn should_stop(&mut self, _: usize, tokens: &[i64]) -> bool {
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        self.tokenizer.decode(&ids, true).is_ok_and(|text| self.block_end.cut(&text).is_some())
    }
}

impl CompletionModel for ModelBackend {
    fn complete(&self, job: &Job) -> Result<Output, EngineError> {
        let started = Instant::now();
        let settings = &job.settings;
        let context = self.engine.context();
        let room = context.saturating_sub(settings.max_tokens.saturating_add(1)).max(8);
        let budget =
            Budget { tokens: settings.context_budget.min(room), suffix_share: settings.suffix_share, fim: job.fim };
        let model_error = |e: model::ModelError| EngineError::Model(e.to_string());
        let prompt = prompt::build(&self.tokenizer, &job.parts, budget).map_err(model_error)?;
        if prompt.is_empty() || job.decision.mode == Mode::Skip {
            return Ok(Output { text: String::new(), figures: Figures::default() });
        }
        let prompt_tokens = prompt.len();
        let block_end = || BlockEnd::new(job.decision, job.language, &job.parts.prefix);
        let request = Request {
            max_new_tokens: settings.max_tokens.min(context.saturating_sub(prompt.len() + 1)),
            sampling: Sampling { seed: job.seed, ..settings.sampling() },
            stop_tokens: self.stop_ids.clone(),
            stop: Some(Box::new(BlockStop { tokenizer: self.tokenizer.clone(), block_end: block_end() })),
            speculation: Some(Speculation {
                gamma: settings.gamma,
                reuse_prefix: settings.reuse_prefix,
                fixed: settings.fixed_gamma,
            }),
            cancel: job.cancel.clone(),
            ..Request::new(prompt, 0)
        };
        let mut events = self.engine.submit(request).map_err(|e| EngineError::Model(e.to_string()))?;
        let mut tokens = Vec::new();
        let mut figures = Figures { prompt_tokens, ..Figures::default() };
        loop {
            match events.blocking_recv() {
                Some(Event::Token { token, .. }) => {
                    if tokens.is_empty() {
                        figures.first_token_ms = started.elapsed().as_secs_f64() * 1e3;
                    }
                    tokens.push(token);
                }
                Some(Event::Speculated(speculated)) => {
                    figures.prefill_ms = speculated.prefill_ms;
                    figures.reused_tokens = speculated.reused_tokens;
                    figures.drafted = speculated.drafted;
                    figures.accepted = speculated.accepted;
                }
                Some(Event::Finished { .. }) => break,
                Some(Event::Started { .. } | Event::PromptLogprobs { .. } | Event::StopToken { .. }) => {}
                Some(Event::Failed(message)) => return Err(EngineError::Model(message)),
                None => return Err(EngineError::Stopped),
            }
        }
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let text = self.tokenizer.decode(&ids, true).map_err(model_error)?;
        let text = match block_end().finish(&text) {
            Some(at) => &text[..at],
            None => text.as_str(),
        };
        let text = if job.fim { trim_suffix_overlap(text, &job.parts.suffix) } else { text };
        figures.tokens = tokens.len();
        figures.total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(Output { text: text.to_string(), figures })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;

    /// A stand-in model: returns `text`, taking `step` per character and honouring cancellation;
    /// panics on a prefix of "panic".
    pub(crate) struct Mock {
        pub(crate) step: Duration,
        pub(crate) calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl CompletionModel for Mock {
        fn complete(&self, job: &Job) -> Result<Output, EngineError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if job.parts.prefix.ends_with("panic") {
                panic!("mock panic");
            }
            let text = format!("completion of {:?}", job.parts.prefix.len());
            for _ in text.chars() {
                if job.cancel.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(self.step);
            }
            Ok(Output { text, figures: Figures::default() })
        }
    }

    fn job(prefix: &str) -> Job {
        Job {
            parts: PromptParts { prefix: prefix.into(), ..PromptParts::default() },
            decision: Decision { mode: Mode::SingleLine, block_indent: 0 },
            language: Language::Other,
            settings: Settings::default(),
            fim: true,
            seed: 0,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn panics_and_cancellation_do_not_stop_the_thread() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mock = Mock { step: Duration::from_millis(20), calls: calls.clone() };
        let engine = Engine::start(move || Ok(Box::new(mock) as Box<dyn CompletionModel>));
        runtime().block_on(async {
            assert_eq!(engine.ready().await, Status::Ready);
            let result = engine.complete(job("please panic")).await;
            assert!(matches!(result, Err(EngineError::Panicked(ref m)) if m == "mock panic"), "{result:?}");
            assert_eq!(engine.complete(job("abc")).await.unwrap().text, "completion of 3");
            // Cancelled mid-decode: stops within a step (far sooner than the 20 steps it would take).
            let slow = job("abcd");
            let cancel = slow.cancel.clone();
            let started = Instant::now();
            let (result, _) = tokio::join!(engine.complete(slow), async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                cancel.store(true, Ordering::Relaxed);
            });
            assert_eq!(result, Err(EngineError::Cancelled));
            assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
            // Cancelled before it starts: the model is not called.
            let before = calls.load(Ordering::SeqCst);
            let queued = job("x");
            queued.cancel.store(true, Ordering::Relaxed);
            assert_eq!(engine.complete(queued).await, Err(EngineError::Cancelled));
            assert_eq!(calls.load(Ordering::SeqCst), before);
        });
    }

    #[test]
    fn a_model_that_fails_to_load_answers_errors() {
        let engine = Engine::start(|| Err("no such directory".to_string()));
        runtime().block_on(async {
            assert_eq!(engine.ready().await, Status::Failed("no such directory".into()));
            assert_eq!(engine.complete(job("x")).await, Err(EngineError::Unavailable("no such directory".into())));
            let engine = Engine::start(|| panic!("loader panic"));
            assert_eq!(engine.ready().await, Status::Failed("loader panic".into()));
        });
    }
}
