//! `wizard evolve` as a user runs it: against a Chat Completions server on loopback that the test
//! starts (with injected faults), killed with SIGKILL and resumed, with wizard's own tiny model, and
//! with bad input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evolve::fake::{FakeConfig, FakeServer};

const WIZARD: &str = env!("CARGO_BIN_EXE_wizard");
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.wizard/python");

struct Server {
    server: FakeServer,
    _runtime: tokio::runtime::Runtime,
}

fn server(config: FakeConfig) -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(FakeServer::start(config)).unwrap();
    Server { server, _runtime: runtime }
}

fn wizard(args: &[&str]) -> Output {
    Command::new(WIZARD).args(args).env_remove("OPENAI_API_KEY").output().unwrap()
}

fn run_args<'a>(server: &'a str, db: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["evolve", "--db", db, "--base-url", server, "--model", "fake", "--backoff-ms", "10"];
    args.extend_from_slice(extra);
    args
}

/// Runs `wizard` and returns stdout, asserting success.
fn check(args: &[&str]) -> String {
    let output = wizard(args);
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// (id, parent, round, method, status, reason, instruction, response) of every item.
fn items(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn
        .prepare("SELECT id, parent_id, round, method, status, reason, instruction, response FROM items ORDER BY id")
        .unwrap();
    let rows = statement
        .query_map([], |r| {
            Ok(format!(
                "{} {:?} {} {} {} {:?} {:?} {:?}",
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

fn count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
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
            assert!(!value["output"].as_str().unwrap().is_empty());
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
    let started = Instant::now();
    check(&run_args(&url, whole.to_str().unwrap(), &extra));
    let took = started.elapsed();
    let answered_whole = fake.server.stats().answered;

    let killed = dir.path().join("killed.db");
    let args = run_args(&url, killed.to_str().unwrap(), &extra);
    let mut state: u64 = 0x2545_f491;
    let mut kills = 0;
    let finished = loop {
        assert!(kills < 40, "no end after {kills} kills");
        let mut child = Command::new(WIZARD).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        // Kill between 15% and 40% of an uninterrupted run's time (start-up included), so each
        // killed run makes some progress and stops at a random point.
        let wait = took.mul_f64(0.15 + 0.25 * ((state >> 33) % 1000) as f64 / 1000.0);
        let started = Instant::now();
        while started.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
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
    for (args, expected) in cases {
        let started = Instant::now();
        let output = wizard(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(20), "{args:?}");
    }
    // The 401 was not retried: only the requests already in flight (--concurrency 16) were sent.
    // The right key then works on the same database.
    let requests = fake.server.stats().requests;
    assert!((1..=16).contains(&requests), "{requests}");
    let output = Command::new(WIZARD)
        .args(run_args(&url, &db, &["--rounds", "1", "--no-decontaminate", "--api-key-env", "MY_KEY"]))
        .env("MY_KEY", "sk-right")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // A full disk while exporting.
    let output = wizard(&["evolve", "export", "--db", &db, "--out", "/dev/full"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("/dev/full: No space left on device"), "{stderr}");
}

const MAKE_MODEL: &str = r#"
import sys, torch
from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM
directory = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(directory)
torch.manual_seed(0)
config = GPTBigCodeConfig(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                          bos_token_id=0, eos_token_id=0)
GPTBigCodeForCausalLM(config).save_pretrained(directory)
"#;

fn tiny_model(work: &Path) -> PathBuf {
    let corpus = work.join("corpus.txt");
    std::fs::write(&corpus, evolve::seeds::DEFAULT_SEEDS.repeat(3)).unwrap();
    let model = work.join("model");
    check(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "400",
        "--input",
        corpus.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    let made = Command::new(PYTHON).args(["-c", MAKE_MODEL]).arg(&model).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(made.status.success(), "python: {}", String::from_utf8_lossy(&made.stderr));
    model
}

#[test]
fn local_backend_runs_offline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let seeds = dir.path().join("seeds.jsonl");
    let shipped: Vec<&str> = evolve::seeds::DEFAULT_SEEDS.lines().take(4).collect();
    std::fs::write(&seeds, shipped.join("\n")).unwrap();
    let db = dir.path().join("local.db");
    let args = [
        "evolve",
        "--db",
        db.to_str().unwrap(),
        "--local",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--seeds",
        seeds.to_str().unwrap(),
        "--rounds",
        "2",
        "--max-tokens",
        "12",
        "--no-decontaminate",
    ];
    check(&args);
    // Gibberish answers are mostly rejected, but every item ends accounted for, by the local model.
    assert_eq!(count(&db, "SELECT count(*) FROM items WHERE round = 0"), 4);
    assert_eq!(
        count(&db, "SELECT count(*) FROM items WHERE round = 1"),
        count(&db, "SELECT count(DISTINCT root_id) FROM items WHERE round = 0 AND status = 'accepted'")
    );
    assert_eq!(count(&db, "SELECT count(*) FROM items WHERE status NOT IN ('accepted', 'rejected', 'removed')"), 0);
    assert!(count(&db, "SELECT count(*) FROM answers WHERE backend = 'local'") >= 4 + 4);
    assert_eq!(count(&db, "SELECT count(*) FROM answers WHERE backend != 'local'"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM answers WHERE completion_tokens > 12"), 0);
}
