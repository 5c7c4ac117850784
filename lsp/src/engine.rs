//! The inference thread: the model (and the tokenizer) live on one dedicated OS thread fed by a
//! channel, so no tensor work or tokenization runs on the async runtime. Each job carries a cancel
//! flag that the decode loop reads after every token; each job runs under `catch_unwind`, so a
//! panicking request answers with an error and the thread goes on serving.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use model::generate::StopCriterion;
use model::gpt_bigcode::GptBigCode;
use model::sampling::Sampling;
use model::speculative::{self, Drafter, Session, SpeculativeConfig};
use model::tokenizer::Tokenizer;
use tch::{Device, Kind};
use tokio::sync::{oneshot, watch};

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
    /// Initial draft length for speculative decoding (0 turns drafting off).
    pub gamma: usize,
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
            gamma: 4,
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

/// A completion model: the real one, or a stand-in in tests.
pub trait CompletionModel: Send {
    /// Computes a completion; reads `job.cancel` after each token.
    fn complete(&mut self, job: &Job) -> Result<Output, EngineError>;
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

struct Envelope {
    job: Job,
    reply: oneshot::Sender<Result<Output, EngineError>>,
}

/// The handle the async side holds: sends jobs to the inference thread.
#[derive(Clone)]
pub struct Engine {
    sender: mpsc::Sender<Envelope>,
    status: watch::Receiver<Status>,
}

impl Engine {
    /// Starts the inference thread; `load` runs on it (a failure leaves the server up, answering errors).
    pub fn start<F>(load: F) -> Engine
    where
        F: FnOnce() -> Result<Box<dyn CompletionModel>, String> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel::<Envelope>();
        let (status_sender, status) = watch::channel(Status::Loading);
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let model = catch_unwind(AssertUnwindSafe(load)).unwrap_or_else(|panic| Err(panic_message(&panic)));
                let mut model = match model {
                    Ok(model) => {
                        let _ = status_sender.send(Status::Ready);
                        Ok(model)
                    }
                    Err(message) => {
                        tracing::error!("model failed to load: {message}");
                        let _ = status_sender.send(Status::Failed(message.clone()));
                        Err(message)
                    }
                };
                for Envelope { job, reply } in receiver {
                    if reply.is_closed() || job.cancel.load(Ordering::Relaxed) {
                        let _ = reply.send(Err(EngineError::Cancelled));
                        continue;
                    }
                    let result = match model.as_mut() {
                        Err(message) => Err(EngineError::Unavailable(message.clone())),
                        Ok(model) => catch_unwind(AssertUnwindSafe(|| model.complete(&job)))
                            .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_message(&panic)))),
                    };
                    let result = match result {
                        Ok(_) if job.cancel.load(Ordering::Relaxed) => Err(EngineError::Cancelled),
                        other => other,
                    };
                    let _ = reply.send(result);
                }
            })
            .expect("the inference thread starts");
        Engine { sender, status }
    }

    /// The model's status, waiting while it loads.
    pub async fn ready(&self) -> Status {
        let mut status = self.status.clone();
        let result = status.wait_for(|s| *s != Status::Loading).await.map(|s| s.clone());
        result.unwrap_or(Status::Failed("the inference thread has stopped".into()))
    }

    /// Runs `job` on the inference thread.
    pub async fn complete(&self, job: Job) -> Result<Output, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Envelope { job, reply }).map_err(|_| EngineError::Stopped)?;
        answer.await.unwrap_or(Err(EngineError::Stopped))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
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
    /// Weight dtype.
    pub kind: Kind,
    /// libtorch intra-op threads on the inference thread (0: libtorch's default, one per core).
    pub threads: usize,
}

/// The real model: target, optional draft, tokenizer.
pub struct ModelBackend {
    target: GptBigCode,
    draft: Option<GptBigCode>,
    tokenizer: Tokenizer,
    /// Tokens that end a completion besides EOS: FIM and file separators.
    stop_ids: Vec<i64>,
    /// The last request's keys and values.
    session: Option<Session>,
}

impl ModelBackend {
    /// Loads the models and the tokenizer (call on the inference thread).
    pub fn load(paths: &ModelPaths) -> Result<ModelBackend, String> {
        if paths.threads > 0 {
            tch::set_num_threads(paths.threads as i32);
        }
        let tokenizer = Tokenizer::from_dir(&paths.model).map_err(|e| e.to_string())?;
        let target = GptBigCode::load(&paths.model, paths.kind, paths.device).map_err(|e| e.to_string())?;
        let draft = match &paths.draft {
            Some(dir) => {
                let draft = GptBigCode::load(dir, paths.kind, paths.device).map_err(|e| e.to_string())?;
                if draft.config().vocab_size != target.config().vocab_size {
                    return Err(format!(
                        "{}: the draft's vocabulary ({}) differs from the target's ({})",
                        dir.display(),
                        draft.config().vocab_size,
                        target.config().vocab_size
                    ));
                }
                Some(draft)
            }
            None => None,
        };
        Ok(ModelBackend::new(target, draft, tokenizer))
    }

    /// A backend around models already loaded (the draft must share the target's vocabulary).
    pub fn new(target: GptBigCode, draft: Option<GptBigCode>, tokenizer: Tokenizer) -> ModelBackend {
        let stop_ids = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<file_sep>"]
            .iter()
            .filter_map(|name| tokenizer.token_id(name).map(i64::from))
            .collect();
        ModelBackend { target, draft, tokenizer, stop_ids, session: None }
    }

    /// The target model.
    pub fn target(&self) -> &GptBigCode {
        &self.target
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Ends decoding on cancellation, on a FIM token, and when the block is complete.
struct LspStop<'a> {
    tokenizer: &'a Tokenizer,
    job: &'a Job,
    block_end: BlockEnd,
    stop_ids: &'a [i64],
    started: Instant,
    first_token_ms: Option<f64>,
}

impl StopCriterion for LspStop<'_> {
    fn should_stop(&mut self, _: usize, tokens: &[i64]) -> bool {
        self.first_token_ms.get_or_insert_with(|| self.started.elapsed().as_secs_f64() * 1e3);
        if self.job.cancel.load(Ordering::Relaxed) {
            return true;
        }
        if tokens.last().is_some_and(|t| self.stop_ids.contains(t)) {
            return true;
        }
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        self.tokenizer.decode(&ids, true).is_ok_and(|text| self.block_end.cut(&text).is_some())
    }
}

impl CompletionModel for ModelBackend {
    fn complete(&mut self, job: &Job) -> Result<Output, EngineError> {
        let started = Instant::now();
        let settings = &job.settings;
        let context = self.target.config().n_positions as usize;
        let room = context.saturating_sub(settings.max_tokens + 1).max(8);
        let budget =
            Budget { tokens: settings.context_budget.min(room), suffix_share: settings.suffix_share, fim: job.fim };
        let model_error = |e: model::ModelError| EngineError::Model(e.to_string());
        let prompt = prompt::build(&self.tokenizer, &job.parts, budget).map_err(model_error)?;
        if prompt.is_empty() || job.decision.mode == Mode::Skip {
            return Ok(Output { text: String::new(), figures: Figures::default() });
        }
        let max_new_tokens = settings.max_tokens.min(context.saturating_sub(prompt.len() + 1));
        let config = SpeculativeConfig {
            max_new_tokens,
            sampling: Sampling { seed: job.seed, ..settings.sampling() },
            eos_token_id: Some(i64::from(self.tokenizer.eos_id())),
            gamma: settings.gamma.max(1),
            ..SpeculativeConfig::default()
        };
        let drafter = match (&self.draft, settings.gamma) {
            (_, 0) => Drafter::None,
            (Some(draft), _) => Drafter::Model(draft),
            (None, _) => Drafter::PromptLookup { max_ngram: 3 },
        };
        let mut stop = LspStop {
            tokenizer: &self.tokenizer,
            job,
            block_end: BlockEnd::new(job.decision, job.language, &job.parts.prefix),
            stop_ids: &self.stop_ids,
            started,
            first_token_ms: None,
        };
        let out = if settings.reuse_prefix {
            let session = match self.session.take() {
                Some(session) => session,
                None => Session::new(&self.target, &drafter).map_err(model_error)?,
            };
            let session = self.session.insert(session);
            speculative::generate_in(session, &self.target, &drafter, &prompt, &config, &mut stop)
        } else {
            self.session = None;
            speculative::generate(&self.target, &drafter, &prompt, &config, &mut stop)
        };
        let out = out.map_err(model_error)?;
        let first_token_ms = stop.first_token_ms.unwrap_or(0.0);
        let mut tokens = out.generation.tokens;
        if tokens.last().is_some_and(|t| self.stop_ids.contains(t)) {
            tokens.pop();
        }
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let text = self.tokenizer.decode(&ids, true).map_err(model_error)?;
        let text = match stop.block_end.finish(&text) {
            Some(at) => &text[..at],
            None => text.as_str(),
        };
        let text = if job.fim { trim_suffix_overlap(text, &job.parts.suffix) } else { text };
        let figures = Figures {
            prompt_tokens: prompt.len(),
            tokens: tokens.len(),
            prefill_ms: out.stats.prefill_ms,
            reused_tokens: out.stats.reused_tokens,
            first_token_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            drafted: out.stats.drafted,
            accepted: out.stats.accepted,
        };
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
        fn complete(&mut self, job: &Job) -> Result<Output, EngineError> {
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
