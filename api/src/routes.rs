//! The handlers: parse and check the body, plan the generation, then answer in one JSON object or
//! as server-sent events (OpenAI's chunks ending with `[DONE]`; llama.cpp's for `/infill`).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use model::engine::{Event, TokenLogprob};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::generation::{self, Merged, Plan, SampleText};
use crate::logprobs::{self, LegacyLogprobs};
use crate::schema::{ChatRequest, CompletionRequest, InfillRequest, Knobs, Prompt};
use crate::App;

/// The three generating endpoints differ only in how they shape their answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Completion,
    Chat,
    Infill,
}

impl Shape {
    fn endpoint(self) -> &'static str {
        match self {
            Shape::Completion => "/v1/completions",
            Shape::Chat => "/v1/chat/completions",
            Shape::Infill => "/infill",
        }
    }
}

fn parse(app: &App, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(app.config.max_body_bytes),
        _ => ApiError::invalid(None, rejection.body_text()),
    })?;
    match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::invalid(None, "the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(None, format!("invalid JSON body: {e}"))),
    }
}

/// `T` from the body, or an error naming the field that does not fit.
fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|error| {
        let message = error.inner().to_string();
        // A missing field is reported at its parent: name the field itself.
        let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        let path = match (error.path().to_string(), missing) {
            (parent, Some(field)) if parent == "." => field.to_string(),
            (parent, Some(field)) => format!("{parent}.{field}"),
            (path, None) => path,
        };
        ApiError::invalid(Some(&path), format!("`{path}`: {message}"))
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("{prefix}-{:x}{:06x}", now(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// What a generating request became: the plan, plus what the answer needs.
struct Job {
    shape: Shape,
    plan: Plan,
    stream: bool,
    include_usage: bool,
    /// Prompt texts to put before the completions (`echo`).
    echo: Vec<String>,
    started: Instant,
}

pub(crate) async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let job = async {
        let body = parse(&app, body)?;
        let (request, knobs): (CompletionRequest, Knobs) = (fields(&body)?, fields(&body)?);
        refuse_unsupported(&knobs)?;
        let prompts = crate::schema::prompts(&request.prompt).map_err(|e| ApiError::invalid(Some("prompt"), e))?;
        let logprobs = match request.logprobs {
            None => None,
            Some(k @ 0..=5) => Some(k as usize),
            Some(k) => return Err(ApiError::invalid(Some("logprobs"), format!("logprobs must be in 0..=5, got {k}"))),
        };
        // The echo is the prompt before the FIM tokens go around it: there is nothing to score it by.
        if request.echo && logprobs.is_some() && request.suffix.is_some() {
            let message = "echo with logprobs scores the prompt, which a suffix turns into a fill-in-the-middle prompt";
            return Err(ApiError::invalid(Some("echo"), message));
        }
        let vocab = app.tokenizer.vocab_size() as i64;
        let mut ids = Vec::with_capacity(prompts.len());
        let mut echo = Vec::new();
        for prompt in prompts {
            let empty = prompt == Prompt::Text(String::new());
            let tokens = match prompt {
                // An empty prompt starts from the end-of-text token, as OpenAI's do.
                _ if empty => vec![i64::from(app.tokenizer.eos_id())],
                Prompt::Text(text) => generation::encode(&app.tokenizer, vec![text]).await?.remove(0),
                Prompt::Tokens(tokens) => tokens,
            };
            if let Some(bad) = tokens.iter().find(|&&t| !(0..vocab).contains(&t)) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            if request.echo && empty {
                echo.push(String::new());
            } else if request.echo {
                let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
                echo.push(app.tokenizer.decode(&ids, false).map_err(|e| ApiError::internal(e.to_string()))?);
            }
            ids.push(tokens);
        }
        let mut stop_tokens = app.eos.clone();
        if let Some(suffix) = &request.suffix {
            let [prefix_id, suffix_id, middle_id] =
                app.fim.ok_or_else(|| ApiError::invalid(Some("suffix"), "this model's tokenizer has no FIM tokens"))?;
            let suffix_ids = generation::encode(&app.tokenizer, vec![suffix.clone()]).await?.remove(0);
            for prompt in &mut ids {
                let mut fim = vec![prefix_id];
                fim.append(prompt);
                fim.push(suffix_id);
                fim.extend(&suffix_ids);
                fim.push(middle_id);
                *prompt = fim;
            }
            stop_tokens = app.fim_stops.clone();
        }
        let mut plan =
            plan(&app, &knobs, knobs.max_tokens, app.config.limits.default_max_tokens, ids, stop_tokens, logprobs)?;
        plan.prompt_logprobs = logprobs.filter(|_| request.echo);
        Ok(Job {
            shape: Shape::Completion,
            plan,
            stream: knobs.stream,
            include_usage: include_usage(&knobs),
            echo,
            started,
        })
    };
    answer(app.clone(), Shape::Completion, job.await).await
}

pub(crate) async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let job = async {
        let body = parse(&app, body)?;
        let (mut request, knobs): (ChatRequest, Knobs) = (fields(&body)?, fields(&body)?);
        refuse_unsupported(&knobs)?;
        for (index, message) in request.messages.iter_mut().enumerate() {
            match message.role.as_str() {
                "system" | "user" | "assistant" => {}
                "developer" => message.role = "system".into(),
                "tool" | "function" => {
                    let message = format!(
                        "messages[{index}]: this server does not call tools, so it takes no `{}` messages",
                        message.role
                    );
                    return Err(ApiError::invalid(Some("messages"), message));
                }
                other => {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!("messages[{index}]: unknown role `{other}`"),
                    ))
                }
            }
        }
        if !request.messages.iter().any(|m| m.role != "assistant" && !m.content.trim().is_empty()) {
            return Err(ApiError::invalid(Some("messages"), "the conversation has no user or system text"));
        }
        let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
            (_, Some(k)) if !(0..=20).contains(&k) => {
                return Err(ApiError::invalid(Some("top_logprobs"), format!("top_logprobs must be in 0..=20, got {k}")))
            }
            (false, Some(_)) => {
                return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true"))
            }
            (true, top) => Some(top.unwrap_or(0) as usize),
            (false, None) => None,
        };
        let ids = generation::encode(&app.tokenizer, vec![chat_prompt(&app, &request)?]).await?;
        let max_tokens = request.max_completion_tokens.or(knobs.max_tokens);
        // Unbounded by default, as OpenAI's chat is: the reply may take what the context leaves.
        let plan = plan(&app, &knobs, max_tokens, app.config.limits.max_tokens, ids, app.eos.clone(), logprobs)?;
        Ok(Job {
            shape: Shape::Chat,
            plan,
            stream: knobs.stream,
            include_usage: include_usage(&knobs),
            echo: Vec::new(),
            started,
        })
    };
    answer(app.clone(), Shape::Chat, job.await).await
}

pub(crate) async fn infill(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let job = async {
        let request: InfillRequest = fields(&parse(&app, body)?)?;
        if app.fim.is_none() {
            return Err(ApiError::invalid(None, "this model's tokenizer has no FIM tokens"));
        }
        let knobs = Knobs {
            temperature: Some(request.temperature.unwrap_or(0.0)),
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
            stop: request.stop.clone().map(crate::schema::OneOrMany::Many),
            stream: request.stream,
            ..Knobs::default()
        };
        let asked = request.n_predict.filter(|&n| n >= 0);
        let room =
            app.engine.context().saturating_sub(asked.unwrap_or(app.config.limits.default_max_tokens as i64) as usize);
        let parts = lsp::prompt::PromptParts {
            prefix: format!("{}{}", request.input_prefix, request.prompt),
            suffix: request.input_suffix.clone(),
            filename: None,
            snippets: request.input_extra.iter().map(|f| (f.filename.clone(), f.text.clone())).collect(),
        };
        let budget = lsp::prompt::Budget { tokens: room.saturating_sub(1), suffix_share: 0.25, fim: true };
        let tokenizer = app.tokenizer.clone();
        let ids = tokio::task::spawn_blocking(move || lsp::prompt::build(&tokenizer, &parts, budget))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::invalid(Some("input_prefix"), e.to_string()))?;
        let default = app.config.limits.default_max_tokens;
        let plan = plan(&app, &knobs, asked, default, vec![ids], app.fim_stops.clone(), None)?;
        Ok(Job { shape: Shape::Infill, plan, stream: request.stream, include_usage: false, echo: Vec::new(), started })
    };
    answer(app.clone(), Shape::Infill, job.await).await
}

/// The tokenizer's chat template when the model has one; else WizardCoder's Alpaca template around
/// the conversation's user turns (system text first).
fn chat_prompt(app: &App, request: &ChatRequest) -> Result<String, ApiError> {
    if let Some(template) = &app.config.chat_template {
        let messages: Vec<Value> =
            request.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let eos = app.tokenizer.decode(&[app.tokenizer.eos_id()], false).unwrap_or_default();
        let mut environment = minijinja::Environment::new();
        environment.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        let context = json!({"messages": messages, "add_generation_prompt": true, "bos_token": "", "eos_token": eos});
        return environment
            .render_str(template, context)
            .map_err(|e| ApiError::invalid(Some("messages"), format!("the model's chat template: {e}")));
    }
    Ok(wizardcoder_conversation(&request.messages))
}

/// WizardCoder's Alpaca prompt over a conversation: user and system text (in its place) make an
/// instruction, each assistant turn follows the `### Response:` of the instruction before it, the
/// next instruction opens a new `### Instruction:` (one user turn is exactly the prompt WizardCoder
/// was tuned on). An assistant turn before any instruction has nothing to answer and is left out.
fn wizardcoder_conversation(messages: &[crate::schema::Message]) -> String {
    let mut prompt = String::new();
    let mut instruction: Vec<&str> = Vec::new();
    let close_instruction = |prompt: &mut String, instruction: &mut Vec<&str>| {
        let text = instruction.join("\n\n");
        if prompt.is_empty() {
            *prompt = model::train::data::alpaca_prompt(&text, None);
        } else {
            prompt.push_str(&format!("\n\n### Instruction:\n{text}\n\n### Response:"));
        }
        instruction.clear();
    };
    for message in messages {
        if message.content.trim().is_empty() {
            continue;
        }
        if message.role != "assistant" {
            instruction.push(&message.content);
            continue;
        }
        if !instruction.is_empty() {
            close_instruction(&mut prompt, &mut instruction);
        }
        if !prompt.is_empty() {
            prompt.push_str(&format!("\n{}", message.content));
        }
    }
    if !instruction.is_empty() || prompt.is_empty() {
        close_instruction(&mut prompt, &mut instruction);
    }
    prompt
}

/// Refuses what the request sets of the fields [`Knobs`] holds but this server does not implement
/// to other than its neutral value.
fn refuse_unsupported(knobs: &Knobs) -> Result<(), ApiError> {
    let refuse = |field: &str, what: &str| {
        Err(ApiError::invalid(Some(field), format!("{field}: {what} is not supported by this server")))
    };
    for (field, value) in [("presence_penalty", knobs.presence_penalty), ("frequency_penalty", knobs.frequency_penalty)]
    {
        if value.is_some_and(|v| v != 0.0) {
            return refuse(field, "a penalty other than 0");
        }
    }
    if knobs.logit_bias.as_ref().is_some_and(|bias| !bias.is_empty()) {
        return refuse("logit_bias", "biasing tokens");
    }
    if let Some(best_of) = knobs.best_of {
        let n = knobs.n.unwrap_or(1);
        if best_of < n {
            return Err(ApiError::invalid(Some("best_of"), format!("best_of must be at least n ({n}), got {best_of}")));
        }
        if best_of > n {
            return refuse("best_of", "ranking more candidates than n");
        }
    }
    match knobs.tool_choice.as_ref() {
        None | Some(Value::Null) => {}
        Some(Value::String(choice)) if choice == "none" || choice == "auto" => {}
        Some(_) => return refuse("tool_choice", "calling tools"),
    }
    // `{"type": ...}`, or the type alone as some clients write it.
    let format = knobs.response_format.as_ref().map(|format| if format.is_string() { format } else { &format["type"] });
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "text" => {}
        Some(_) => return refuse("response_format", "a response format other than text"),
    }
    Ok(())
}

fn include_usage(knobs: &Knobs) -> bool {
    knobs.stream_options.as_ref().is_some_and(|o| o.include_usage)
}

fn plan(
    app: &App,
    knobs: &Knobs,
    max_tokens: Option<i64>,
    default_max_tokens: usize,
    prompts: Vec<Vec<i64>>,
    stop_tokens: Vec<i64>,
    logprobs: Option<usize>,
) -> Result<Plan, ApiError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limits = generation::Limits { default_max_tokens, ..app.config.limits.clone() };
    let max_new_tokens = generation::max_new_tokens(max_tokens, &limits, app.engine.context(), longest)?;
    let n = generation::samples(knobs, app.engine.config().max_batch)?;
    Ok(Plan {
        prompts,
        max_new_tokens,
        n,
        sampling: generation::sampling(knobs)?,
        stops: generation::stops(knobs)?,
        stop_tokens,
        logprobs,
        prompt_logprobs: None,
    })
}

/// Starts the job on the engine and answers, counting the request in the metrics.
async fn answer(app: Arc<App>, shape: Shape, job: Result<Job, ApiError>) -> Response {
    let endpoint = shape.endpoint();
    let started = job.as_ref().ok().map(|j| j.started);
    let response = match job
        .and_then(|job| generation::start(&app.engine, &app.tokenizer, &job.plan).map(|events| (job, events)))
    {
        Err(error) => error.into_response(),
        Ok((job, events)) if job.stream => stream_answer(app.clone(), job, events).into_response(),
        Ok((job, events)) => whole_answer(app.clone(), job, events).await,
    };
    app.metrics.request(endpoint, response.status().as_u16());
    if let Some(started) = started {
        if !response.headers().contains_key(axum::http::header::CONTENT_TYPE)
            || response.headers()[axum::http::header::CONTENT_TYPE] != "text/event-stream"
        {
            app.metrics.latency.observe(started.elapsed());
        }
    }
    response
}

/// Every choice's text, its end, and the token count, once all samples are done.
struct Outcome {
    samples: Vec<SampleText>,
    /// Each prompt's log-probabilities, when asked for.
    prompt_logprobs: Vec<Vec<TokenLogprob>>,
    completion_tokens: usize,
}

async fn whole_answer(app: Arc<App>, job: Job, mut events: Merged) -> Response {
    let choices = job.plan.prompts.len() * job.plan.n;
    let mut outcome = Outcome {
        samples: (0..choices).map(|_| SampleText::default()).collect(),
        prompt_logprobs: vec![Vec::new(); job.plan.prompts.len()],
        completion_tokens: 0,
    };
    let mut open = choices;
    let mut first = true;
    while open > 0 {
        match events.recv().await {
            Some(Event::Token { sample, token, logprob }) => {
                if std::mem::take(&mut first) {
                    app.metrics.first_token.observe(job.started.elapsed());
                }
                outcome.completion_tokens += 1;
                outcome.samples[sample].push(token, logprob, &app.tokenizer, &job.plan.stops);
            }
            Some(Event::Finished { sample, finish }) => {
                let text = &mut outcome.samples[sample];
                text.end(finish, &app.tokenizer, &job.plan.stops);
                open -= 1;
            }
            Some(Event::PromptLogprobs { sample, logprobs }) => outcome.prompt_logprobs[sample / job.plan.n] = logprobs,
            Some(Event::StopToken { sample, token, logprob }) => outcome.samples[sample].stop_token(token, logprob),
            Some(Event::Started { .. } | Event::Speculated(_)) => {}
            Some(Event::Failed(message)) => return ApiError::internal(message).into_response(),
            None => return ApiError::unavailable("the inference engine stopped").into_response(),
        }
    }
    // Decoding every token and its alternatives is the tokenizer's work: off the async threads.
    match tokio::task::spawn_blocking(move || whole_body(&app, &job, outcome)).await {
        Ok(Ok(body)) => Json(logprobs::Body(&body)).into_response(),
        Ok(Err(error)) => error.into_response(),
        Err(error) => ApiError::internal(error.to_string()).into_response(),
    }
}

/// The logprobs of `choice` for tokens `range` of its sample, in the endpoint's shape; a
/// completion's start with `scored_prompt`, the echoed prompt's.
fn choice_logprobs(
    app: &App,
    job: &Job,
    choice: usize,
    sample: &SampleText,
    range: std::ops::Range<usize>,
    scored_prompt: Option<LegacyLogprobs>,
) -> Value {
    if job.shape == Shape::Chat {
        return json!({"content": logprobs::chat_content(&app.tokenizer, sample, range), "refusal": null});
    }
    let base = job.echo.get(choice / job.plan.n).map_or(0, |echo| echo.chars().count());
    let mut logprobs = scored_prompt.unwrap_or_default();
    logprobs.sample(&app.tokenizer, sample, range, base);
    logprobs.into_json()
}

/// The echoed prompt's logprobs, when asked for.
fn scored_prompt(app: &App, job: &Job, prompt: usize, scored: &[TokenLogprob]) -> Result<LegacyLogprobs, ApiError> {
    LegacyLogprobs::prompt(&app.tokenizer, &job.plan.prompts[prompt], scored)
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn usage(job: &Job, completion_tokens: usize) -> Value {
    let prompt_tokens = job.plan.prompt_tokens();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

fn whole_body(app: &App, job: &Job, mut outcome: Outcome) -> Result<Value, ApiError> {
    let model = &app.config.model_name;
    let scored_prompts = match job.plan.prompt_logprobs {
        Some(_) => (0..job.plan.prompts.len())
            .map(|prompt| scored_prompt(app, job, prompt, &outcome.prompt_logprobs[prompt]).map(Some))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![None; job.plan.prompts.len()],
    };
    let mut choices = Vec::with_capacity(outcome.samples.len());
    for (index, sample) in outcome.samples.iter_mut().enumerate() {
        let logprobs = job.plan.logprobs.map(|_| {
            let range = sample.release();
            choice_logprobs(app, job, index, sample, range, scored_prompts[index / job.plan.n].clone())
        });
        choices.push(match job.shape {
            Shape::Chat => json!({"index": index, "message": {"role": "assistant", "content": sample.text()},
                                  "logprobs": logprobs, "finish_reason": sample.finish_reason()}),
            _ => {
                let echo = job.echo.get(index / job.plan.n).map_or("", String::as_str);
                json!({"index": index, "text": format!("{echo}{}", sample.text()), "logprobs": logprobs,
                       "finish_reason": sample.finish_reason()})
            }
        });
    }
    Ok(match job.shape {
        Shape::Completion => json!({"id": request_id("cmpl"), "object": "text_completion", "created": now(),
                                    "model": model, "choices": choices, "usage": usage(job, outcome.completion_tokens)}),
        Shape::Chat => json!({"id": request_id("chatcmpl"), "object": "chat.completion", "created": now(),
                              "model": model, "choices": choices, "usage": usage(job, outcome.completion_tokens)}),
        Shape::Infill => {
            let sample = &outcome.samples[0];
            infill_body(app, job, sample.text().to_string(), sample, outcome.completion_tokens, true)
        }
    })
}

fn infill_body(app: &App, job: &Job, content: String, sample: &SampleText, predicted: usize, stop: bool) -> Value {
    let stop_type = match (sample.stopped, sample.finish) {
        (true, _) => "word",
        (false, Some(model::generate::Finish::Length)) => "limit",
        _ => "eos",
    };
    let mut body = json!({"content": content, "stop": stop, "model": app.config.model_name});
    if stop {
        body["stop_type"] = json!(stop_type);
        body["tokens_predicted"] = json!(predicted);
        body["tokens_evaluated"] = json!(job.plan.prompt_tokens());
        body["timings"] = json!({"total_ms": job.started.elapsed().as_secs_f64() * 1e3});
    }
    body
}

/// Server-sent events: a chunk per new piece of text, a chunk with each choice's finish reason,
/// the usage when asked, then `[DONE]`. The stream ends, and the engine drops the request within a
/// step, when the client goes away.
fn stream_answer(app: Arc<App>, job: Job, events: Merged) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let choices = job.plan.prompts.len() * job.plan.n;
    let id = request_id(if job.shape == Shape::Chat { "chatcmpl" } else { "cmpl" });
    let state = StreamState {
        app,
        job,
        events,
        id,
        created: now(),
        samples: (0..choices).map(|_| SampleText::default()).collect(),
        open: choices,
        completion_tokens: 0,
        pending: std::collections::VecDeque::new(),
        finished: false,
        first: true,
        echoed: false,
    };
    Sse::new(stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            if state.finished {
                return None;
            }
            state.next().await;
        }
    }))
}

struct StreamState {
    app: Arc<App>,
    job: Job,
    events: Merged,
    id: String,
    /// Every chunk's `created`: the stream's start.
    created: u64,
    samples: Vec<SampleText>,
    open: usize,
    completion_tokens: usize,
    pending: std::collections::VecDeque<SseEvent>,
    finished: bool,
    first: bool,
    /// Whether the prompts of `echo` were sent.
    echoed: bool,
}

impl StreamState {
    fn chunk(&self, choice: usize, text: &str, finish: Option<&str>) -> Value {
        let model = &self.app.config.model_name;
        match self.job.shape {
            Shape::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": model,
                "choices": [{"index": choice, "text": text, "logprobs": null, "finish_reason": finish}]})
            }
            Shape::Chat => {
                let delta = if finish.is_some() { json!({}) } else { json!({"content": text}) };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                       "choices": [{"index": choice, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
            Shape::Infill => json!({"content": text, "stop": false}),
        }
    }

    fn push(&mut self, value: Value) {
        let text = serde_json::to_string(&logprobs::Body(&value)).expect("a JSON value serializes");
        self.pending.push_back(SseEvent::default().data(text));
    }

    /// Queues `text` of `choice` with the log-probabilities of the tokens it completes, when asked
    /// for; nothing when there is neither.
    fn push_text(&mut self, choice: usize, text: &str) {
        let range = match self.job.plan.logprobs {
            Some(_) => self.samples[choice].release(),
            None => 0..0,
        };
        if text.is_empty() && range.is_empty() {
            return;
        }
        let mut chunk = self.chunk(choice, text, None);
        if !range.is_empty() {
            chunk["choices"][0]["logprobs"] =
                choice_logprobs(&self.app, &self.job, choice, &self.samples[choice], range, None);
        }
        self.push(chunk);
    }

    /// Waits for the engine's next event and queues what it means for the client.
    async fn next(&mut self) {
        let stops = self.job.plan.stops.clone();
        match self.events.recv().await {
            Some(Event::Speculated(_)) => {}
            Some(Event::Started { .. }) => match self.job.shape {
                Shape::Chat => {
                    for choice in 0..self.samples.len() {
                        let mut chunk = self.chunk(choice, "", None);
                        chunk["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                        self.push(chunk);
                    }
                }
                // `echo`: every choice's prompt, before any token (each prompt's request starts on
                // its own; the first start comes before all of their tokens). With the prompt's
                // logprobs, each prompt's echo goes with them instead.
                Shape::Completion
                    if self.job.plan.prompt_logprobs.is_none() && !std::mem::replace(&mut self.echoed, true) =>
                {
                    for choice in 0..self.samples.len() {
                        if let Some(echo) = self.job.echo.get(choice / self.job.plan.n).filter(|e| !e.is_empty()) {
                            let chunk = self.chunk(choice, echo, None);
                            self.push(chunk);
                        }
                    }
                }
                _ => {}
            },
            Some(Event::Token { sample, token, logprob }) => {
                if std::mem::take(&mut self.first) {
                    self.app.metrics.first_token.observe(self.job.started.elapsed());
                }
                self.completion_tokens += 1;
                let text = self.samples[sample].push(token, logprob, &self.app.tokenizer, &stops);
                if !text.is_empty() {
                    self.push_text(sample, &text);
                }
            }
            Some(Event::PromptLogprobs { sample: first, logprobs }) => {
                let prompt = first / self.job.plan.n;
                let (tokenizer, ids) = (self.app.tokenizer.clone(), self.job.plan.prompts[prompt].clone());
                let scored = tokio::task::spawn_blocking(move || LegacyLogprobs::prompt(&tokenizer, &ids, &logprobs))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|scored| scored.map_err(|e| e.to_string()));
                let scored = match scored {
                    Ok(scored) => scored.into_json(),
                    Err(message) => {
                        self.push(ApiError::internal(message).body());
                        return self.close();
                    }
                };
                for choice in first..first + self.job.plan.n {
                    let mut chunk = self.chunk(choice, self.job.echo.get(prompt).map_or("", String::as_str), None);
                    chunk["choices"][0]["logprobs"] = scored.clone();
                    self.push(chunk);
                }
            }
            Some(Event::StopToken { sample, token, logprob }) => self.samples[sample].stop_token(token, logprob),
            Some(Event::Finished { sample, finish }) => {
                let text = self.samples[sample].end(finish, &self.app.tokenizer, &stops);
                self.push_text(sample, &text);
                let last = if self.job.shape == Shape::Infill {
                    let sample = &self.samples[sample];
                    infill_body(&self.app, &self.job, String::new(), sample, self.completion_tokens, true)
                } else {
                    self.chunk(sample, "", Some(self.samples[sample].finish_reason()))
                };
                self.push(last);
                self.open -= 1;
                if self.open == 0 {
                    self.close();
                }
            }
            Some(Event::Failed(message)) => {
                self.push(ApiError::internal(message).body());
                self.close();
            }
            None => {
                self.push(ApiError::unavailable("the inference engine stopped").body());
                self.close();
            }
        }
    }

    fn close(&mut self) {
        if self.job.include_usage {
            let mut last = self.chunk(0, "", None);
            last["choices"] = json!([]);
            last["usage"] = usage(&self.job, self.completion_tokens);
            self.push(last);
        }
        if self.job.shape != Shape::Infill {
            self.pending.push_back(SseEvent::default().data("[DONE]"));
        }
        self.app.metrics.latency.observe(self.job.started.elapsed());
        self.finished = true;
    }
}

pub(crate) async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": app.config.model_name, "object": "model", "created": 0, "owned_by": "wizard"}]}),
    )
}

/// `GET /v1/models/{id}`: the served model, or 404 for any other name.
pub(crate) async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id != app.config.model_name {
        return ApiError::model_not_found(&id).into_response();
    }
    Json(json!({"id": id, "object": "model", "created": 0, "owned_by": "wizard"})).into_response()
}

pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(app.engine.counters(), app.engine.in_flight());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::wizardcoder_conversation;
    use crate::schema::Message;
    use model::train::data::alpaca_prompt;

    fn check(turns: &[(&str, &str)], expected: &str) {
        let messages: Vec<Message> = turns
            .iter()
            .map(|(role, content)| Message { role: role.to_string(), content: content.to_string() })
            .collect();
        assert_eq!(wizardcoder_conversation(&messages), expected, "{turns:?}");
    }

    /// One user turn is the prompt WizardCoder was tuned on; system text opens it; later turns
    /// follow the replies.
    #[test]
    fn conversations_in_wizardcoders_prompt() {
        check(&[("user", "Sort a list.")], &alpaca_prompt("Sort a list.", None));
        check(&[("system", "Be brief."), ("user", "Sort a list.")], &alpaca_prompt("Be brief.\n\nSort a list.", None));
        let reply = "def f(x): return sorted(x)";
        let later =
            format!("{}\n{reply}\n\n### Instruction:\nIn place.\n\n### Response:", alpaca_prompt("Sort.", None));
        check(&[("user", "Sort."), ("assistant", reply), ("user", "In place.")], &later);
        // A last assistant turn is continued; turns in a row join; a greeting before any
        // instruction and empty text are left out; system text stays in its place.
        check(&[("user", "Sort."), ("assistant", "def")], &format!("{}\ndef", alpaca_prompt("Sort.", None)));
        let sorted = format!("{}\ndef\nf(x)", alpaca_prompt("Sort.", None));
        check(
            &[
                ("assistant", "Hi!"),
                ("user", ""),
                ("user", "Sort."),
                ("assistant", "def"),
                ("assistant", "f(x)"),
                ("assistant", " "),
            ],
            &sorted,
        );
        let later_system =
            format!("{}\nA\n\n### Instruction:\nBe brief.\n\nB\n\n### Response:", alpaca_prompt("Sort.", None));
        check(&[("user", "Sort."), ("assistant", "A"), ("system", "Be brief."), ("user", "B")], &later_system);
    }
}
