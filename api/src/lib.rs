//! The OpenAI-compatible HTTP API over the shared inference engine ([`model::engine`]):
//! `/v1/completions` (with `suffix` for fill-in-the-middle), `/v1/chat/completions`, llama.cpp's
//! `/infill`, `/v1/models`, `/health` and `/metrics`. Handlers only parse, check and format: the
//! model runs on the engine's thread, tokenization of prompts on blocking threads.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cors;
mod error;
mod generation;
mod logprobs;
mod metrics;
mod routes;
mod schema;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use model::engine::Engine;
use model::tokenizer::Tokenizer;

pub use cors::Cors;
pub use error::ApiError;
pub use generation::Limits;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name `/v1/models` reports and responses carry.
    pub model_name: String,
    /// When set, every endpoint but `/health` wants `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers (an idle connection's too), and
    /// again its body.
    pub read_timeout: Duration,
    /// Token limits.
    pub limits: Limits,
    /// The tokenizer's chat template (`tokenizer_config.json`), used instead of WizardCoder's.
    pub chat_template: Option<String>,
    /// Other origins browsers may call the API from.
    pub cors: Option<Cors>,
}

/// The `chat_template` of `tokenizer_config.json` in `model_dir`, if it has one (a missing file is
/// none; a file that is not JSON is an error naming it).
pub fn chat_template(model_dir: &std::path::Path) -> Result<Option<String>, String> {
    let path = model_dir.join("tokenizer_config.json");
    let text = match model::files::read_regular_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: {error}", path.display())),
    };
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config.get("chat_template").and_then(|t| t.as_str()).map(str::to_string))
}

/// What every handler shares.
pub struct App {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    config: ServerConfig,
    metrics: metrics::Metrics,
    /// `<fim_prefix>`, `<fim_suffix>`, `<fim_middle>`, when the tokenizer has them.
    fim: Option<[i64; 3]>,
    /// Tokens that end any completion: end of text.
    eos: Vec<i64>,
    /// Tokens that also end a fill-in-the-middle completion.
    fim_stops: Vec<i64>,
}

impl App {
    /// The application around a running engine and its model's tokenizer.
    pub fn new(engine: Engine, tokenizer: Arc<Tokenizer>, config: ServerConfig) -> Arc<App> {
        let id = |name: &str| tokenizer.token_id(name).map(i64::from);
        let fim = match (id("<fim_prefix>"), id("<fim_suffix>"), id("<fim_middle>")) {
            (Some(p), Some(s), Some(m)) => Some([p, s, m]),
            _ => None,
        };
        let eos = vec![i64::from(tokenizer.eos_id())];
        let fim_stops = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<file_sep>"]
            .iter()
            .filter_map(|name| id(name))
            .chain(eos.iter().copied())
            .collect();
        Arc::new(App { engine, tokenizer, config, metrics: metrics::Metrics::default(), fim, eos, fim_stops })
    }
}

/// The routes, with the body limit, the API key check and cross-origin access.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.config.max_body_bytes;
    let cors = app.config.cors.as_ref().map(Cors::layer);
    let guarded = Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/infill", post(routes::infill))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/metrics", get(routes::metrics))
        // The key is checked first (the outer layer): no body is read for a client without it.
        .route_layer(middleware::from_fn_with_state(app.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key));
    let router = Router::new()
        .route("/health", get(routes::health))
        .merge(guarded)
        .fallback(|| async {
            ApiError { status: axum::http::StatusCode::NOT_FOUND, ..ApiError::invalid(None, "no such endpoint") }
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            let message = format!("{method} is not allowed on this endpoint");
            ApiError { status: axum::http::StatusCode::METHOD_NOT_ALLOWED, ..ApiError::invalid(None, message) }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app);
    // Outermost: a browser's preflight carries no key and is answered here.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

async fn require_key(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.config.api_key {
        let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        let token = given
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if !token.is_some_and(|token| same_secret(token.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Equality that takes as long wherever the first difference is, so that timing does not reveal
/// how much of a guessed key is right.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let differences = given.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    given.len() == key.len() && differences == 0
}

/// Answers 413 from the Content-Length header, before a byte of an oversized body is read (the
/// body limit alone would wait for the body to arrive), then reads the body within the read
/// timeout (408 past it), so that a client that stops sending does not hold a connection.
async fn read_body(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = app.config.max_body_bytes;
    let length =
        request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|length| length > limit as u64) {
        return ApiError::too_large(limit).into_response();
    }
    let (parts, body) = request.into_parts();
    let timeout = app.config.read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) if is_over_limit(&error) => return ApiError::too_large(limit).into_response(),
        Ok(Err(error)) => {
            return ApiError::invalid(None, format!("the request body could not be read: {error}")).into_response()
        }
        Err(_) => return ApiError::timed_out(timeout.as_secs()).into_response(),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Serves on `listener` until SIGTERM or SIGINT, then stops taking connections and returns once
/// the requests under way have ended (streams run to their end), or at a second signal, or after
/// [`DRAIN_SECONDS`]. A client gets [`ServerConfig::read_timeout`] to send a request's headers
/// (idle connections included) and again for its body; a failed accept (out of file descriptors)
/// pauses taking connections, never ends the server.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let read_timeout = app.config.read_timeout;
    let service = hyper_util::service::TowerToHyperService::new(router(app));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A streamed token is one small write: sent at once, not held for the
                    // client's acknowledgement of the one before (Nagle).
                    let _ = stream.set_nodelay(true);
                    let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                    let connection = connections.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "connection ended");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "a connection could not be accepted");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("stopping: no new connections; finishing the requests under way");
    drop(listener);
    tokio::select! {
        () = connections.shutdown() => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = tokio::time::sleep(Duration::from_secs(DRAIN_SECONDS)) => {
            tracing::warn!("requests still under way after {DRAIN_SECONDS} s are cut off");
        }
    }
    Ok(())
}

fn is_over_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// How long taking connections pauses after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long a stopping server waits for the requests under way.
const DRAIN_SECONDS: u64 = 30;
