//! The inference engine every caller shares (HTTP server, language server, eval, evolve): one
//! dedicated thread owns the model and runs continuous batching. Sequences join and leave the
//! running batch at every step; each keeps its own KV cache (ragged: one fused attention call per
//! layer reads each sequence's own cache, the dense layers run once for all rows); a newcomer's prompt is prefilled one chunk per step, so
//! running sequences keep decoding; the `n` samples of a prompt share its prefill.
//!
//! Greedy output does not depend on the batch: fp32 CPU dense layers go through the dense kernel,
//! whose every row is one fixed-order dot product, attention is fixed-order per sequence and head,
//! and everything else is per row or per sequence.
//! A request that asks for speculation and finds the engine idle is decoded alone with speculative
//! decoding (the draft model, or prompt lookup) and the kept prefix of the last such request: alone,
//! speculation pays; in a batch, batching does, so there it joins the batch like any other.
//!
//! Requests are cancelled when their event receiver is dropped (a client went away) or their cancel
//! flag is set, within one step. A panic while serving a request fails that request only.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::{Kind, Tensor};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::generate::{Finish, StopCriterion};
use crate::gpt_bigcode::GptBigCode;
use crate::kv_cache::KvCache;
use crate::sampling::{check_finite, Sampling, TARGET};
use crate::speculative::{self, Drafter, Session, SpeculativeConfig};
use crate::{ModelError, Result};

/// How much the engine takes on.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoding together (the rows of one step).
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; beyond it [`Engine::submit`] refuses.
    pub max_waiting: usize,
    /// Prompt tokens prefilled per step while other sequences decode.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 16, max_waiting: 64, prefill_chunk: 512 }
    }
}

/// Stops one sample; runs on the engine thread.
pub type Stop = Box<dyn StopCriterion + Send>;

/// One prompt to continue, `n` times.
pub struct Request {
    /// Prompt token ids (not empty, shorter than the context).
    pub prompt: Vec<i64>,
    /// Most new tokens per sample; cut to what the context leaves.
    pub max_new_tokens: usize,
    /// Samples; sample i draws with seed `sampling.seed + i`.
    pub n: usize,
    /// Token picking.
    pub sampling: Sampling,
    /// Tokens that end a sample (not included in it).
    pub stop_tokens: Vec<i64>,
    /// Ends a sample early (e.g. a stop sequence or a complete block).
    pub stop: Option<Stop>,
    /// Report each token's log-probability with this many alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability (all but the first, which nothing predicts) with
    /// this many alternatives, in one [`Event::PromptLogprobs`] before [`Event::Started`].
    pub prompt_logprobs: Option<usize>,
    /// Decode alone with speculative decoding when the engine is idle.
    pub speculation: Option<Speculation>,
    /// Set to stop the request.
    pub cancel: Arc<AtomicBool>,
}

impl Request {
    /// A request with one greedy sample, no stops, and a fresh cancel flag.
    pub fn new(prompt: Vec<i64>, max_new_tokens: usize) -> Request {
        Request {
            prompt,
            max_new_tokens,
            n: 1,
            sampling: Sampling::greedy(),
            stop_tokens: Vec::new(),
            stop: None,
            logprobs: None,
            prompt_logprobs: None,
            speculation: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// How a request alone is decoded speculatively.
#[derive(Debug, Clone, PartialEq)]
pub struct Speculation {
    /// The longest draft; 0 decodes without drafting. Each draft's length is chosen by the cost
    /// model measured for the pair ([`crate::draft_length`]) unless `fixed`.
    pub gamma: usize,
    /// Every draft has `gamma` tokens.
    pub fixed: bool,
    /// Keep this request's keys and values for the next speculative request, which then only
    /// prefills from where its prompt departs from this one (an editor typing on).
    pub reuse_prefix: bool,
}

/// How a speculative request went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpeculationFigures {
    /// Milliseconds of the prompt's prefill.
    pub prefill_ms: f64,
    /// Prompt tokens whose keys and values the last request had computed.
    pub reused_tokens: usize,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
}

/// A new token's log-probability under the model (before temperature and filtering), with the
/// most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token's.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and theirs, most likely first.
    pub top: Vec<(i64, f32)>,
}

/// What a request hears, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's log-probabilities, when asked for: entry i is token i + 1's.
    PromptLogprobs {
        /// The prompt's first sample (0 from the engine; shifted like a token's by callers that
        /// merge several requests).
        sample: usize,
        /// One per prompt token after the first.
        logprobs: Vec<TokenLogprob>,
    },
    /// The prompt is prefilled; decoding starts.
    Started {
        /// Milliseconds the request waited for a place in the batch.
        queued_ms: f64,
    },
    /// Sample `sample` has a new token.
    Token {
        /// Which sample.
        sample: usize,
        /// The token id.
        token: i64,
        /// Its log-probability, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The request was decoded speculatively; sent before its `Finished`.
    Speculated(SpeculationFigures),
    /// Sample `sample` drew one of the request's stop tokens, which ends it; sent, before its
    /// `Finished`, only when log-probabilities are asked for.
    StopToken {
        /// Which sample.
        sample: usize,
        /// The stop token.
        token: i64,
        /// Its log-probability.
        logprob: TokenLogprob,
    },
    /// Sample `sample` ended (its stop token is not reported as a token).
    Finished {
        /// Which sample.
        sample: usize,
        /// Why.
        finish: Finish,
    },
    /// The request failed; no more events follow.
    Failed(String),
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: try again later.
    #[error("the server is busy: {0} requests are running or waiting")]
    Busy(usize),
    /// The request cannot be served (empty prompt, bad sampling, too long).
    #[error("{0}")]
    Invalid(String),
    /// The engine thread is gone.
    #[error("the inference engine has stopped")]
    Stopped,
}

/// Counters the engine keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests waiting for a place in the batch.
    pub waiting: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Decode steps run.
    pub steps: AtomicUsize,
    /// Rows over all decode steps (steps / rows is the mean batch).
    pub step_rows: AtomicUsize,
    /// Tokens generated.
    pub generated_tokens: AtomicUsize,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicUsize,
}

struct Envelope {
    /// Its own place in the queue, or none where it runs in a [`Reservation`]'s. First: fields drop
    /// in order, and the place is back before the caller sees its channel close.
    place: Option<Reservation>,
    request: Request,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

/// Places in the engine's queue, counted against its limit until dropped.
#[derive(Debug)]
pub struct Reservation {
    places: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Reservation {
    /// How many places it holds.
    pub fn places(&self) -> usize {
        self.places
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.places, Ordering::SeqCst);
    }
}

/// The handle callers hold; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inbox: mpsc::Sender<Envelope>,
    config: EngineConfig,
    context: usize,
    vocab: usize,
    counters: Arc<Counters>,
    /// Requests submitted and not finished (waiting + running).
    in_flight: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts the engine thread around `model` (built on that thread by `load`); returns once the
    /// model is loaded, or the loading error.
    pub fn start<F>(config: EngineConfig, load: F) -> Result<Engine>
    where
        F: FnOnce() -> Result<GptBigCode> + Send + 'static,
    {
        Engine::start_with_draft(config, move || Ok((load()?, None)))
    }

    /// [`start`](Self::start) with a draft model for speculative requests (`load` gives both).
    pub fn start_with_draft<F>(config: EngineConfig, load: F) -> Result<Engine>
    where
        F: FnOnce() -> Result<(GptBigCode, Option<GptBigCode>)> + Send + 'static,
    {
        let (inbox, receiver) = mpsc::channel::<Envelope>();
        let (ready, loaded) = mpsc::channel::<Result<(usize, usize)>>();
        let counters = Arc::new(Counters::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (thread_counters, thread_config) = (counters.clone(), config.clone());
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let (model, draft) = match catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(models)) => models,
                    Ok(Err(error)) => return drop(ready.send(Err(error))),
                    Err(panic) => return drop(ready.send(Err(ModelError::Invalid(panic_message(&panic))))),
                };
                let _ = ready.send(Ok((model.config().n_positions as usize, model.config().vocab_size as usize)));
                let mut batcher = Batcher {
                    model: &model,
                    draft: draft.as_ref(),
                    session: None,
                    config: thread_config,
                    counters: thread_counters,
                    waiting: VecDeque::new(),
                    prefilling: None,
                    running: Vec::new(),
                };
                tch::no_grad(|| batcher.run(receiver));
            })
            .map_err(|e| ModelError::Invalid(format!("cannot start the inference thread: {e}")))?;
        let (context, vocab) =
            loaded.recv().map_err(|_| ModelError::Invalid("the inference thread died while loading".into()))??;
        Ok(Engine { inbox, config, context, vocab, counters, in_flight })
    }

    /// The model's context (n_positions).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The engine's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Requests submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(&self, request: Request) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        self.check(&request)?;
        let place = self.reserve(1)?;
        self.enqueue(request, Some(place))
    }

    /// Takes up to `places` places in the queue (as many as are free) for requests submitted into
    /// them with [`submit_reserved`](Self::submit_reserved): a request of many prompts, a few at a
    /// time, whose later prompts always find room, so other clients' load cannot starve them.
    /// Refused like [`submit`](Self::submit) when no place is free.
    pub fn reserve(&self, places: usize) -> std::result::Result<Reservation, SubmitError> {
        let limit = self.config.max_batch + self.config.max_waiting;
        let mut granted = 0;
        // Taken only where free: a refused reservation never shows in the count others see.
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |taken| {
                granted = places.min(limit.saturating_sub(taken));
                (granted > 0).then_some(taken + granted)
            })
            .map_err(SubmitError::Busy)?;
        Ok(Reservation { places: granted, in_flight: self.in_flight.clone() })
    }

    /// Queues `request` in a place of `reservation` (whose holder keeps no more requests in flight
    /// than it reserved).
    pub fn submit_reserved(
        &self,
        request: Request,
        reservation: &Reservation,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        if !Arc::ptr_eq(&reservation.in_flight, &self.in_flight) {
            return Err(SubmitError::Invalid("the reservation is another engine's".into()));
        }
        self.check(&request)?;
        self.enqueue(request, None)
    }

    fn enqueue(
        &self,
        request: Request,
        place: Option<Reservation>,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let (events, receiver) = unbounded_channel();
        let envelope = Envelope { request, events, submitted: Instant::now(), place };
        // A stopped engine gives the envelope, and its place, back.
        self.inbox.send(envelope).map_err(|_| SubmitError::Stopped)?;
        Ok(receiver)
    }

    fn check(&self, request: &Request) -> std::result::Result<(), SubmitError> {
        request.sampling.validate().map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if request.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        // A prompt as long as the context can only be scored.
        if request.prompt.len() + usize::from(request.max_new_tokens > 0) > self.context {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the model's context is {} tokens",
                request.prompt.len(),
                self.context
            )));
        }
        if let Some(bad) = request.prompt.iter().find(|&&id| !(0..self.vocab as i64).contains(&id)) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            )));
        }
        if request.speculation.is_some() && (request.logprobs.is_some() || request.prompt_logprobs.is_some()) {
            return Err(SubmitError::Invalid("log-probabilities are not reported on the speculative path".into()));
        }
        if request.n == 0 || request.n > self.config.max_batch {
            return Err(SubmitError::Invalid(format!(
                "n must be between 1 and {} (the batch), got {}",
                self.config.max_batch, request.n
            )));
        }
        Ok(())
    }

    /// Runs `request` to the end and returns each sample's tokens and finish (blocking: call from a
    /// thread that may wait, never from async code).
    pub fn generate(&self, request: Request) -> std::result::Result<Vec<(Vec<i64>, Finish)>, SubmitError> {
        let n = request.n;
        let mut events = self.submit(request)?;
        let mut samples = vec![(Vec::new(), Finish::Length); n];
        let mut open = n;
        while open > 0 {
            match events.blocking_recv() {
                Some(Event::Token { sample, token, .. }) => samples[sample].0.push(token),
                Some(Event::Finished { sample, finish }) => {
                    samples[sample].1 = finish;
                    open -= 1;
                }
                Some(
                    Event::Started { .. }
                    | Event::Speculated(_)
                    | Event::PromptLogprobs { .. }
                    | Event::StopToken { .. },
                ) => {}
                Some(Event::Failed(message)) => return Err(SubmitError::Invalid(message)),
                None => return Err(SubmitError::Stopped),
            }
        }
        Ok(samples)
    }
}

/// A request's shared part while its samples run.
struct Shared {
    /// Given back when the request ends, before its caller hears so (first, as in [`Envelope`]).
    place: Option<Reservation>,
    /// A sample failed: the request's last event was sent.
    failed: bool,
    request: Request,
    events: UnboundedSender<Event>,
    max_new_tokens: usize,
    open_samples: usize,
}

impl Shared {
    fn cancelled(&self) -> bool {
        self.request.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Ends the whole request with `message`, its last event, sent once its place is back; its
    /// other samples stop at their next step, silently.
    fn fail(&mut self, message: String) {
        self.request.cancel.store(true, Ordering::Relaxed);
        drop(self.place.take());
        if !std::mem::replace(&mut self.failed, true) {
            let _ = self.events.send(Event::Failed(message));
        }
    }
}

impl Envelope {
    fn cancelled(&self) -> bool {
        self.request.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

type SharedRef = std::rc::Rc<std::cell::RefCell<Shared>>;

/// A request whose prompt is being prefilled.
struct Prefill {
    shared: SharedRef,
    cache: KvCache,
    /// The prompt's log-probabilities so far, when asked for.
    scored: Vec<TokenLogprob>,
    started: Instant,
    queued_ms: f64,
}

/// One sample in the running batch.
struct Sequence {
    shared: SharedRef,
    sample: usize,
    cache: KvCache,
    tokens: Vec<i64>,
    rng: StdRng,
    /// Logits of the next token.
    logits: Vec<f32>,
}

struct Batcher<'m> {
    model: &'m GptBigCode,
    draft: Option<&'m GptBigCode>,
    /// The last speculative request's keys and values.
    session: Option<Session>,
    config: EngineConfig,
    counters: Arc<Counters>,
    waiting: VecDeque<Envelope>,
    prefilling: Option<Prefill>,
    running: Vec<Sequence>,
}

impl Batcher<'_> {
    fn run(&mut self, inbox: mpsc::Receiver<Envelope>) {
        loop {
            let idle = self.running.is_empty() && self.prefilling.is_none() && self.waiting.is_empty();
            if idle {
                match inbox.recv() {
                    Ok(envelope) => self.waiting.push_back(envelope),
                    Err(_) => return,
                }
            }
            self.waiting.extend(inbox.try_iter());
            // Cancelled requests leave the queue at once, wherever they wait (with their places).
            self.waiting.retain(|envelope| !envelope.cancelled());
            // Up to one chunk's worth of prompt tokens per step, over as many newcomers as it covers.
            let mut budget = self.config.prefill_chunk.max(1);
            while budget > 0 {
                self.admit();
                match self.prefill_chunk() {
                    0 => break,
                    done => budget = budget.saturating_sub(done),
                }
            }
            self.step();
            self.counters.waiting.store(self.waiting.len(), Ordering::Relaxed);
            self.counters.running.store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// Moves the oldest waiting request into prefill when its samples fit the batch.
    fn admit(&mut self) {
        while self.prefilling.is_none() {
            let Some(front) = self.waiting.front() else { return };
            if self.running.len() + front.request.n > self.config.max_batch {
                return;
            }
            let Some(envelope) = self.waiting.pop_front() else { return };
            if envelope.request.speculation.is_some() && envelope.request.n == 1 && self.running.is_empty() {
                self.run_alone(envelope);
                continue;
            }
            let queued_ms = envelope.submitted.elapsed().as_secs_f64() * 1e3;
            let context = self.model.config().n_positions as usize;
            let prompt_len = envelope.request.prompt.len();
            let max_new_tokens = envelope.request.max_new_tokens.min(context.saturating_sub(prompt_len));
            let capacity = (prompt_len + max_new_tokens) as i64;
            let open_samples = envelope.request.n;
            let Envelope { request, events, place, .. } = envelope;
            let mut shared = Shared { place, failed: false, request, events, max_new_tokens, open_samples };
            match self.model.new_cache(1, capacity) {
                Ok(cache) => {
                    let shared = std::rc::Rc::new(std::cell::RefCell::new(shared));
                    self.prefilling =
                        Some(Prefill { shared, cache, scored: Vec::new(), started: Instant::now(), queued_ms });
                }
                Err(error) => shared.fail(error.to_string()),
            }
        }
    }

    /// Prefills the next chunk of the request in prefill; when the prompt is done, its samples join
    /// the batch. Chunks start at fixed offsets, so a prompt's keys and values do not depend on load.
    /// Returns the prompt tokens it prefilled (1 for a cancelled or failed request, so the caller
    /// moves on).
    fn prefill_chunk(&mut self) -> usize {
        let Some(mut prefill) = self.prefilling.take() else { return 0 };
        if prefill.shared.borrow().cancelled() {
            // Its place goes with it.
            return 1;
        }
        let done = prefill.cache.len() as usize;
        let prompt_len = prefill.shared.borrow().request.prompt.len();
        let chunk = self.config.prefill_chunk.max(1).min(prompt_len - done);
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Tensor> {
            let shared = prefill.shared.borrow();
            let prompt = &shared.request.prompt;
            let ids = Tensor::from_slice(&prompt[done..done + chunk]).to_device(self.model.device()).unsqueeze(0);
            let Some(top) = shared.request.prompt_logprobs else {
                return self.model.forward_next(&ids, &mut prefill.cache);
            };
            let (every, last) = self.model.forward_scored(&ids, &mut prefill.cache)?;
            // Row j predicts prompt token done + j + 1; the last chunk's last row, the first new token.
            let next = &prompt[done + 1..prompt_len.min(done + chunk + 1)];
            prefill.scored.extend(score_rows(&every.squeeze_dim(0), next, top)?);
            Ok(last)
        }));
        let logits = match flatten_panic(result) {
            Ok(logits) => logits,
            Err(message) => {
                prefill.shared.borrow_mut().fail(message);
                return chunk;
            }
        };
        self.counters.prompt_tokens.fetch_add(chunk, Ordering::Relaxed);
        if done + chunk < prompt_len {
            self.prefilling = Some(prefill);
            return chunk;
        }
        let logits = match row_vec(&logits) {
            Ok(logits) => logits,
            Err(error) => {
                prefill.shared.borrow_mut().fail(error.to_string());
                return chunk;
            }
        };
        let (n, seed) = {
            let shared = prefill.shared.borrow();
            if shared.request.prompt_logprobs.is_some() {
                let logprobs = std::mem::take(&mut prefill.scored);
                let _ = shared.events.send(Event::PromptLogprobs { sample: 0, logprobs });
            }
            let _ = shared.events.send(Event::Started { queued_ms: prefill.queued_ms });
            (shared.request.n, shared.request.sampling.seed)
        };
        tracing::debug!(prompt = prompt_len, ms = prefill.started.elapsed().as_secs_f64() * 1e3, "prefilled");
        let mut last = Some(prefill.cache);
        for sample in 0..n {
            let cache = match (sample + 1 == n, last.as_ref()) {
                (false, Some(cache)) => cache.duplicate(),
                _ => last.take().expect("the last sample takes the prefilled cache"),
            };
            self.running.push(Sequence {
                shared: prefill.shared.clone(),
                sample,
                cache,
                tokens: Vec::new(),
                rng: StdRng::seed_from_u64(seed.wrapping_add(sample as u64)),
                logits: logits.clone(),
            });
        }
        chunk
    }

    /// Picks every running sequence's next token, retires those that ended, and runs one batched
    /// forward pass for the rest.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let mut keep = Vec::with_capacity(self.running.len());
        for mut sequence in std::mem::take(&mut self.running) {
            let before = sequence.tokens.len();
            let advanced = catch_unwind(AssertUnwindSafe(|| advance(&mut sequence)));
            self.counters.generated_tokens.fetch_add(sequence.tokens.len() - before, Ordering::Relaxed);
            match flatten_panic(advanced) {
                Ok(None) => keep.push(sequence),
                Ok(Some(finish)) => self.retire(&sequence, finish),
                Err(message) => self.fail(&sequence, message),
            }
        }
        if keep.is_empty() {
            return;
        }
        let tokens: Vec<i64> = keep.iter().map(|s| *s.tokens.last().expect("a kept sequence has a token")).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut caches: Vec<&mut KvCache> = keep.iter_mut().map(|s| &mut s.cache).collect();
            self.model.forward_batch(&tokens, &mut caches).and_then(|logits| rows_vec(&logits))
        }));
        match flatten_panic(result) {
            Ok(rows) => {
                for (sequence, row) in keep.iter_mut().zip(rows) {
                    sequence.logits = row;
                }
                self.counters.steps.fetch_add(1, Ordering::Relaxed);
                self.counters.step_rows.fetch_add(keep.len(), Ordering::Relaxed);
                self.running = keep;
            }
            Err(message) => {
                tracing::error!("a batched step failed: {message}");
                for sequence in &keep {
                    self.fail(sequence, message.clone());
                }
            }
        }
    }

    /// Decodes one request speculatively, to its end, while nothing else runs.
    fn run_alone(&mut self, envelope: Envelope) {
        let Envelope { mut request, events, submitted, place } = envelope;
        let _ = events.send(Event::Started { queued_ms: submitted.elapsed().as_secs_f64() * 1e3 });
        let outcome = catch_unwind(AssertUnwindSafe(|| self.speculate(&mut request, &events)));
        drop(place);
        match flatten_panic(outcome) {
            Ok((finish, figures)) => {
                let _ = events.send(Event::Speculated(figures));
                let _ = events.send(Event::Finished { sample: 0, finish });
            }
            Err(message) => {
                self.session = None;
                let _ = events.send(Event::Failed(message));
            }
        }
    }

    fn speculate(
        &mut self,
        request: &mut Request,
        events: &UnboundedSender<Event>,
    ) -> Result<(Finish, SpeculationFigures)> {
        let speculation =
            request.speculation.clone().unwrap_or(Speculation { gamma: 0, reuse_prefix: false, fixed: true });
        let drafter = match (self.draft, speculation.gamma) {
            (_, 0) => Drafter::None,
            (Some(draft), _) => Drafter::Model(draft),
            (None, _) => Drafter::PromptLookup { max_ngram: 3 },
        };
        let context = self.model.config().n_positions as usize;
        let config = SpeculativeConfig {
            max_new_tokens: request.max_new_tokens.min(context.saturating_sub(request.prompt.len())),
            sampling: request.sampling.clone(),
            eos_token_id: None,
            gamma: speculation.gamma.max(1),
            max_gamma: speculation.gamma.max(1),
            adaptive: !speculation.fixed,
        };
        let prompt = std::mem::take(&mut request.prompt);
        let mut stop =
            Streamed { request, events, sent: 0, stop_token: false, generated: &self.counters.generated_tokens };
        let out = if speculation.reuse_prefix {
            let session = match self.session.take() {
                Some(session) => session,
                None => Session::new(self.model, &drafter)?,
            };
            let session = self.session.insert(session);
            speculative::generate_in(session, self.model, &drafter, &prompt, &config, &mut stop)?
        } else {
            self.session = None;
            speculative::generate(self.model, &drafter, &prompt, &config, &mut stop)?
        };
        self.counters.prompt_tokens.fetch_add(prompt.len() - out.stats.reused_tokens, Ordering::Relaxed);
        let finish = if stop.stop_token { Finish::Eos } else { out.generation.finish };
        let stats = out.stats;
        let figures = SpeculationFigures {
            prefill_ms: stats.prefill_ms,
            reused_tokens: stats.reused_tokens,
            drafted: stats.drafted,
            accepted: stats.accepted,
        };
        Ok((finish, figures))
    }

    fn retire(&self, sequence: &Sequence, finish: Finish) {
        let mut shared = sequence.shared.borrow_mut();
        // The place is free before the caller hears that its request is done.
        shared.open_samples -= 1;
        if shared.open_samples == 0 {
            drop(shared.place.take());
        }
        if !shared.failed {
            let _ = shared.events.send(Event::Finished { sample: sequence.sample, finish });
        }
    }

    fn fail(&self, sequence: &Sequence, message: String) {
        let mut shared = sequence.shared.borrow_mut();
        shared.open_samples -= 1;
        shared.fail(message);
    }
}

/// The stop criterion of a speculative request: reports each accepted token as it comes, ends on a
/// stop token (not reported), on cancellation, and where the request's own criterion says.
struct Streamed<'r> {
    request: &'r mut Request,
    events: &'r UnboundedSender<Event>,
    sent: usize,
    stop_token: bool,
    generated: &'r AtomicUsize,
}

impl StopCriterion for Streamed<'_> {
    fn should_stop(&mut self, sample: usize, tokens: &[i64]) -> bool {
        let Some(&last) = tokens.last() else { return false };
        if self.request.stop_tokens.contains(&last) {
            self.stop_token = true;
            return true;
        }
        for &token in &tokens[self.sent..] {
            let _ = self.events.send(Event::Token { sample: 0, token, logprob: None });
        }
        self.generated.fetch_add(tokens.len() - self.sent, Ordering::Relaxed);
        self.sent = tokens.len();
        if self.request.cancel.load(Ordering::Relaxed) || self.events.is_closed() {
            return true;
        }
        self.request.stop.as_mut().is_some_and(|stop| stop.should_stop(sample, tokens))
    }
}

/// Picks the sequence's next token from its logits and reports it; `Some` when the sample ends.
fn advance(sequence: &mut Sequence) -> Result<Option<Finish>> {
    let mut shared = sequence.shared.borrow_mut();
    if shared.cancelled() {
        return Ok(Some(Finish::Stop));
    }
    if sequence.tokens.len() >= shared.max_new_tokens {
        return Ok(Some(Finish::Length));
    }
    check_finite(&sequence.logits, TARGET)?;
    let request = &shared.request;
    let token = if request.sampling.is_greedy() {
        crate::sampling::argmax(&sequence.logits)
    } else {
        request.sampling.pick(&sequence.logits, &mut sequence.rng)
    } as i64;
    let logprob = request.logprobs.map(|top| logprob_of(&sequence.logits, token, top));
    if request.stop_tokens.contains(&token) {
        if let Some(logprob) = logprob {
            let _ = shared.events.send(Event::StopToken { sample: sequence.sample, token, logprob });
        }
        return Ok(Some(Finish::Eos));
    }
    sequence.tokens.push(token);
    let _ = shared.events.send(Event::Token { sample: sequence.sample, token, logprob });
    let sample = sequence.sample;
    if shared.request.stop.as_mut().is_some_and(|stop| stop.should_stop(sample, &sequence.tokens)) {
        return Ok(Some(Finish::Stop));
    }
    if sequence.tokens.len() >= shared.max_new_tokens {
        return Ok(Some(Finish::Length));
    }
    Ok(None)
}

/// `token`'s log-softmax in `logits`, and the `top` most likely tokens' (ties to the lower id).
fn logprob_of(logits: &[f32], token: i64, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = total.ln() as f32 + max;
    let mut best: Vec<(i64, f32)> = Vec::new();
    if top > 0 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let top = top.min(order.len());
        order.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        best = order.into_iter().map(|i| (i as i64, logits[i] - log_total)).collect();
    }
    TokenLogprob { logprob: logits[token as usize] - log_total, top: best }
}

/// The log-probability of `next[j]` under row j of `logits` `[rows, vocab]`, and each row's `top`
/// most likely tokens', computed where the logits are: only `rows x (1 + top)` numbers come back.
fn score_rows(logits: &Tensor, next: &[i64], top: usize) -> Result<Vec<TokenLogprob>> {
    if next.is_empty() {
        return Ok(Vec::new());
    }
    let logits = logits.narrow(0, 0, next.len() as i64);
    let logprobs = logits.log_softmax(-1, Kind::Float);
    let ids = Tensor::from_slice(next).to_device(logits.device()).unsqueeze(1);
    let chosen = Vec::<f32>::try_from(logprobs.gather(1, &ids, false).reshape([-1]).to_device(tch::Device::Cpu))?;
    let top = top.min(logprobs.size()[1] as usize);
    let (best, best_ids) = logprobs.topk(top as i64, -1, true, true);
    let best = Vec::<f32>::try_from(best.reshape([-1]).to_device(tch::Device::Cpu))?;
    let best_ids = Vec::<i64>::try_from(best_ids.reshape([-1]).to_device(tch::Device::Cpu))?;
    // A row with a NaN or +infinity logit has no distribution: NaN comes out where a row's top or
    // chosen token is read (top-k ranks NaN first).
    if chosen.iter().chain(&best).any(|logprob| logprob.is_nan()) {
        return Err(ModelError::NotFinite(TARGET));
    }
    Ok(chosen
        .iter()
        .enumerate()
        .map(|(row, &logprob)| {
            let alternatives = (row * top..(row + 1) * top).map(|k| (best_ids[k], best[k])).collect();
            TokenLogprob { logprob, top: alternatives }
        })
        .collect())
}

fn row_vec(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(tch::Device::Cpu).reshape([-1]))?)
}

fn rows_vec(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (_, vocab) = logits.size2()?;
    let flat = row_vec(logits)?;
    Ok(flat.chunks(vocab as usize).map(<[f32]>::to_vec).collect())
}

fn flatten_panic<T>(result: std::thread::Result<Result<T>>) -> std::result::Result<T, String> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(panic_message(&panic)),
    }
}

/// What a caught panic said (its `&str` or `String` payload).
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the request panicked".into())
}

#[cfg(test)]
mod tests {
    use super::score_rows;
    use tch::Tensor;

    #[test]
    fn rows_score_their_next_tokens_and_refuse_what_is_not_finite() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 2.0, 1.0, 0.0]).view([2, 3]);
        let scored = score_rows(&logits, &[0, 1], 2).unwrap();
        let log_total = (1.0f32 + 1f32.exp() + 2f32.exp()).ln();
        assert!((scored[0].logprob - (0.0 - log_total)).abs() < 1e-6, "{scored:?}");
        assert!((scored[1].logprob - (1.0 - log_total)).abs() < 1e-6, "{scored:?}");
        assert_eq!((scored[0].top[0].0, scored[1].top[0].0, scored[1].top.len()), (2, 0, 2));
        for bad in [f32::NAN, f32::INFINITY] {
            let logits = Tensor::from_slice(&[0.0f32, 1.0, bad, 0.0, 1.0, 2.0]).view([2, 3]);
            for top in [0, 1] {
                assert!(score_rows(&logits, &[0, 1], top).is_err(), "{bad} with top {top}");
            }
        }
    }
}
