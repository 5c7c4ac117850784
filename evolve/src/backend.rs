//! The LLM behind the engine: one chat request in, one reply out. Implemented over HTTP
//! ([`crate::http`]) and by wizard's own model ([`crate::local`]).
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Message {
        Message { role: "user".into(), content: content.into() }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling temperature (0 is greedy).
    pub temperature: f64,
    /// Most tokens in the reply.
    pub max_tokens: u32,
    /// Sampling seed, derived from the item and stage so that a repeated request repeats.
    pub seed: u64,
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// The assistant's text.
    pub text: String,
    /// Why generation ended (`stop`, `length`, ...), as the backend said.
    pub finish: String,
    /// Tokens in the prompt, as the backend counted them (0 when it did not say).
    pub prompt_tokens: u64,
    /// Tokens in the reply.
    pub completion_tokens: u64,
    /// Attempts it took (1 without retries).
    pub attempts: u32,
}

/// Why a request failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// 401 or 403: the key is wrong. Never retried.
    #[error("the backend at {url} refused the API key (HTTP {status}: {body}); check the key in the API-key variable")]
    Unauthorized {
        /// The endpoint.
        url: String,
        /// 401 or 403.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// 404: wrong base URL or model. Never retried.
    #[error("the backend at {url} answered 404 Not Found ({body}); check --base-url and --model")]
    NotFound {
        /// The endpoint.
        url: String,
        /// The start of the body.
        body: String,
    },
    /// Another 4xx for this one request (too long, bad parameter): the item is rejected, the run goes on.
    #[error("the backend refused the request (HTTP {status}: {body})")]
    Refused {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// Every attempt failed with a retryable error (429, 5xx, timeout, unreachable, bad JSON).
    #[error("the backend at {url} failed {attempts} attempts, the last with: {last}")]
    Exhausted {
        /// The endpoint.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The local model failed.
    #[error("local model: {0}")]
    Local(String),
}

impl BackendError {
    /// Whether the run must stop (as opposed to rejecting this one item).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, BackendError::Refused { .. })
    }
}

/// A future returned by [`Backend::chat`].
pub type ChatFuture<'a> = Pin<Box<dyn Future<Output = Result<Reply, BackendError>> + Send + 'a>>;

/// Something that answers chat requests. Implementations handle their own retries.
pub trait Backend: Send + Sync {
    /// `http` or `local`, stored with each answer.
    fn kind(&self) -> &'static str;
    /// The model name, stored with each answer.
    fn model(&self) -> &str;
    /// Answers one request.
    fn chat<'a>(&'a self, request: &'a ChatRequest) -> ChatFuture<'a>;
}
