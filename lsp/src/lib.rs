//! The language server: the only crate that knows LSP types. Completions come from the shared
//! batching engine (`model::engine`) on its own thread, never from the async runtime.
//!
//! - `server`: the protocol edge (tower-lsp-server handlers, llm-ls compatible methods);
//! - `document`: open documents, edits in UTF-8/16/32 positions, incremental tree-sitter trees;
//! - `syntax`: whether and how much to complete, and when a completion's block is complete;
//! - `prompt`: the FIM prompt under a token budget;
//! - `request`: a request at a cursor as a job (window, decision), and [`complete_text`], the server's
//!   completion for a document text and byte offset without LSP types (`wizard eval --prompt-mode editor`);
//! - `engine`: jobs against the shared engine, cancellation, `catch_unwind` per request;
//! - `framing`: limits on a TCP client's message headers and lengths;
//! - `cache`: the LRU of completions and "typed as suggested" reuse;
//! - `text`: word and character-boundary helpers on UTF-8 text.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cache;
pub mod document;
pub mod engine;
mod framing;
pub mod prompt;
pub mod request;
mod server;
pub mod syntax;
pub mod text;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use engine::{Engine, ModelBackend, ModelPaths, Settings};
pub use request::complete_text;
use tower_lsp_server::Server;

/// Starts the engine thread, loading the models on it. A failure to load leaves the server up:
/// requests answer with the error and the client is shown it.
pub fn start_engine(paths: ModelPaths) -> Engine {
    Engine::start(move || {
        tracing::info!(model = %paths.model.display(), draft = ?paths.draft, "loading");
        let backend = ModelBackend::load(&paths)?;
        tracing::info!("model loaded");
        Ok(Box::new(backend) as Box<dyn engine::CompletionModel>)
    })
}

/// Serves one client over stdin/stdout until it exits.
pub async fn serve_stdio(engine: Engine, settings: Settings) {
    let (service, socket) = server::service(engine, settings);
    Server::new(tokio::io::stdin(), tokio::io::stdout(), socket).serve(service).await;
}

/// How long listening pauses after a failed accept (as hyper's and axum's servers do).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves clients over TCP on loopback `port`, one session per connection; only failing to listen
/// ends it.
pub async fn serve_tcp(engine: Engine, settings: Settings, port: u16) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, or a client gone before it was taken: the sessions under way
            // go on, and listening resumes once some close.
            Err(error) => {
                tracing::warn!(%error, "a client could not be accepted");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        tracing::info!(%peer, "client connected");
        // Each answer is one small write: sent at once, not held back by Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (engine, settings) = (engine.clone(), settings.clone());
        tokio::spawn(async move {
            let (read, write) = tokio::io::split(stream);
            let (service, socket) = server::service(engine, settings);
            Server::new(framing::Limited::new(read), write, socket).serve(service).await;
        });
    }
}
