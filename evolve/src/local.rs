//! wizard's own model as a backend, so the pipeline runs offline. The model and tokenizer live on one
//! dedicated thread that takes requests from a channel: no tensor work or tokenization happens on
//! the async runtime's threads.
use std::path::PathBuf;
use std::sync::mpsc;

use model::complete::complete;
use model::generate::{Finish, GenerateConfig, Sampling};
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;
use tch::{Device, Kind};
use tokio::sync::oneshot;

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
    pub kind: Kind,
    /// Most new tokens per reply, whatever the request asks.
    pub max_new_tokens: usize,
}

struct Job {
    request: ChatRequest,
    reply: oneshot::Sender<Result<Reply, BackendError>>,
}

/// The local backend: a handle to the inference thread.
pub struct LocalBackend {
    jobs: mpsc::Sender<Job>,
    model: String,
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

struct Engine {
    model: GptBigCode,
    tokenizer: Tokenizer,
    max_new_tokens: usize,
}

impl Engine {
    fn answer(&self, request: &ChatRequest) -> model::Result<Reply> {
        let positions = usize::try_from(self.model.config().n_positions).unwrap_or(usize::MAX);
        let max_new = (request.max_tokens as usize).min(self.max_new_tokens).min(positions / 2).max(1);
        let budget = positions - max_new;
        // Keep the end of an over-long prompt: the instruction and the response header are there.
        let mut prompt = format_prompt(request);
        let full = self.tokenizer.encode(&prompt)?;
        let mut ids = full.clone();
        let mut keep = budget;
        while ids.len() > budget && keep > 0 {
            prompt = self.tokenizer.decode(&full[full.len() - keep..], false)?;
            ids = self.tokenizer.encode(&prompt)?;
            keep = keep.saturating_sub(ids.len().saturating_sub(budget));
        }
        let config = GenerateConfig {
            max_new_tokens: max_new,
            num_samples: 1,
            sampling: Sampling { temperature: request.temperature, top_k: None, top_p: Some(0.95), seed: request.seed },
            eos_token_id: self.model.config().eos_token_id.or(Some(i64::from(self.tokenizer.eos_id()))),
        };
        let completion = complete(&self.model, &self.tokenizer, &prompt, &config, &[])?.remove(0);
        Ok(Reply {
            text: completion.text,
            finish: match completion.finish {
                Finish::Length => "length",
                Finish::Eos | Finish::Stop => "stop",
            }
            .into(),
            prompt_tokens: ids.len() as u64,
            completion_tokens: completion.tokens as u64,
            attempts: 1,
        })
    }
}

impl LocalBackend {
    /// Loads the model on its own thread; returns once it is ready or failed to load.
    pub fn start(config: LocalConfig) -> Result<LocalBackend> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let model = config.dir.display().to_string();
        std::thread::Builder::new()
            .name("evolve-model".into())
            .spawn(move || {
                let loaded = Tokenizer::from_dir(&config.dir).and_then(|tokenizer| {
                    let model = GptBigCode::load(&config.dir, config.kind, config.device)?;
                    Ok(Engine { model, tokenizer, max_new_tokens: config.max_new_tokens })
                });
                let engine = match loaded {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        engine
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                for job in inbox {
                    let reply = engine.answer(&job.request).map_err(|e| BackendError::Local(e.to_string()));
                    let _ = job.reply.send(reply);
                }
            })
            .map_err(|e| crate::EvolveError::Invalid(format!("cannot start the model thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(LocalBackend { jobs, model }),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(crate::EvolveError::Invalid("the model thread died while loading".into())),
        }
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
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .send(Job { request: request.clone(), reply })
                .map_err(|_| BackendError::Local("the model thread has stopped".into()))?;
            answer.await.map_err(|_| BackendError::Local("the model thread stopped mid-request".into()))?
        })
    }
}
