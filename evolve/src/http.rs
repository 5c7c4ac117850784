//! The OpenAI-compatible Chat Completions backend (OpenAI, vLLM, llama.cpp server, Ollama's `/v1`):
//! retries with exponential backoff and jitter on 429, 5xx, timeouts, connection errors and
//! malformed replies, honouring `Retry-After`; 401/403 stop at once; a request-per-minute limit.
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::time::Instant;

use crate::backend::{Backend, BackendError, ChatFuture, ChatRequest, Reply};

/// Settings of the HTTP backend.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Base URL up to and including the API version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model name sent with each request.
    pub model: String,
    /// Bearer token (none for local servers that do not check).
    pub api_key: Option<String>,
    /// Limit for one attempt, connection and body included.
    pub timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled each time.
    pub backoff: Duration,
    /// Longest backoff, and longest `Retry-After` honoured.
    pub max_backoff: Duration,
    /// Requests (attempts) per minute at most; `None` for no limit.
    pub requests_per_minute: Option<u32>,
}

impl HttpConfig {
    /// Defaults for a base URL and model: 10-minute timeout, 8 attempts, 1 s backoff up to 60 s.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> HttpConfig {
        HttpConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(600),
            max_attempts: 8,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            requests_per_minute: None,
        }
    }
}

/// Spaces request starts at least `60 s / rpm` apart.
struct RateLimit {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    async fn wait(&self) {
        let start = {
            let mut next = self.next.lock().expect("rate limit lock");
            let now = Instant::now();
            let start = next.map_or(now, |at| at.max(now));
            *next = Some(start + self.interval);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// The HTTP backend.
pub struct HttpBackend {
    /// Set by a 401/403 or 404: every later request fails at once with it.
    fatal: std::sync::OnceLock<BackendError>,
    client: reqwest::Client,
    url: String,
    config: HttpConfig,
    rate: Option<RateLimit>,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// One failed attempt.
enum Failure {
    Retry { error: String, retry_after: Option<Duration> },
    Fatal(BackendError),
}

fn snippet(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &body[..at]),
        None => body.to_string(),
    }
}

impl HttpBackend {
    /// A backend for `config`.
    pub fn new(config: HttpConfig) -> Result<HttpBackend, BackendError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| BackendError::Local(format!("cannot build the HTTP client: {e}")))?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let rate = config
            .requests_per_minute
            .filter(|rpm| *rpm > 0)
            .map(|rpm| RateLimit { interval: Duration::from_secs_f64(60.0 / f64::from(rpm)), next: Mutex::new(None) });
        Ok(HttpBackend { fatal: std::sync::OnceLock::new(), client, url, config, rate })
    }

    async fn attempt(&self, body: &serde_json::Value) -> Result<Reply, Failure> {
        let mut request = self.client.post(&self.url).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let retry = |error: String| Failure::Retry { error, retry_after: None };
        let timeout = self.config.timeout;
        let response = request.send().await.map_err(|e| retry(describe(&e, timeout)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = response.text().await.map_err(|e| retry(format!("reading the body: {}", describe(&e, timeout))))?;
        let code = status.as_u16();
        match code {
            200..=299 => {}
            401 | 403 => {
                return Err(Failure::Fatal(BackendError::Unauthorized {
                    url: self.url.clone(),
                    status: code,
                    body: snippet(&text),
                }))
            }
            404 => return Err(Failure::Fatal(BackendError::NotFound { url: self.url.clone(), body: snippet(&text) })),
            408 | 409 | 425 | 429 | 500..=599 => {
                return Err(Failure::Retry { error: format!("HTTP {code}: {}", snippet(&text)), retry_after })
            }
            _ => return Err(Failure::Fatal(BackendError::Refused { status: code, body: snippet(&text) })),
        }
        let completion: Completion =
            serde_json::from_str(&text).map_err(|e| retry(format!("malformed reply ({e}): {}", snippet(&text))))?;
        let Some(choice) = completion.choices.into_iter().next() else {
            return Err(retry("the reply has no choices".into()));
        };
        let usage = completion.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 });
        Ok(Reply {
            text: choice.message.content.unwrap_or_default(),
            finish: choice.finish_reason.unwrap_or_default(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            attempts: 1,
        })
    }

    /// The wait before attempt `attempt + 1`: `Retry-After` when the server gave one (capped),
    /// otherwise exponential backoff with equal jitter.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self.config.max_backoff;
        if let Some(after) = retry_after {
            let jitter = rand::rng().random_range(0.0..0.1);
            return after.min(cap).mul_f64(1.0 + jitter);
        }
        let exponential = self.config.backoff.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(cap);
        exponential.mul_f64(0.5 + rand::rng().random_range(0.0..0.5))
    }

    async fn chat_with_retries(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        let body = serde_json::json!({
            "model": self.config.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
        });
        let attempts = self.config.max_attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            if let Some(rate) = &self.rate {
                rate.wait().await;
            }
            if let Some(error) = self.fatal.get() {
                return Err(error.clone());
            }
            match self.attempt(&body).await {
                Ok(reply) => return Ok(Reply { attempts: attempt, ..reply }),
                Err(Failure::Fatal(error)) => {
                    if error.is_fatal() {
                        let _ = self.fatal.set(error.clone());
                    }
                    return Err(error);
                }
                Err(Failure::Retry { error, retry_after }) => {
                    if attempt < attempts {
                        let wait = self.backoff(attempt, retry_after);
                        tracing::warn!(url = %self.url, attempt, "{error}; retrying in {:.1} s", wait.as_secs_f64());
                        tokio::time::sleep(wait).await;
                    }
                    last = error;
                }
            }
        }
        Err(BackendError::Exhausted { url: self.url.clone(), attempts, last })
    }
}

fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    use std::error::Error;
    if error.is_timeout() {
        return format!("timed out after {:.1} s", timeout.as_secs_f64());
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl Backend for HttpBackend {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    fn chat<'a>(&'a self, request: &'a ChatRequest) -> ChatFuture<'a> {
        Box::pin(self.chat_with_retries(request))
    }
}
