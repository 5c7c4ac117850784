//! A Chat Completions server on loopback for tests and benchmarks. Its answers depend only on the
//! request text, so runs are reproducible; it can add a fixed latency, require an API key, and inject
//! faults on the first attempt of some requests: 429 with `Retry-After`, 500, a reply slower than the
//! client's timeout, truncated JSON and an empty `choices` list. It speaks just enough HTTP/1.1
//! (keep-alive, `Content-Length` bodies) for `reqwest`.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the server behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeConfig {
    /// Delay before every reply.
    pub latency: Duration,
    /// Inject faults on the first attempt of about a third of the distinct requests.
    pub faults: bool,
    /// How long a "slow" fault waits before replying (make it longer than the client timeout).
    pub slow: Duration,
    /// When set, requests without `Authorization: Bearer KEY` get 401.
    pub api_key: Option<String>,
}

/// What the server saw.
#[derive(Debug, Clone, Default)]
pub struct FakeStats {
    /// Requests received.
    pub requests: u64,
    /// Requests answered in full.
    pub answered: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Full answers per distinct request (hash of text and seed): more than one means a request was repeated.
    pub answers_per_request: HashMap<u64, u32>,
    /// Most chat requests being handled at once.
    pub max_in_flight: u64,
}

#[derive(Default)]
struct State {
    stats: FakeStats,
    attempts: HashMap<u64, u32>,
    in_flight: u64,
}

/// A running server; it stops when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

fn hash(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let to = from + text[from..].find(end)?;
    Some(&text[from..to])
}

const ADDITIONS: &[&str] = &[
    "The solution must also reject invalid input with a descriptive error message.",
    "Handle inputs with up to one million elements within one second.",
    "Do not use any library functions beyond the language's core built-ins.",
    "Return the result together with the number of steps the computation took.",
    "Write unit tests that cover the empty case and a case with duplicates.",
    "Explain the time complexity of your approach in a short comment.",
    "The function must be safe to call from several threads at once.",
    "Process the input as a stream instead of loading it all into memory.",
    "Make every intermediate value immutable and avoid global state.",
    "Support Unicode text correctly, including combining characters.",
    "Keep memory use constant apart from the output itself.",
    "Log each decision the algorithm makes at debug level.",
];

/// The deterministic answer to a user message built from wizard's default templates: a rewrite
/// for an evolve request, a verdict for a judge request, code for anything else. A few answers are
/// made to fail the elimination rules on purpose.
pub fn answer(text: &str) -> String {
    let h = hash(text);
    if let Some(rest) = text.split_once("First exercise:\n").map(|(_, rest)| rest) {
        let first = rest.split("\n\nSecond exercise:\n").next().unwrap_or_default();
        let second = between(rest, "\n\nSecond exercise:\n", "\n\nDo they ask").unwrap_or_default();
        let same = first.split_whitespace().eq(second.split_whitespace());
        return if same { "Equal".into() } else { "Not Equal".into() };
    }
    if let Some(question) = between(text, "### Original exercise\n", "\n\n### Harder exercise") {
        let q = hash(question);
        return match q % 23 {
            0 => question.to_string(),
            1 => format!("### Harder exercise\n{question}"),
            _ => format!("{question} {}", ADDITIONS[(q / 23) as usize % ADDITIONS.len()]),
        };
    }
    match h % 19 {
        0 => "Sorry, I cannot help with that.".into(),
        1 => "... ?! ...".into(),
        _ => {
            let words: Vec<&str> = text.split_whitespace().take(8).collect();
            format!(
                "Here is a solution.\n\n```python\ndef solve(data):\n    # {}\n    return sorted(data)[:{}]\n```\n",
                words.join(" "),
                h % 1000
            )
        }
    }
}

/// The fault injected on the first attempt of a request with this text, when faults are on.
pub fn fault_for(text: &str) -> Option<&'static str> {
    match hash(text) % 16 {
        0 => Some("429"),
        1 => Some("500"),
        2 => Some("slow"),
        3 => Some("truncated"),
        4 => Some("empty-choices"),
        _ => None,
    }
}

impl FakeServer {
    /// Listens on `127.0.0.1` on a free port.
    pub async fn start(config: FakeConfig) -> std::io::Result<FakeServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let config = Arc::new(config);
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (state, config) = (shared.clone(), config.clone());
                connections.spawn(async move {
                    let _ = serve(stream, &state, &config).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(FakeServer { addr, state, accept })
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// What the server saw so far.
    pub fn stats(&self) -> FakeStats {
        self.state.lock().expect("fake server state").stats.clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    let head =
        format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}

async fn serve(stream: TcpStream, state: &Mutex<State>, config: &FakeConfig) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
        let (mut length, mut authorization) = (0usize, String::new());
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let stream = reader.get_mut();
        if path != "/v1/chat/completions" {
            respond(stream, "404 Not Found", "", r#"{"error": {"message": "no such route"}}"#).await?;
            continue;
        }
        if let Some(key) = &config.api_key {
            if authorization != format!("Bearer {key}") {
                state.lock().expect("state").stats.requests += 1;
                let body = r#"{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}"#;
                respond(stream, "401 Unauthorized", "", body).await?;
                continue;
            }
        }
        let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = request["messages"]
            .as_array()
            .and_then(|messages| messages.last())
            .and_then(|message| message["content"].as_str())
            .unwrap_or_default()
            .to_string();
        // Distinct requests are told apart by their text and their sampling seed.
        let key = hash(&format!("{}\n{text}", request["seed"]));
        let fault = {
            let mut state = state.lock().expect("state");
            state.stats.requests += 1;
            state.in_flight += 1;
            state.stats.max_in_flight = state.stats.max_in_flight.max(state.in_flight);
            let attempt = state.attempts.entry(key).or_default();
            *attempt += 1;
            let fault = if config.faults && *attempt == 1 { fault_for(&text) } else { None };
            if let Some(kind) = fault {
                *state.stats.faults.entry(kind).or_default() += 1;
            }
            fault
        };
        tokio::time::sleep(config.latency).await;
        state.lock().expect("state").in_flight -= 1;
        let content = answer(&text);
        let reply = serde_json::json!({
            "id": format!("fake-{key:x}"),
            "object": "chat.completion",
            "model": request["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": text.split_whitespace().count(), "completion_tokens": content.split_whitespace().count()},
        })
        .to_string();
        match fault {
            Some("429") => {
                let body = r#"{"error": {"message": "Rate limit reached"}}"#;
                respond(stream, "429 Too Many Requests", "Retry-After: 1\r\n", body).await?
            }
            Some("500") => respond(stream, "500 Internal Server Error", "", r#"{"error": "boom"}"#).await?,
            Some("slow") => {
                tokio::time::sleep(config.slow).await;
                respond(stream, "200 OK", "", &reply).await?
            }
            Some("truncated") => respond(stream, "200 OK", "", &reply[..reply.len() / 2]).await?,
            Some("empty-choices") => {
                respond(stream, "200 OK", "", r#"{"id": "x", "object": "chat.completion", "choices": []}"#).await?
            }
            _ => {
                respond(stream, "200 OK", "", &reply).await?;
                let mut state = state.lock().expect("state");
                state.stats.answered += 1;
                *state.stats.answers_per_request.entry(key).or_default() += 1;
            }
        }
    }
}
