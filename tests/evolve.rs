//! `wizard evolve` as a user runs it: against a Chat Completions server on loopback that the test
//! starts (with injected faults), killed with SIGKILL and resumed, with wizard's own tiny model, and
//! with bad input.
mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{check_failure, count, Shape};
use evolve::fake::{FakeConfig, FakeServer};

struct Server {
    server: FakeServer,
    _runtime: tokio::runtime::Runtime,
}

fn server(config: FakeConfig) -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(FakeServer::start(config)).unwrap();
    Server { server, _runtime: runtime }
}

/// `wizard ARGS` without an API key from the test's environment.
fn wizard(args: &[&str]) -> Output {
    common::wizard_command(args).env_remove("OPENAI_API_KEY").output().unwrap()
}

fn run_args<'a>(server: &'a str, db: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["evolve", "--db", db, "--base-url", server, "--model", "fake", "--backoff-ms", "10"];
    args.extend_from_slice(extra);
    args
}

/// Runs `wizard` and returns stdout, asserting success.
fn check(args: &[&str]) -> String {
    common::stdout_of(&wizard(args), args)
}

/// (id, parent, round, method, status, reason, instruction, response) of every item.
fn items(db: &Path) -> Vec<Vec<String>> {
    common::query(
        db,
        "SELECT id, parent_id, round, method, status, reason, instruction, response FROM items ORDER BY id",
    )
}

#[test]
fn run_status_lineage_and_export() {
    let fake = server(FakeConfig { faults: true, slow: Duration::from_millis(1500), ..FakeConfig::default() });
    let url = fake.server.base_url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("run.db");
    let db_str = db.to_str().unwrap();
    // The default seeds and the installed HumanEval; faults retried.
    let table = check(&run_args(&url, db_str, &["--rounds", "2", "--concurrency", "8", "--timeout", "0.5"]));
    assert!(table.starts_with("round  items accepted rejected removed pending accept%"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with(['0', '1', '2'])).count(), 3, "{table}");
    assert!(table.contains("round 1 reasons:"), "{table}");
    assert_eq!(check(&["evolve", "status", "--db", db_str]), table);
    let status: serde_json::Value =
        serde_json::from_str(&check(&["evolve", "status", "--db", db_str, "--json"])).unwrap();
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for round in rounds {
        let sum = ["accepted", "rejected", "removed"].map(|k| round[k].as_u64().unwrap()).iter().sum::<u64>();
        assert_eq!(round["items"].as_u64().unwrap(), sum, "{round}");
        assert_eq!(round["pending"], 0);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM items WHERE status NOT IN ('accepted', 'rejected', 'removed')"), 0);

    // Lineage of an accepted round-2 item: its seed, its round-1 parent (or the seed again), itself.
    let id = count(&db, "SELECT min(id) FROM items WHERE round = 2 AND status = 'accepted'");
    let parent = count(&db, &format!("SELECT parent_id FROM items WHERE id = {id}"));
    let root = count(&db, &format!("SELECT root_id FROM items WHERE id = {id}"));
    let lineage = check(&["evolve", "lineage", "--db", db_str, &id.to_string()]);
    let heads: Vec<&str> = lineage.lines().filter(|l| l.starts_with('#')).collect();
    let expected_ids: Vec<String> =
        if parent == root { vec![root, id] } else { vec![root, parent, id] }.iter().map(|i| format!("#{i} ")).collect();
    assert_eq!(heads.len(), expected_ids.len(), "{lineage}");
    for (head, id) in heads.iter().zip(&expected_ids) {
        assert!(head.starts_with(id.as_str()), "{lineage}");
    }
    assert!(heads[0].contains(" round 0 seed accepted"), "{lineage}");

    // Export: round 0 always, plus the chosen rounds.
    let out = dir.path().join("train.jsonl");
    let exported = |rounds: &[&str]| {
        let mut args = vec!["evolve", "export", "--db", db_str, "--out", out.to_str().unwrap()];
        args.extend_from_slice(rounds);
        check(&args);
        let text = std::fs::read_to_string(&out).unwrap();
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(line.starts_with("{\"instruction\": "), "{line}");
            let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["input", "instruction", "output"]);
            assert!(!value["output"].as_str().unwrap().is_empty(), "{line}");
        }
        text.lines().count() as i64
    };
    let accepted = |rounds: &str| {
        count(&db, &format!("SELECT count(*) FROM items WHERE status = 'accepted' AND round IN ({rounds})"))
    };
    assert_eq!(exported(&[]), accepted("0, 1, 2"));
    assert_eq!(exported(&["--rounds", "0..1"]), accepted("0, 1"));
    assert_eq!(exported(&["--rounds", "2"]), accepted("0, 2"));
}

#[test]
fn killed_runs_resume_to_the_same_items() {
    let fake = server(FakeConfig { latency: Duration::from_millis(40), ..FakeConfig::default() });
    let url = fake.server.base_url();
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seeds.jsonl");
    let shipped: Vec<&str> = evolve::seeds::DEFAULT_SEEDS.lines().take(30).collect();
    std::fs::write(&seeds, shipped.join("\n")).unwrap();
    let extra = ["--rounds", "3", "--concurrency", "4", "--seeds", seeds.to_str().unwrap(), "--no-decontaminate"];
    let whole = dir.path().join("whole.db");
    check(&run_args(&url, whole.to_str().unwrap(), &extra));
    let answered_whole = fake.server.stats().answered;
    let answers_whole = count(&whole, "SELECT count(*) FROM answers");

    let killed = dir.path().join("killed.db");
    let args = run_args(&url, killed.to_str().unwrap(), &extra);
    // Answers stored so far (read-only, so the test never creates the file itself).
    let stored = || {
        rusqlite::Connection::open_with_flags(&killed, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT count(*) FROM answers", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0)
    };
    let mut state: u64 = 0x2545_f491;
    let mut kills = 0;
    let finished = loop {
        assert!(kills < 40, "no end after {kills} kills");
        let before = stored();
        let log = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = common::wizard_command(&args).stdout(Stdio::null()).stderr(stderr).spawn().unwrap();
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        // Kill once this run has stored between a tenth and a fifth of an uninterrupted run's
        // answers, so that each killed run makes progress and stops at a random point.
        let step = (answers_whole as f64 * (0.1 + 0.1 * ((state >> 33) % 1000) as f64 / 1000.0)).max(1.0) as i64;
        let mut exited = None;
        common::wait_until(&format!("{step} more answers after {before}"), Duration::from_secs(60), || {
            exited = child.try_wait().unwrap();
            exited.is_some() || stored() >= before + step
        });
        if let Some(status) = exited.or_else(|| child.try_wait().unwrap()) {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(status.success(), "the last run (after {kills} kills) exited with {status}: {said}");
            break kills;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    };
    assert!(finished >= 3, "the run ended after {finished} kills; kill sooner");
    assert_eq!(items(&killed), items(&whole));
    assert_eq!(count(&killed, "SELECT count(*) FROM answers"), count(&whole, "SELECT count(*) FROM answers"));
    // Only requests in flight at a kill (at most --concurrency each time) were asked again.
    let answered_killed = fake.server.stats().answered - answered_whole;
    assert!(answered_killed <= answered_whole + 4 * kills as u64, "{answered_killed} vs {answered_whole}");
    // Resumed with the same settings, nothing is said; with another, what the items so far were made with.
    let said = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!said.contains("was last run with"), "{said}");
    let changed = run_args(&url, killed.to_str().unwrap(), &[&extra[..], &["--temperature", "0.3"]].concat());
    let output = wizard(&changed);
    let said = common::text(&output.stderr);
    assert!(output.status.success() && said.contains("was last run with temperature = 1.0, now 0.3"), "{said}");
    assert_eq!(items(&killed), items(&whole), "a finished run stays as it was");
}

#[test]
fn bad_input_is_a_clear_error() {
    let fake = server(FakeConfig { api_key: Some("sk-right".into()), ..FakeConfig::default() });
    let url = fake.server.base_url();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(path("bad.jsonl"), "{\"instruction\": \"a\"}\n\n{\"instruction\": 3}\n").unwrap();
    let newer = path("newer.db");
    rusqlite::Connection::open(&newer).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let db = path("x.db");
    let bad = path("bad.jsonl");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (run_args(&url, &db, &["--seeds", &bad]), "bad.jsonl:3: not a seed object: invalid type: integer `3`"),
        (run_args(&url, &db, &["--seeds", "/nonexistent/seeds.jsonl"]), "/nonexistent/seeds.jsonl: No such file"),
        (run_args(&url, &newer, &[]), "has schema version 99, newer than version 1 that this wizard knows"),
        (run_args(&url, &db, &["--no-decontaminate"]), "refused the API key (HTTP 401"),
        (
            run_args("http://127.0.0.1:9/v1", &db, &["--attempts", "2", "--no-decontaminate"]),
            "failed 2 attempts, the last with: error sending request",
        ),
        (run_args(&url, &db, &["--seed", "5"]), "the database was started with --seed = 0, this command asks for 5"),
        (vec!["evolve", "--db", &db, "--local", "/m", "--base-url", &url], "cannot be used with"),
        (vec!["evolve", "--db", &db], "--base-url <URL>"),
        (vec!["evolve", "export", "--db", &db, "--out", "o.jsonl", "--rounds", "3..1"], "--rounds \"3..1\""),
        (vec!["evolve", "lineage", "--db", &db, "9999"], "no item 9999 in"),
        (vec!["evolve", "status", "--db", "/nonexistent/x.db"], "no database at /nonexistent/x.db"),
    ];
    // Each error names its cause, retries included ("failed 2 attempts"), instead of retrying on.
    for (args, expected) in cases {
        check_failure(&wizard(&args), &args, &[expected]);
    }
    // The 401 was not retried: only the requests already in flight (--concurrency 16) were sent.
    // The right key then works on the same database.
    let requests = fake.server.stats().requests;
    assert!((1..=16).contains(&requests), "{requests}");
    let args = run_args(&url, &db, &["--rounds", "1", "--no-decontaminate", "--api-key-env", "MY_KEY"]);
    let table = common::stdout_of(&common::wizard_command(&args).env("MY_KEY", "sk-right").output().unwrap(), &args);
    assert!(table.starts_with("round  items accepted"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with(['0', '1'])).count(), 2, "rounds 0 and 1: {table}");
    let unaccounted = "SELECT count(*) FROM items WHERE status NOT IN ('accepted', 'rejected', 'removed')";
    assert_eq!(count(Path::new(&db), unaccounted), 0, "{table}");
    // A full disk while exporting.
    let output = wizard(&["evolve", "export", "--db", &db, "--out", "/dev/full"]);
    check_failure(&output, "export --out /dev/full", &["/dev/full: No space left on device"]);
}

/// A tokenizer trained on the shipped seeds and a random transformers model.
fn tiny_model(work: &Path) -> std::path::PathBuf {
    let shape = Shape { n_positions: 256, n_embd: 32, n_layer: 1, n_head: 2 };
    common::tiny_model(work, &evolve::seeds::DEFAULT_SEEDS.repeat(3), 400, shape)
}

#[test]
fn local_backend_runs_offline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let seeds = dir.path().join("seeds.jsonl");
    let shipped: Vec<&str> = evolve::seeds::DEFAULT_SEEDS.lines().take(4).collect();
    std::fs::write(&seeds, shipped.join("\n")).unwrap();
    let db = dir.path().join("local.db");
    let (db_str, model, seeds) = (db.to_str().unwrap(), model.to_str().unwrap(), seeds.to_str().unwrap());
    let args = ["evolve", "--db", db_str, "--local", model, "--device", "cpu", "--seeds", seeds, "--rounds", "2"];
    let args = [&args[..], &["--max-tokens", "12", "--no-decontaminate"]].concat();
    check(&args);
    // Gibberish answers are mostly rejected, but every item ends accounted for, by the local model.
    assert_eq!(count(&db, "SELECT count(*) FROM items WHERE round = 0"), 4);
    assert_eq!(
        count(&db, "SELECT count(*) FROM items WHERE round = 1"),
        count(&db, "SELECT count(DISTINCT root_id) FROM items WHERE round = 0 AND status = 'accepted'")
    );
    assert_eq!(count(&db, "SELECT count(*) FROM items WHERE status NOT IN ('accepted', 'rejected', 'removed')"), 0);
    let local = count(&db, "SELECT count(*) FROM answers WHERE backend = 'local'");
    assert!(local >= 4 + 4, "{local} answers: an evolution and a response per seed at least");
    assert_eq!(count(&db, "SELECT count(*) FROM answers WHERE backend != 'local'"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM answers WHERE completion_tokens > 12"), 0);
}
