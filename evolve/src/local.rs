//! wizard's own model as a backend, so the pipeline runs offline. Requests go to the shared inference
//! engine ([`model::engine`]), which owns the model on its own thread: concurrent evolutions and
//! responses decode in one batch, and a request that fails (even by a panic) fails alone. Tokenizing
//! and decoding run on tokio's blocking pool, never on the async runtime's threads.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::config::ModelConfig;
use model::engine::{Engine, EngineConfig, Event, Request, SubmitError};
use model::generate::{Finish, Sampling};
use model::gpt_bigcode::{GptBigCode, Precision};
use model::tokenizer::Tokenizer;
use tch::Device;
use tokio::sync::Semaphore;

use crate::backend::{Backend, BackendError, ChatFuture, ChatRequest, Reply};
use crate::Result;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    pub dir: PathBuf,
    /// Where to run.
    pub device: Device,
    /// Weight dtype.
    pub precision: Precision,
    /// Most new tokens per reply, whatever the request asks.
    pub max_new_tokens: usize,
}

/// The local backend: a handle to the inference engine.
pub struct LocalBackend {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    eos_token_id: i64,
    max_new_tokens: usize,
    model: String,
    /// As many requests as the engine takes (running and waiting); the others wait here.
    permits: Semaphore,
}

/// The Alpaca-style prompt WizardCoder was trained with.
pub fn format_prompt(request: &ChatRequest) -> String {
    let text: Vec<&str> = request.messages.iter().map(|m| m.content.as_str()).collect();
    format!(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
         ### Instruction:\n{}\n\n### Response:\n",
        text.join("\n\n")
    )
}

/// The prompt's token ids and the most tokens to generate: at most half the context, and the prompt
/// cut to the rest. An over-long prompt keeps its end, where the instruction and the response header are.
fn prepare(
    tokenizer: &Tokenizer,
    context: usize,
    max_new_tokens: usize,
    request: &ChatRequest,
) -> model::Result<(Vec<i64>, usize)> {
    let max_new = (request.max_tokens as usize).min(max_new_tokens).min(context / 2).max(1);
    let budget = context - max_new;
    let full = tokenizer.encode(&format_prompt(request))?;
    let mut ids = full.clone();
    let mut keep = budget;
    while ids.len() > budget && keep > 0 {
        let prompt = tokenizer.decode(&full[full.len() - keep..], false)?;
        ids = tokenizer.encode(&prompt)?;
        keep = keep.saturating_sub(ids.len().saturating_sub(budget));
    }
    Ok((ids.into_iter().map(i64::from).collect(), max_new))
}

fn local(error: impl std::fmt::Display) -> BackendError {
    BackendError::Local(error.to_string())
}

impl LocalBackend {
    /// Loads the model into an engine of its own; returns once it is ready or failed to load.
    pub fn start(config: LocalConfig) -> Result<LocalBackend> {
        let tokenizer = Tokenizer::from_dir(&config.dir)?;
        let eos = ModelConfig::from_file(&config.dir.join("config.json"))?.eos_token_id;
        let (dir, precision, device) = (config.dir.clone(), config.precision, config.device);
        let engine =
            Engine::start(EngineConfig::default(), move || GptBigCode::load_as(&dir, precision, device, |_, _| {}))?;
        let eos_token_id = eos.unwrap_or(i64::from(tokenizer.eos_id()));
        let name = config.dir.display().to_string();
        Ok(LocalBackend::new(engine, Arc::new(tokenizer), eos_token_id, name, config.max_new_tokens))
    }

    /// A backend on a running engine (which other callers may share); `model` names it in the store.
    pub fn new(
        engine: Engine,
        tokenizer: Arc<Tokenizer>,
        eos_token_id: i64,
        model: String,
        max_new_tokens: usize,
    ) -> LocalBackend {
        let permits = Semaphore::new(engine.config().max_batch + engine.config().max_waiting);
        LocalBackend { engine, tokenizer, eos_token_id, max_new_tokens, model, permits }
    }

    async fn answer(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        let _permit = self.permits.acquire().await.map_err(local)?;
        let (tokenizer, context, max_new_tokens, owned) =
            (self.tokenizer.clone(), self.engine.context(), self.max_new_tokens, request.clone());
        let (prompt, max_new) =
            tokio::task::spawn_blocking(move || prepare(&tokenizer, context, max_new_tokens, &owned))
                .await
                .map_err(local)?
                .map_err(local)?;
        let prompt_tokens = prompt.len() as u64;
        let sampling =
            Sampling { temperature: request.temperature, top_k: None, top_p: Some(0.95), seed: request.seed };
        let make = || Request {
            sampling: sampling.clone(),
            stop_tokens: vec![self.eos_token_id],
            ..Request::new(prompt.clone(), max_new)
        };
        // Busy only while another caller of a shared engine fills it, or for the moment between a
        // request's last event and its release: wait for a place.
        let mut events = loop {
            match self.engine.submit(make()) {
                Err(SubmitError::Busy(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                submitted => break submitted.map_err(local)?,
            }
        };
        let mut tokens = Vec::new();
        let finish = loop {
            match events.recv().await {
                Some(Event::Token { token, .. }) => tokens.push(token),
                Some(Event::Finished { finish, .. }) => break finish,
                Some(
                    Event::Started { .. }
                    | Event::Speculated(_)
                    | Event::PromptLogprobs { .. }
                    | Event::StopToken { .. },
                ) => {}
                Some(Event::Failed(message)) => return Err(BackendError::Local(message)),
                None => return Err(local(SubmitError::Stopped)),
            }
        };
        let completion_tokens = tokens.len() as u64;
        let tokenizer = self.tokenizer.clone();
        let text = tokio::task::spawn_blocking(move || {
            let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
            tokenizer.decode(&ids, false)
        })
        .await
        .map_err(local)?
        .map_err(local)?;
        let finish = match finish {
            Finish::Length => "length",
            Finish::Eos | Finish::Stop => "stop",
        };
        Ok(Reply { text, finish: finish.into(), prompt_tokens, completion_tokens, attempts: 1 })
    }
}

impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn chat<'a>(&'a self, request: &'a ChatRequest) -> ChatFuture<'a> {
        Box::pin(self.answer(request))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use model::complete::complete;
    use model::generate::GenerateConfig;
    use tch::Kind;

    use super::*;
    use crate::backend::Message;

    /// A tokenizer trained on small Python functions and a random model over it, saved in `dir`.
    fn tiny_model(dir: &Path) {
        let corpus = dir.join("corpus.py");
        let text: String = (0..40).map(|i| format!("def f_{i}(x):\n    return g(x) + {i}\n")).collect();
        std::fs::write(&corpus, text).unwrap();
        model::tokenizer::train(&model::tokenizer::TrainConfig::new(vec![corpus], 300), dir).unwrap();
        tch::manual_seed(5);
        let config = ModelConfig {
            vocab_size: Tokenizer::from_dir(dir).unwrap().vocab_size() as i64,
            n_positions: 512,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..ModelConfig::default()
        };
        GptBigCode::new(config, Device::Cpu).unwrap().save(dir, Kind::Float).unwrap();
    }

    fn request(i: u64) -> ChatRequest {
        let messages = vec![Message::user(format!("Write f_{i}."))];
        ChatRequest { messages, temperature: 0.8, max_tokens: 64, seed: 10 + i }
    }

    /// The reply the backend gave before the engine: `model::complete::complete` on the whole prompt.
    fn before(model: &GptBigCode, tokenizer: &Tokenizer, request: &ChatRequest, max_new_tokens: usize) -> Reply {
        let prompt = format_prompt(request);
        let sampling =
            Sampling { temperature: request.temperature, top_k: None, top_p: Some(0.95), seed: request.seed };
        let config = GenerateConfig { max_new_tokens, num_samples: 1, sampling, eos_token_id: Some(0) };
        let completion = complete(model, tokenizer, &prompt, &config, &[]).unwrap().remove(0);
        Reply {
            text: completion.text,
            finish: if completion.finish == Finish::Length { "length" } else { "stop" }.into(),
            prompt_tokens: tokenizer.encode(&prompt).unwrap().len() as u64,
            completion_tokens: completion.tokens as u64,
            attempts: 1,
        }
    }

    /// Eight requests at once decode together, each answered as the backend answered it alone before
    /// the engine; an over-long prompt is cut to leave room for the reply, not refused.
    #[test]
    fn concurrent_requests_batch_and_answer_as_before() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path());
        let config = LocalConfig {
            dir: dir.path().into(),
            device: Device::Cpu,
            precision: Precision::Dense(Kind::Float),
            max_new_tokens: 48,
        };
        let backend = Arc::new(LocalBackend::start(config).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let requests: Vec<ChatRequest> = (0..8).map(request).collect();
        let replies: Vec<Reply> = runtime.block_on(async {
            let tasks: Vec<_> = requests
                .iter()
                .map(|request| {
                    let (backend, request) = (backend.clone(), request.clone());
                    tokio::spawn(async move { backend.chat(&request).await })
                })
                .collect();
            let mut replies = Vec::new();
            for task in tasks {
                replies.push(task.await.unwrap().unwrap());
            }
            replies
        });
        let counters = backend.engine.counters();
        let (steps, rows) = (counters.steps.load(Ordering::Relaxed), counters.step_rows.load(Ordering::Relaxed));
        assert!(rows > 2 * steps, "8 requests ran {rows} rows in {steps} steps");

        let model = GptBigCode::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        let expected: Vec<Reply> = requests.iter().map(|r| before(&model, &tokenizer, r, 48)).collect();
        assert_eq!(replies, expected);
        assert!(replies.iter().any(|r| r.finish == "length" && r.completion_tokens == 48), "{replies:?}");

        // 48 new tokens leave 464 of the 512 positions to the prompt, which keeps its end.
        let long = ChatRequest { messages: vec![Message::user("def f_1(x):\n".repeat(200))], ..request(9) };
        let reply = runtime.block_on(backend.chat(&long)).unwrap();
        assert!((440..=464).contains(&reply.prompt_tokens), "{reply:?}");
    }
}
