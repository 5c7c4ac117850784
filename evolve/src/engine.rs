//! The round loop. Round 0 holds the seeds (answered by the backend when they have no output); each
//! later round evolves every live lineage once, judges, answers and filters the result, then cleans
//! the round (dedup, decontamination) and closes it. All state is in the [`Store`]: a run that is
//! killed and started again picks up the pending items with the answers they already have.
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::backend::{Backend, BackendError, ChatRequest, Message};
use crate::clean::{Benchmark, Decontaminator};
use crate::prompts::{question, Method, Prompts};
use crate::rules::{check_instruction, check_response, parse_verdict, Limits, Rejection, Verdict};
use crate::seeds::Seed;
use crate::store::{Answer, RoundStats, Stage, Store, Work};
use crate::{EvolveError, Result};

/// What a run does.
#[derive(Clone)]
pub struct EngineConfig {
    /// Evolution rounds after round 0.
    pub rounds: u32,
    /// Seed for method choice and sampling.
    pub seed: u64,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Sampling temperature for evolving and answering.
    pub temperature: f64,
    /// Most tokens per reply.
    pub max_tokens: u32,
    /// Length limits of the rules.
    pub limits: Limits,
    /// Templates.
    pub prompts: Prompts,
    /// Benchmarks to decontaminate against.
    pub benchmarks: Vec<Benchmark>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            rounds: 3,
            seed: 0,
            concurrency: 16,
            temperature: 1.0,
            max_tokens: 2048,
            limits: Limits::default(),
            prompts: Prompts::default(),
            benchmarks: Vec::new(),
        }
    }
}

/// The models: one evolves and judges, the other answers (they may be the same).
#[derive(Clone)]
pub struct Backends {
    /// Rewrites instructions and judges equality.
    pub evolver: Arc<dyn Backend>,
    /// Answers instructions.
    pub responder: Arc<dyn Backend>,
}

/// Progress reports from the engine (the CLI draws bars and tables from them).
pub trait Progress: Send + Sync {
    /// A round starts (or resumes) with `done` of `total` items already through.
    fn round_started(&self, round: u32, total: u64, done: u64);
    /// One more item is through.
    fn item_done(&self, round: u32);
    /// A round is closed.
    fn round_finished(&self, stats: &RoundStats);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn round_started(&self, _: u32, _: u64, _: u64) {}
    fn item_done(&self, _: u32) {}
    fn round_finished(&self, _: &RoundStats) {}
}

struct Context {
    store: Arc<Mutex<Store>>,
    backends: Backends,
    config: EngineConfig,
    markers: Vec<String>,
    permits: Semaphore,
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    // A panic elsewhere cannot leave SQLite half-written: every write is one transaction.
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Context {
    /// Asks the backend once (its own retries aside) and stores the answer before returning it.
    /// `Ok(None)` means the backend refused this one request: the item is rejected.
    async fn ask(
        &self,
        item: i64,
        stage: Stage,
        prompt: String,
        temperature: f64,
        value: impl FnOnce(&str) -> String,
    ) -> Result<Option<(String, String)>> {
        let backend = match stage {
            Stage::Respond => &self.backends.responder,
            Stage::Evolve | Stage::Judge => &self.backends.evolver,
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.config.seed, item, stage.name()).hash(&mut hasher);
        let request = ChatRequest {
            messages: vec![Message::user(prompt.clone())],
            temperature,
            max_tokens: self.config.max_tokens,
            seed: hasher.finish() >> 1,
        };
        let started = Instant::now();
        let reply = {
            let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
            backend.chat(&request).await
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(BackendError::Refused { status, body }) => {
                let rejection = Rejection { reason: "backend-refused", detail: format!("HTTP {status}: {body}") };
                lock(&self.store).finish_item(item, Some(&rejection))?;
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let stored = value(&reply.text);
        let answer =
            Answer { backend: backend.kind(), model: backend.model(), latency: started.elapsed(), seed: request.seed };
        lock(&self.store).save_answer(item, stage, &prompt, &reply, &stored, answer)?;
        Ok(Some((stored, reply.finish)))
    }

    fn finish(&self, item: i64, rejection: Option<Rejection>) -> Result<()> {
        lock(&self.store).finish_item(item, rejection.as_ref())
    }

    async fn process(&self, work: Work) -> Result<()> {
        let id = work.id;
        let temperature = self.config.temperature;
        let Some(parent) = work.parent else {
            // A seed: answer it if it came without an output; seeds are not eliminated.
            if work.response.is_none() {
                let question = question(work.instruction.as_deref().unwrap_or_default(), &work.input);
                if self.ask(id, Stage::Respond, question, temperature, str::to_string).await?.is_none() {
                    return Ok(());
                }
            }
            return self.finish(id, None);
        };
        let instruction = match work.instruction {
            Some(instruction) => instruction,
            None => {
                let method = Method::ALL.into_iter().find(|m| m.name() == work.method).unwrap_or(Method::Constraints);
                let prompt = self.config.prompts.evolve_prompt(method, &parent);
                let trim = |text: &str| text.trim().to_string();
                match self.ask(id, Stage::Evolve, prompt, temperature, trim).await? {
                    Some((instruction, _)) => instruction,
                    None => return Ok(()),
                }
            }
        };
        if let Some(rejection) = check_instruction(&instruction, &self.markers, &self.config.limits) {
            return self.finish(id, Some(rejection));
        }
        let verdict = match work.verdict {
            Some(verdict) => verdict,
            None => {
                let prompt = self.config.prompts.equal_prompt(&parent, &instruction);
                let name = |text: &str| parse_verdict(text).name().to_string();
                match self.ask(id, Stage::Judge, prompt, 0.0, name).await? {
                    Some((verdict, _)) => verdict,
                    None => return Ok(()),
                }
            }
        };
        if verdict == Verdict::Equal.name() {
            let rejection =
                Rejection { reason: "equal-to-parent", detail: "the judge found no gain over the parent".into() };
            return self.finish(id, Some(rejection));
        }
        let (response, finish) = match work.response {
            Some(response) => response,
            None => match self.ask(id, Stage::Respond, instruction, temperature, str::to_string).await? {
                Some(response) => response,
                None => return Ok(()),
            },
        };
        self.finish(id, check_response(&response, &finish, &self.config.limits))
    }
}

/// Runs (or resumes) evolution up to `config.rounds`. `seeds` are imported only into an empty
/// store. Returns the statistics of every round.
pub async fn run(
    store: Store,
    seeds: &[Seed],
    config: EngineConfig,
    backends: Backends,
    progress: Arc<dyn Progress>,
) -> Result<Vec<RoundStats>> {
    if config.concurrency == 0 {
        return Err(EvolveError::Invalid("--concurrency must be at least 1".into()));
    }
    let store = Arc::new(Mutex::new(store));
    let decontaminator = Arc::new(Decontaminator::new(&config.benchmarks));
    let context = Arc::new(Context {
        store: store.clone(),
        backends,
        markers: config.prompts.copy_markers(),
        permits: Semaphore::new(config.concurrency),
        config,
    });
    {
        let mut store = lock(&store);
        if !store.planned(0)? {
            store.import_seeds(seeds)?;
        }
    }
    for round in 0..=context.config.rounds {
        let (work, total) = {
            let mut store = lock(&store);
            if !store.planned(round)? {
                let planned = store.plan_round(round, context.config.seed)?;
                tracing::info!(round, planned, "planned round");
            }
            if store.finished(round)? {
                continue;
            }
            (store.pending(round)?, store.round_stats(round)?.items)
        };
        progress.round_started(round, total, total - work.len() as u64);
        let span = tracing::info_span!("round", round);
        let mut tasks = JoinSet::new();
        for item in work {
            let context = context.clone();
            let item_span = tracing::info_span!(parent: &span, "item", id = item.id);
            tasks.spawn(async move { context.process(item).await }.instrument(item_span));
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => progress.item_done(round),
                Ok(Err(error)) => {
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    return Err(error);
                }
                Err(error) => {
                    tasks.abort_all();
                    return Err(EvolveError::Invalid(format!("an item task failed: {error}")));
                }
            }
        }
        let (cleaner, decontaminator) = (store.clone(), decontaminator.clone());
        tokio::task::spawn_blocking(move || lock(&cleaner).clean_round(round, &decontaminator))
            .await
            .map_err(|e| EvolveError::Invalid(format!("clean-up failed: {e}")))??;
        let stats = lock(&store).round_stats(round)?;
        tracing::info!(
            round,
            accepted = stats.accepted,
            rejected = stats.rejected,
            removed = stats.removed,
            "round done"
        );
        progress.round_finished(&stats);
    }
    let store = lock(&store);
    store.rounds()?.into_iter().map(|round| store.round_stats(round)).collect()
}
