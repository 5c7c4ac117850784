//! The LSP edge: tower-lsp-server handlers that convert protocol types to the crate's own (byte
//! offsets, [`Job`]s) and back. Document state sits behind a mutex that is never held across an
//! await; completions are computed by the [`Engine`] on its own thread.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower_lsp_server::jsonrpc::{Error, ErrorCode, Result};
use tower_lsp_server::lsp_types::*;
use tower_lsp_server::{Client, LanguageServer, LspService};
use tracing::Instrument;

use crate::cache::{fingerprint, Cache, Hit};
use crate::document::{Document, Encoding};
use crate::engine::{Engine, EngineError, Settings, Status};
use crate::prompt::{choose_snippets, SnippetSource};
use crate::request::{job_at, Request};
use crate::syntax::Language;
use crate::text::is_word_char;

/// An open document, its LSP language id, and when it was last opened or edited.
struct OpenDocument {
    document: Document,
    language_id: String,
    touched: u64,
    /// Held while a completion for the document is computed, so that a request that cancelled
    /// an older one is answered after it.
    turn: Arc<tokio::sync::Mutex<()>>,
}

struct State {
    documents: HashMap<String, OpenDocument>,
    /// Counts opens and edits, to order snippet sources.
    clock: u64,
    encoding: Encoding,
    settings: Settings,
    cache: Cache,
    in_flight: HashMap<String, Arc<AtomicBool>>,
}

/// The language server.
pub struct Backend {
    client: Client,
    engine: Engine,
    state: Mutex<State>,
    requests: AtomicU64,
}

/// Builds the service for one connection.
pub fn service(engine: Engine, settings: Settings) -> (LspService<Backend>, tower_lsp_server::ClientSocket) {
    LspService::build(|client| Backend {
        client,
        engine,
        state: Mutex::new(State {
            documents: HashMap::new(),
            clock: 0,
            encoding: Encoding::Utf16,
            settings,
            cache: Cache::new(256),
            in_flight: HashMap::new(),
        }),
        requests: AtomicU64::new(0),
    })
    .custom_method("textDocument/inlineCompletion", Backend::inline_completion)
    .custom_method("llm-ls/getCompletions", Backend::get_completions)
    .custom_method("llm-ls/acceptCompletion", Backend::accept_completion)
    .custom_method("llm-ls/rejectCompletion", Backend::reject_completion)
    .finish()
}

/// Sets the flag when dropped: a request future dropped by `$/cancelRequest` stops its decoding.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Request-specific changes to the settings (llm-ls parameters).
#[derive(Default)]
struct Overrides {
    context_window: Option<usize>,
    fim: Option<bool>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
}

/// A completion ready to be turned into protocol items.
struct Completion {
    text: String,
    cursor: Position,
    word_start: Position,
    word: String,
}

/// `current` with the fields of a client's settings object (under `wizard` or at the top) applied;
/// an error says which value is wrong, and nothing is applied.
fn settings_from(value: &Value, current: &Settings) -> std::result::Result<Settings, String> {
    let value = value.get("wizard").unwrap_or(value);
    let Some(object) = value.as_object() else {
        return Ok(current.clone());
    };
    let mut merged = serde_json::to_value(current).unwrap_or(Value::Null);
    if let Some(target) = merged.as_object_mut() {
        for (key, value) in object {
            target.insert(key.clone(), value.clone());
        }
    }
    let settings: Settings = serde_json::from_value(merged).map_err(|e| format!("invalid settings {value}: {e}"))?;
    settings.validate().map_err(|e| format!("invalid settings {value}: {e}"))?;
    Ok(settings)
}

fn engine_error(error: EngineError) -> Error {
    match error {
        EngineError::Cancelled => Error::request_cancelled(),
        other => Error { code: ErrorCode::InternalError, message: other.to_string().into(), data: None },
    }
}

impl Backend {
    async fn complete_at(&self, uri: &Uri, position: Position, overrides: Overrides) -> Result<Option<Completion>> {
        let key = uri.as_str().to_string();
        let (job, full_prefix, suffix, fingerprint, cursor, word_start, word, turn) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let encoding = state.encoding;
            let mut settings = state.settings.clone();
            settings.context_budget = overrides.context_window.unwrap_or(settings.context_budget);
            settings.max_tokens = overrides.max_tokens.unwrap_or(settings.max_tokens);
            settings.temperature = overrides.temperature.unwrap_or(settings.temperature);
            settings.top_p = overrides.top_p.or(settings.top_p);
            settings.top_k = overrides.top_k.or(settings.top_k);
            settings.validate().map_err(Error::invalid_params)?;
            let Some(open) = state.documents.get(&key) else {
                return Err(Error::invalid_params(format!("unknown document {key}")));
            };
            let document = &open.document;
            let turn = open.turn.clone();
            if !settings.languages.is_empty() && !settings.languages.contains(&open.language_id) {
                return Ok(None);
            }
            let offset = document
                .offset((position.line, position.character), encoding)
                .map_err(|e| Error::invalid_params(e.0))?;
            // A character past the line's end means its end, in the answer's range too.
            let cursor = document.position(offset, encoding).into_position();
            let text = document.text();
            let word_start_byte = text[..offset].trim_end_matches(is_word_char).len();
            let word = text[word_start_byte..offset].to_string();
            let word_start = document.position(word_start_byte, encoding);
            let cancel = Arc::new(AtomicBool::new(false));
            let request = Request {
                settings,
                fim: overrides.fim.unwrap_or(true),
                filename: Some(path_of(&key)),
                seed: 0,
                cancel: cancel.clone(),
            };
            let snippets = || {
                choose_snippets(
                    state
                        .documents
                        .iter()
                        .filter(|(other, open)| **other != key && open.document.language == document.language)
                        .map(|(other, open)| SnippetSource {
                            path: path_of(other),
                            text: open.document.text(),
                            touched: open.touched,
                        }),
                )
            };
            let Some(job) = job_at(document, offset, request, snippets) else {
                return Ok(None);
            };
            let fingerprint = fingerprint(&job.settings, job.fim, &job.parts);
            let full_prefix = text[..offset].to_string();
            let suffix = job.parts.suffix.clone();
            if let Some(previous) = state.in_flight.insert(key.clone(), cancel.clone()) {
                previous.store(true, Ordering::Relaxed);
            }
            if let Some(hit) = state.cache.get(&key, &full_prefix, &suffix, fingerprint) {
                let text = match hit {
                    Hit::Exact(text) | Hit::Typed(text) => text,
                };
                tracing::info!(cached = true, "completion served from the cache");
                // As when it was computed: an empty completion is none.
                if text.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Completion { text, cursor, word_start: word_start.into_position(), word }));
            }
            (job, full_prefix, suffix, fingerprint, cursor, word_start, word, turn)
        };
        let guard = CancelOnDrop(job.cancel.clone());
        let result = {
            let _turn = turn.lock().await;
            self.engine.complete(job).await
        };
        drop(guard);
        let output = result.map_err(engine_error)?;
        let figures = &output.figures;
        tracing::info!(
            prompt_tokens = figures.prompt_tokens,
            tokens = figures.tokens,
            prefill_ms = figures.prefill_ms,
            reused_tokens = figures.reused_tokens,
            first_token_ms = figures.first_token_ms,
            decode_ms = figures.total_ms - figures.first_token_ms,
            total_ms = figures.total_ms,
            drafted = figures.drafted,
            accepted = figures.accepted,
            "completed"
        );
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.cache.put(&key, &full_prefix, &suffix, fingerprint, &output.text);
        }
        if output.text.is_empty() {
            return Ok(None);
        }
        Ok(Some(Completion { text: output.text, cursor, word_start: word_start.into_position(), word }))
    }

    /// Tells the user which setting was refused; the settings in force do not change.
    async fn refuse_settings(&self, message: String) {
        tracing::warn!("{message}; the settings stay as they were");
        let message = format!("wizard: {message}; the settings stay as they were");
        self.client.show_message(MessageType::WARNING, message).await;
    }

    fn span(&self, method: &str, uri: &Uri, position: Position) -> tracing::Span {
        let id = self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::info_span!(
            "request",
            id,
            method,
            uri = uri.as_str(),
            line = position.line,
            character = position.character
        )
    }

    /// `textDocument/inlineCompletion` (LSP 3.18).
    pub async fn inline_completion(&self, params: InlineCompletionParams) -> Result<Option<InlineCompletionResponse>> {
        let at = params.text_document_position;
        let span = self.span("inlineCompletion", &at.text_document.uri, at.position);
        let completion =
            self.complete_at(&at.text_document.uri, at.position, Overrides::default()).instrument(span).await?;
        Ok(completion.map(|c| {
            InlineCompletionResponse::Array(vec![InlineCompletionItem {
                insert_text: c.text,
                filter_text: None,
                range: Some(Range::new(c.cursor, c.cursor)),
                command: None,
                insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
            }])
        }))
    }

    /// `llm-ls/getCompletions`: llm.nvim and llm-vscode's request.
    pub async fn get_completions(&self, params: GetCompletionsParams) -> Result<GetCompletionsResult> {
        let span = self.span("llm-ls/getCompletions", &params.text_document.uri, params.position);
        let parameters = params.request_body.as_ref().and_then(|body| body.get("parameters").or(Some(body)));
        let number = |name: &str| parameters.and_then(|p| p.get(name)).and_then(Value::as_f64);
        let overrides = Overrides {
            context_window: params.context_window,
            fim: params.fim.as_ref().map(|fim| fim.enabled),
            max_tokens: number("max_new_tokens").map(|n| n as usize),
            temperature: number("temperature"),
            top_p: number("top_p"),
            top_k: match number("top_k") {
                Some(k) if k.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&k) => {
                    return Err(Error::invalid_params(format!("top_k must be a whole number >= 1, got {k}")));
                }
                k => k.map(|k| k as usize),
            },
        };
        let completion =
            self.complete_at(&params.text_document.uri, params.position, overrides).instrument(span).await?;
        let request_id = format!("wizard-{}", self.requests.load(Ordering::Relaxed));
        let completions = completion
            .map(|c| {
                let mut text = c.text;
                for token in &params.tokens_to_clear {
                    text = text.replace(token.as_str(), "");
                }
                vec![GeneratedText { generated_text: text }]
            })
            .unwrap_or_default();
        Ok(GetCompletionsResult { request_id, completions })
    }

    /// `llm-ls/acceptCompletion`: logged.
    pub async fn accept_completion(&self, params: Value) -> Result<()> {
        tracing::info!(%params, "completion accepted");
        Ok(())
    }

    /// `llm-ls/rejectCompletion`: logged.
    pub async fn reject_completion(&self, params: Value) -> Result<()> {
        tracing::info!(%params, "completion rejected");
        Ok(())
    }
}

/// The path of a `file://` URI (for `<filename>`), or the URI itself.
fn path_of(uri: &str) -> String {
    uri.strip_prefix("file://").unwrap_or(uri).to_string()
}

trait IntoPosition {
    fn into_position(self) -> Position;
}

impl IntoPosition for (u32, u32) {
    fn into_position(self) -> Position {
        Position::new(self.0, self.1)
    }
}

/// llm-ls's `fim` parameter.
#[derive(Debug, Deserialize)]
pub struct FimParams {
    /// Whether to fill in the middle (use the suffix).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// llm-ls's `llm-ls/getCompletions` parameters (the ones wizard honours; others are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetCompletionsParams {
    /// The document.
    pub text_document: TextDocumentIdentifier,
    /// The cursor.
    pub position: Position,
    /// FIM on or off.
    #[serde(default)]
    pub fim: Option<FimParams>,
    /// Prompt budget in tokens.
    #[serde(default)]
    pub context_window: Option<usize>,
    /// Strings removed from the completion.
    #[serde(default)]
    pub tokens_to_clear: Vec<String>,
    /// `{"parameters": {"max_new_tokens", "temperature", "top_p", "top_k"}}`.
    #[serde(default)]
    pub request_body: Option<Value>,
}

/// One llm-ls completion.
#[derive(Debug, Serialize)]
pub struct GeneratedText {
    /// The text.
    pub generated_text: String,
}

/// llm-ls's result (snake_case, as llm-ls writes it).
#[derive(Debug, Serialize)]
pub struct GetCompletionsResult {
    /// An id for accept/reject.
    pub request_id: String,
    /// Zero or one completion.
    pub completions: Vec<GeneratedText>,
}

impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let offered = params.capabilities.general.and_then(|general| general.position_encodings).unwrap_or_default();
        let encoding = offered
            .iter()
            .find_map(|kind| match kind.as_str() {
                "utf-8" => Some(Encoding::Utf8),
                "utf-16" => Some(Encoding::Utf16),
                "utf-32" => Some(Encoding::Utf32),
                _ => None,
            })
            .unwrap_or(Encoding::Utf16);
        let refused = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.encoding = encoding;
            let options = params.initialization_options.as_ref().map(|options| settings_from(options, &state.settings));
            let refused = match options {
                Some(Ok(settings)) => {
                    state.settings = settings;
                    None
                }
                Some(Err(message)) => Some(message),
                None => None,
            };
            tracing::info!(?encoding, settings = ?state.settings, "initialized");
            refused
        };
        if let Some(message) = refused {
            self.refuse_settings(message).await;
        }
        let kind = match encoding {
            Encoding::Utf8 => PositionEncodingKind::UTF8,
            Encoding::Utf16 => PositionEncodingKind::UTF16,
            Encoding::Utf32 => PositionEncodingKind::UTF32,
        };
        Ok(InitializeResult {
            capabilities: ServerCapabilities {
                position_encoding: Some(kind),
                text_document_sync: Some(TextDocumentSyncCapability::Kind(TextDocumentSyncKind::INCREMENTAL)),
                completion_provider: Some(CompletionOptions::default()),
                inline_completion_provider: Some(OneOf::Left(true)),
                ..ServerCapabilities::default()
            },
            server_info: Some(ServerInfo { name: "wizard".into(), version: Some(env!("CARGO_PKG_VERSION").into()) }),
            offset_encoding: None,
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        let engine = self.engine.clone();
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Status::Failed(message) = engine.ready().await {
                client.show_message(MessageType::ERROR, format!("wizard: the model did not load: {message}")).await;
            }
        });
    }

    async fn shutdown(&self) -> Result<()> {
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let item = params.text_document;
        let language = Language::detect(&item.language_id, item.uri.as_str());
        let document = Document::new(item.text, language, item.version);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.clock += 1;
        let open =
            OpenDocument { document, language_id: item.language_id, touched: state.clock, turn: Default::default() };
        state.documents.insert(item.uri.as_str().to_string(), open);
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let key = params.text_document.uri.as_str().to_string();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let encoding = state.encoding;
        state.clock += 1;
        let clock = state.clock;
        let Some(open) = state.documents.get_mut(&key) else {
            tracing::warn!("change to unknown document {key}");
            return;
        };
        open.touched = clock;
        let document = &mut open.document;
        document.version = params.text_document.version;
        for change in params.content_changes {
            match change.range {
                Some(range) => document.edit(
                    (range.start.line, range.start.character),
                    (range.end.line, range.end.character),
                    &change.text,
                    encoding,
                ),
                None => document.replace_all(change.text),
            }
        }
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let key = params.text_document.uri.as_str().to_string();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.documents.remove(&key);
        state.cache.close(&key);
        if let Some(flag) = state.in_flight.remove(&key) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        let refused = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match settings_from(&params.settings, &state.settings) {
                Ok(settings) => {
                    state.settings = settings;
                    tracing::info!(settings = ?state.settings, "configuration changed");
                    None
                }
                Err(message) => Some(message),
            }
        };
        if let Some(message) = refused {
            self.refuse_settings(message).await;
        }
    }

    async fn completion(&self, params: CompletionParams) -> Result<Option<CompletionResponse>> {
        let at = params.text_document_position;
        let span = self.span("completion", &at.text_document.uri, at.position);
        let completion =
            self.complete_at(&at.text_document.uri, at.position, Overrides::default()).instrument(span).await?;
        Ok(completion.map(|c| {
            let new_text = format!("{}{}", c.word, c.text);
            let label: String =
                new_text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().chars().take(60).collect();
            CompletionResponse::Array(vec![CompletionItem {
                label,
                kind: Some(CompletionItemKind::TEXT),
                detail: Some("wizard".into()),
                preselect: Some(true),
                filter_text: Some(new_text.clone()),
                insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
                text_edit: Some(CompletionTextEdit::Edit(TextEdit {
                    range: Range::new(c.word_start, c.cursor),
                    new_text,
                })),
                ..CompletionItem::default()
            }])
        }))
    }
}
