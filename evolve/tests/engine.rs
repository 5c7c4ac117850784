//! The engine against a real Chat Completions server on loopback (`evolve::fake`) and a real
//! SQLite file: faults, retries, limits, resumption and clean-up.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evolve::backend::{Backend, BackendError, ChatFuture, ChatRequest, Message, Reply};
use evolve::engine::{run, Backends, EngineConfig, Quiet};
use evolve::fake::{fault_for, FakeConfig, FakeServer};
use evolve::http::{HttpBackend, HttpConfig};
use evolve::seeds::{self, Seed};
use evolve::store::{Item, RoundStats, Status, Store};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn http(server: &FakeServer, tweak: impl FnOnce(&mut HttpConfig)) -> HttpBackend {
    let mut config = HttpConfig::new(server.base_url(), "fake-model");
    // Long enough that only injected faults time out on a loaded machine (a retried answer would
    // count as a repeat).
    config.timeout = Duration::from_secs(2);
    config.backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_secs(2);
    tweak(&mut config);
    HttpBackend::new(config).unwrap()
}

/// Longer than the client's timeout.
const SLOW_FAULT: Duration = Duration::from_millis(2500);

fn backends(backend: impl Backend + 'static) -> Backends {
    let backend: Arc<dyn Backend> = Arc::new(backend);
    Backends { evolver: backend.clone(), responder: backend }
}

/// Runs (or resumes) the engine on the store `db` to the end of `config.rounds`.
fn evolve(
    rt: &tokio::runtime::Runtime,
    db: &std::path::Path,
    seeds: &[Seed],
    config: EngineConfig,
    backends: Backends,
) -> evolve::Result<Vec<RoundStats>> {
    rt.block_on(run(Store::open(db).unwrap(), seeds, config, backends, Arc::new(Quiet)))
}

fn config(rounds: u32) -> EngineConfig {
    EngineConfig { rounds, seed: 7, concurrency: 16, ..EngineConfig::default() }
}

/// Every item's identity and outcome, for comparing runs.
fn outcome(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            format!(
                "{} {:?} {} {} {} {:?} {:?} {} {:?}",
                i.id, i.parent_id, i.round, i.method, i.status, i.reason, i.instruction, i.input, i.response
            )
        })
        .collect()
}

fn reasons(items: &[Item]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.reason.clone().unwrap_or_else(|| item.status.to_string())).or_default() += 1;
    }
    counts
}

#[test]
fn three_rounds_under_faults_account_for_every_item() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("evolve.db");
    let seeds = seeds::load(None).unwrap();
    let server =
        rt.block_on(FakeServer::start(FakeConfig { faults: true, slow: SLOW_FAULT, ..FakeConfig::default() })).unwrap();
    let stats = evolve(&rt, &db, &seeds, config(3), backends(http(&server, |_| {}))).unwrap();
    let store = Store::open(&db).unwrap();
    let items = store.items().unwrap();
    // Round sizes: all seeds, then one child per live lineage.
    assert_eq!(stats.len(), 4, "{stats:?}");
    assert_eq!(stats[0].items as usize, seeds.len(), "{:?}", stats[0]);
    for pair in stats.windows(2) {
        let live_roots: std::collections::HashSet<i64> = items
            .iter()
            .filter(|i| i.status == Status::Accepted && i.round < pair[1].round)
            .map(|i| i.root_id)
            .collect();
        assert_eq!(pair[1].items as usize, live_roots.len(), "round {}", pair[1].round);
    }
    for round in &stats {
        assert!(round.finished && round.pending == 0 && round.passed == 0, "{round:?}");
        assert_eq!(round.items, round.accepted + round.rejected + round.removed, "{round:?}");
    }
    for item in &items {
        assert!([Status::Accepted, Status::Rejected, Status::Removed].contains(&item.status), "{item:?}");
        assert_eq!(item.reason.is_some(), item.status != Status::Accepted, "{item:?}");
    }
    // Every fault kind happened, every answer was stored once, nothing was asked twice.
    let seen = server.stats();
    for kind in ["429", "500", "slow", "truncated", "empty-choices"] {
        assert!(seen.faults.get(kind).copied().unwrap_or(0) > 0, "{kind}: {:?}", seen.faults);
    }
    assert_eq!(seen.answered, store.answer_count().unwrap(), "answers sent vs stored");
    let repeated: Vec<_> = seen.answers_per_request.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "(request, times answered): {repeated:?}");
    let counts = reasons(&items);
    for reason in ["equal-to-parent", "copies-prompt", "sorry-short", "no-content", "accepted"] {
        assert!(counts.contains_key(reason), "{reason}: {counts:?}");
    }
    // A completed run resumed does nothing.
    let before = server.stats().requests;
    let again = evolve(&rt, &db, &[], config(3), backends(http(&server, |_| {}))).unwrap();
    assert_eq!(server.stats().requests, before, "a completed run resumed sent requests");
    assert_eq!(again, stats, "a completed run resumed changed its rounds");
    assert_eq!(outcome(&Store::open(&db).unwrap().items().unwrap()), outcome(&items));
}

/// A backend that dies (as a killed process would) after a number of answers, discarding the last
/// one, and that fails the test if it is asked for anything whose answer is already stored.
struct Dying {
    inner: HttpBackend,
    left: AtomicU32,
    db: std::path::PathBuf,
}

impl Backend for Dying {
    fn kind(&self) -> &'static str {
        "http"
    }
    fn model(&self) -> &str {
        "fake-model"
    }
    fn chat<'a>(&'a self, request: &'a ChatRequest) -> ChatFuture<'a> {
        Box::pin(async move {
            let prompt = &request.messages[0].content;
            let conn = rusqlite::Connection::open(&self.db).unwrap();
            let stored: i64 = conn
                .query_row(
                    "SELECT count(*) FROM answers WHERE prompt = ?1 AND seed = ?2",
                    rusqlite::params![prompt, request.seed as i64],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(stored, 0, "asked again for a stored answer: {prompt}");
            let reply = self.inner.chat(request).await;
            if self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1))).unwrap() <= 1 {
                return Err(BackendError::Local("killed".into()));
            }
            reply
        })
    }
}

#[test]
fn interrupted_runs_resume_to_the_same_items() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Seed> = seeds::load(None).unwrap().into_iter().take(20).collect();
    let server = rt.block_on(FakeServer::start(FakeConfig::default())).unwrap();
    let whole = dir.path().join("whole.db");
    evolve(&rt, &whole, &seeds, config(2), backends(http(&server, |_| {}))).unwrap();
    let expected = outcome(&Store::open(&whole).unwrap().items().unwrap());

    let broken = dir.path().join("broken.db");
    let mut stops = 0;
    loop {
        let dying = Dying { inner: http(&server, |_| {}), left: AtomicU32::new(9), db: broken.clone() };
        match evolve(&rt, &broken, &seeds, config(2), backends(dying)) {
            Ok(_) => break,
            Err(error) => assert!(error.to_string().contains("killed"), "{error}"),
        }
        stops += 1;
        assert!(stops < 100, "no progress");
    }
    assert!(stops > 5, "the run ended after {stops} stops");
    assert_eq!(outcome(&Store::open(&broken).unwrap().items().unwrap()), expected);
    let answers = |db: &std::path::Path| Store::open(db).unwrap().answer_count().unwrap();
    assert_eq!(answers(&broken), answers(&whole), "answers stored by the interrupted and the whole run");
}

/// Sends one request with `text` through an HTTP backend made by `tweak` against a server made
/// by `fake`, and returns the result, the time it took and the requests the server saw.
fn check(
    fake: FakeConfig,
    text: &str,
    tweak: impl FnOnce(&mut HttpConfig),
) -> (Result<Reply, BackendError>, Duration, u64) {
    let rt = runtime();
    let server = rt.block_on(FakeServer::start(fake)).unwrap();
    let backend = http(&server, tweak);
    let request = ChatRequest { messages: vec![Message::user(text)], temperature: 0.0, max_tokens: 64, seed: 1 };
    let started = Instant::now();
    let result = rt.block_on(backend.chat(&request));
    (result, started.elapsed(), server.stats().requests)
}

/// A request text whose first attempt gets `fault`.
fn text_with_fault(fault: Option<&str>) -> String {
    (0..).map(|i| format!("Write function number {i}.")).find(|t| fault_for(t) == fault).unwrap()
}

#[test]
fn http_faults_and_errors() {
    let faults = || FakeConfig { faults: true, slow: SLOW_FAULT, ..FakeConfig::default() };
    // Each fault costs one retry; 429 waits for its Retry-After of one second (a lower bound only:
    // how soon the other faults are retried depends on the machine).
    for fault in ["429", "500", "slow", "truncated", "empty-choices"] {
        let (result, took, requests) = check(faults(), &text_with_fault(Some(fault)), |_| {});
        let reply = result.unwrap_or_else(|e| panic!("{fault}: {e}"));
        assert_eq!((reply.attempts, requests), (2, 2), "{fault}: (attempts, requests the server saw)");
        assert!(reply.text.contains("def solve"), "{fault}: {reply:?}");
        if fault == "429" {
            assert!(took >= Duration::from_secs(1), "429 retried after {took:?}, before its Retry-After");
        }
    }
    // 401 stops at once.
    let keyed = FakeConfig { api_key: Some("right".into()), ..FakeConfig::default() };
    let (result, _, requests) = check(keyed.clone(), "hi", |c| c.api_key = Some("wrong".into()));
    let error = result.unwrap_err();
    assert!(matches!(error, BackendError::Unauthorized { status: 401, .. }), "{error:?}");
    assert_eq!(requests, 1, "a refused key is not retried: {error}");
    assert!(
        error
            .to_string()
            .contains("refused the API key (HTTP 401: {\"error\": {\"message\": \"Incorrect API key provided\""),
        "{error}"
    );
    let (result, _, requests) = check(keyed, "hi", |c| c.api_key = Some("right".into()));
    let reply = result.unwrap_or_else(|e| panic!("the right key: {e}"));
    assert_eq!((reply.attempts, requests), (1, 1), "{reply:?}");
    assert_eq!(reply.text, evolve::fake::answer("hi"), "{reply:?}");
    // A wrong base URL is a 404, not retried.
    let (result, _, requests) = check(FakeConfig::default(), "hi", |c| c.base_url.push_str("/v2"));
    assert!(matches!(result, Err(BackendError::NotFound { .. })), "{result:?}");
    assert_eq!(requests, 0, "no chat completion reached the fake server: {result:?}");
    // An unreachable backend: a clear error after the retries.
    let (result, _, requests) = check(FakeConfig::default(), "hi", |c| {
        c.base_url = "http://127.0.0.1:9/v1".into();
        c.max_attempts = 3;
    });
    assert_eq!(requests, 0, "the fake server was asked");
    let error = result.unwrap_err().to_string();
    assert!(error.starts_with("the backend at http://127.0.0.1:9/v1/chat/completions failed 3 attempts, the last with: error sending request"), "{error}");
    // Retries give up: a server always slower than the timeout.
    let slow = FakeConfig { latency: Duration::from_millis(500), ..FakeConfig::default() };
    let (result, _, requests) = check(slow, "hi", |c| {
        c.timeout = Duration::from_millis(100);
        c.max_attempts = 2;
    });
    let error = result.unwrap_err().to_string();
    assert!(error.ends_with("failed 2 attempts, the last with: timed out after 0.1 s"), "{error}");
    assert_eq!(requests, 2, "{error}");
}

#[test]
fn concurrency_and_rate_limits() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Seed> = seeds::load(None).unwrap().into_iter().take(24).collect();
    let server = rt
        .block_on(FakeServer::start(FakeConfig { latency: Duration::from_millis(50), ..FakeConfig::default() }))
        .unwrap();
    let limited = EngineConfig { concurrency: 5, ..config(0) };
    evolve(&rt, &dir.path().join("a.db"), &seeds, limited, backends(http(&server, |_| {}))).unwrap();
    let seen = server.stats();
    assert_eq!(seen.max_in_flight, 5, "{seen:?}");
    // 600 requests per minute: one every 100 ms, whatever the concurrency, so the 8 requests take at
    // least 700 ms (a lower bound the limiter guarantees; how much longer depends on the machine).
    let rpm = |c: &mut HttpConfig| c.requests_per_minute = Some(600);
    let before = server.stats().requests;
    let started = Instant::now();
    evolve(&rt, &dir.path().join("b.db"), &seeds[..8], config(0), backends(http(&server, rpm))).unwrap();
    let took = started.elapsed();
    assert_eq!(server.stats().requests - before, 8, "one request per seed");
    assert!(took >= Duration::from_millis(700), "8 requests in {took:?} at 600 per minute");
}

#[test]
fn clean_up_removes_duplicates_and_contamination() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench.jsonl");
    std::fs::write(
        &bench,
        r#"{"task_id": "Toy/0", "prompt": "def add(a, b):\n    \"\"\"Return the sum of the two integers a and b, or raise on overflow.\"\"\"\n", "canonical_solution": "    return a + b\n"}"#,
    )
    .unwrap();
    let text = "[{\"instruction\": \"Write a Go function that returns the largest element of a slice of ints.\"},\
                {\"instruction\": \"write a go function that returns the   largest element of a slice of ints.\"},\
                {\"instruction\": \"Please write a Go function that returns the largest element of a slice of ints.\"},\
                {\"instruction\": \"Implement: return the sum of the two integers a and b, or raise on overflow.\"},\
                {\"instruction\": \"Write a Go function that returns the largest element of a slice of ints.\", \"input\": \"[3, 1]\"},\
                {\"instruction\": \"Write a Go function that returns the smallest odd element of a map of ints.\"}]";
    let lines: Vec<String> =
        serde_json::from_str::<Vec<serde_json::Value>>(text).unwrap().iter().map(|v| v.to_string()).collect();
    let seeds = seeds::parse(&lines.join("\n"), "test").unwrap();
    let server = rt.block_on(FakeServer::start(FakeConfig::default())).unwrap();
    let cfg = EngineConfig { benchmarks: vec![evolve::clean::load_benchmark(&bench).unwrap()], ..config(0) };
    evolve(&rt, &dir.path().join("c.db"), &seeds, cfg, backends(http(&server, |_| {}))).unwrap();
    let items = Store::open(&dir.path().join("c.db")).unwrap().items().unwrap();
    let got: Vec<(&str, Option<&str>)> = items.iter().map(|i| (i.status.as_str(), i.detail.as_deref())).collect();
    assert_eq!(
        got,
        [
            ("accepted", None),
            ("removed", Some("same instruction as item 1")),
            ("removed", Some("near-duplicate of item 1 (jaccard 0.91)")),
            ("removed", Some("contains text of bench.jsonl Toy/0")),
            ("removed", Some("near-duplicate of item 1 (jaccard 0.77)")),
            ("accepted", None),
        ]
    );
}
