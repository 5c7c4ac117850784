//! `wizard pipeline` end to end at tiny sizes: every stage and its artefact (the evolve database's
//! rounds and lineage, a checkpoint that `transformers` loads, the pass@k reports, the report and its
//! plots, an LSP answer from the produced model), skipping and re-running on a changed config, a kill
//! in the middle of a stage followed by a re-run, a failing stage, and bad configurations.
mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::lsp::{inline_text, Client};
use common::{check_failure, query, read_json, stdout_of, wait_until, PYTHON};
use serde_json::{json, Value};

/// A corpus of small Python files and seeds that carry their answers (so round 0 needs no model).
fn fixture(dir: &Path) {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..12 {
        let code: String = (0..12)
            .map(|j| format!("def f_{i}_{j}(x):\n    \"\"\"Return x times {j}.\"\"\"\n    return x * {j} + {i}\n\n"))
            .collect();
        std::fs::write(corpus.join(format!("m{i}.py")), code).unwrap();
    }
    let tasks = [
        ("Write a function that reverses a string.", "def rev(s):\n    return s[::-1]\n"),
        ("Return the largest number in a list of integers.", "def top(xs):\n    return max(xs)\n"),
        ("Count the vowels in a given sentence.", "def vowels(s):\n    return sum(c in 'aeiou' for c in s)\n"),
        (
            "Check whether a year is a leap year.",
            "def leap(y):\n    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)\n",
        ),
        ("Compute the factorial of n recursively.", "def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n"),
        ("Merge two dictionaries into a new one.", "def merge(a, b):\n    return {**a, **b}\n"),
    ];
    let seeds: String = tasks.iter().map(|(i, o)| json!({"instruction": i, "output": o}).to_string() + "\n").collect();
    std::fs::write(dir.join("seeds.jsonl"), seeds).unwrap();
    let mbpp: String = [
        (11, "Write a function to add one.", "def add_one(x):\n    return x + 1", "assert add_one(1) == 2"),
        (12, "Write a function to find the largest of a list.", "def largest(xs):\n    return max(xs)", "assert largest([1, 5]) == 5"),
        (13, "Write a function to double a number.", "def double(x):\n    return 2 * x", "assert double(3) == 6"),
    ]
    .iter()
    .map(|(id, text, code, test)| {
        json!({"task_id": id, "text": text, "code": code, "test_list": [test], "test_setup_code": "", "challenge_test_list": []})
            .to_string()
            + "\n"
    })
    .collect();
    std::fs::write(dir.join("mbpp.jsonl"), mbpp).unwrap();
}

/// The test configuration, with `extra` appended to the `[eval]` table (last in the file).
fn config(dir: &Path, pretrain_steps: usize, extra_eval: &str) -> PathBuf {
    let text = format!(
        r#"
[run]
out = "out"
rounds = 2
device = "cpu"

[tokenizer]
inputs = ["corpus"]
vocab_size = 400

[pretrain]
model = {{ n_embd = 32, n_layer = 1, n_head = 2, n_positions = 1024 }}
train = {{ steps = {pretrain_steps}, seq_len = 64, batch_size = 4, lr = 1e-3 }}

[draft]
model = {{ n_embd = 16, n_layer = 1, n_head = 2, n_positions = 1024 }}
train = {{ steps = 8, seq_len = 64, batch_size = 4 }}

[evolve]
seeds = "seeds.jsonl"
max_tokens = 12
concurrency = 2
decontaminate = false

[sft]
steps = 6
seq_len = 384
batch_size = 4

[eval]
limit = 2
max_new_tokens = 8
{extra_eval}
"#
    );
    let path = dir.join("wizard.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh directory with the fixture and the test configuration (`pretrain_steps`, `extra_eval`):
/// (the directory, its wizard.toml, its output folder).
fn workspace(pretrain_steps: usize, extra_eval: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let config_file = config(dir.path(), pretrain_steps, extra_eval);
    let out = dir.path().join("out");
    (dir, config_file, out)
}

/// The first `n` stages, each `done`, as [`stages`] lists them.
fn done(n: usize) -> Vec<(String, String)> {
    ALL_STAGES[..n].iter().map(|s| (s.to_string(), "done".to_string())).collect()
}

/// `wizard [GLOBAL] pipeline [EXTRA] --config CONFIG` with the venv's Python for the stages.
fn pipeline_command(global: &[&str], extra: &[&str], config: &Path) -> Command {
    let mut command = common::wizard_command(global);
    command.arg("pipeline").args(extra).arg("--config").arg(config).env("WIZARD_PYTHON", PYTHON);
    command
}

fn pipeline(config: &Path) -> Output {
    pipeline_command(&[], &[], config).output().unwrap()
}

/// The pipeline, asserting success; returns stderr (its stage lines).
fn check_pipeline(config: &Path) -> String {
    let output = pipeline(config);
    stdout_of(&output, ("wizard pipeline --config", config));
    common::text(&output.stderr)
}

/// The pipeline, logging to `log`; the log must also hold what its `wizard train` stages logged.
fn check_pipeline_logged(config: &Path, log: &Path) -> String {
    let output = pipeline_command(&["--log-file", log.to_str().unwrap()], &[], config).output().unwrap();
    stdout_of(&output, "wizard --log-file LOG pipeline");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("running wizard train"), "no stage started in the log:\n{log}");
    assert!(log.contains("wizard::train: step"), "no line from a train stage in the log:\n{log}");
    common::text(&output.stderr)
}

/// Starts the pipeline (`extra` flags) and waits until pretraining has saved its first checkpoint,
/// in the middle of the stage. In its own process group when `group`, so that a kill of the group
/// takes the stage's child too, as a crash or Ctrl-C in a terminal would.
fn start_until_pretraining_saves(config: &Path, extra: &[&str], group: bool) -> std::process::Child {
    let mut command = pipeline_command(&[], extra, config);
    if group {
        command.process_group(0);
    }
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let latest = config.parent().unwrap().join("out/base/latest");
    wait_until("pretraining saving a checkpoint", Duration::from_secs(120), || {
        assert!(child.try_wait().unwrap().is_none(), "the pipeline ended before it was killed");
        latest.exists()
    });
    child
}

/// `(stage, status)` rows of the pipeline's state, in run order.
fn stages(out: &Path) -> Vec<(String, String)> {
    query(&out.join("pipeline.sqlite"), "SELECT name, status FROM stages ORDER BY started_at, rowid")
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect()
}

const ALL_STAGES: &[&str] = &[
    "tokenizer",
    "pretrain",
    "draft",
    "evolve-1",
    "export-1",
    "sft-1",
    "eval-1",
    "evolve-2",
    "export-2",
    "sft-2",
    "eval-2",
];

/// Which stages a run's stderr says it ran (`==> [..s] NAME`) and which it skipped.
fn ran_and_skipped(stderr: &str) -> (Vec<String>, Vec<String>) {
    let (mut ran, mut skipped) = (Vec::new(), Vec::new());
    for line in stderr.lines().filter_map(|l| l.strip_prefix("==> [")) {
        let (_, rest) = line.split_once("s] ").unwrap_or_else(|| panic!("a stage line without its time: {line}"));
        if rest.starts_with("done:") {
            continue; // the summary at the end
        }
        match rest.split_once(": done before") {
            Some((name, _)) => skipped.push(name.to_string()),
            None => ran.push(rest.split(':').next().unwrap().to_string()),
        }
    }
    (ran, skipped)
}

fn check_transformers_loads(model: &Path) {
    let script = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
logits = model(ids).logits
assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
print(model.config.model_type, model.config.n_embd, logits.shape[1])
"#;
    let printed = common::python(script, &[model.as_os_str()]);
    assert!(printed.starts_with("gpt_bigcode 32 "), "{printed}");
}

/// `wizard serve` with the produced model and draft answers `llm-ls/getCompletions` with one
/// completion of at most the 6 tokens asked for, drafted by the draft model, the same as an inline
/// completion at the same place; and reports no error to the client.
fn check_lsp_answer(model: &Path, draft: &Path) {
    let mut client = Client::start_with(model, &["--draft".as_ref(), draft.as_os_str()]);
    // Drafts of a fixed length: the cost model rightly finds that this tiny pair does not pay.
    let init = client.initialize(json!({}), json!({"maxTokens": 6, "fixedGamma": true}));
    assert!(init["capabilities"].is_object(), "{init}");
    let uri = "file:///work/a.py";
    client.open(uri, "python", "def f_1_2(x):\n    \n");
    let answer = client
        .request(
            "llm-ls/getCompletions",
            json!({"textDocument": {"uri": uri}, "position": {"line": 1, "character": 4}, "contextWindow": 256,
                   "tokensToClear": [], "ide": "neovim",
                   "fim": {"enabled": true, "prefix": "<fim_prefix>", "middle": "<fim_middle>", "suffix": "<fim_suffix>"},
                   "requestBody": {"parameters": {"max_new_tokens": 6}}}),
        )
        .unwrap_or_else(|error| panic!("getCompletions: {error}"));
    let completions = answer["completions"].as_array().unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(completions.len(), 1, "{answer}");
    let text = completions[0]["generated_text"].as_str().unwrap_or_else(|| panic!("{answer}"));
    let log = client.log_text();
    let tokens = common::lsp::last_figure(&log, "tokens");
    assert!((1.0..=6.0).contains(&tokens), "{tokens} tokens for at most 6:\n{log}");
    assert!(common::lsp::last_figure(&log, "drafted") >= 1.0, "the draft model drafted nothing:\n{log}");
    let inline = client.inline(uri, 1, 4).unwrap_or_else(|error| panic!("inlineCompletion: {error}"));
    assert_eq!(inline_text(&inline).as_deref(), Some(text), "inline and llm-ls completions differ");
    let errors: Vec<&Value> =
        client.seen.iter().filter(|m| m["method"] == "window/showMessage" && m["params"]["type"] == 1).collect();
    assert!(errors.is_empty(), "the server reported errors: {errors:?}");
    client.exit();
}

#[test]
fn every_stage_and_artefact_then_skips_and_reruns_only_what_changed() {
    let mbpp = "mbpp = \"mbpp.jsonl\"";
    let (dir, config_file, out) = workspace(20, mbpp);
    let stderr = check_pipeline_logged(&config_file, &dir.path().join("wizard.log"));

    // The stage table: every stage done, in order. Tiny models pass nothing, so pass@1 does not
    // rise in round 2 and the cap of 2 is where it stops either way.
    assert_eq!(stages(&out), done(ALL_STAGES.len()), "{stderr}");
    assert_eq!(ran_and_skipped(&stderr), (ALL_STAGES.iter().map(|s| s.to_string()).collect(), vec![]));

    // The evolve database: rounds 0..2, every item accounted for, and lineage back to a seed.
    let evolve_db = out.join("evolve.sqlite");
    let rounds = query(&evolve_db, "SELECT DISTINCT round FROM items ORDER BY round");
    assert_eq!(rounds, vec![vec!["0".to_string()], vec!["1".into()], vec!["2".into()]]);
    assert_eq!(query(&evolve_db, "SELECT count(*) FROM items WHERE round = 0")[0][0], "6");
    assert_eq!(
        query(&evolve_db, "SELECT count(*) FROM items WHERE status NOT IN ('accepted','rejected','removed')")[0][0],
        "0"
    );
    let leaf = &query(&evolve_db, "SELECT id FROM items WHERE round = 2 LIMIT 1")[0][0];
    let lineage = common::check_wizard(&["evolve", "lineage", "--db", evolve_db.to_str().unwrap(), leaf]);
    let heads: Vec<&str> = lineage.lines().filter(|l| l.starts_with('#')).collect();
    // Seed first, the round-2 item last; a round-1 child only where round 1 accepted one.
    assert!((2..=3).contains(&heads.len()), "{lineage}");
    assert!(heads[0].contains("round 0 seed accepted"), "{lineage}");
    assert!(heads[heads.len() - 1].starts_with(&format!("#{leaf} round 2 ")), "{lineage}");

    // Exports: round 0 merged with the evolved rounds, as many lines as the store's accepted items.
    for r in 1..=2 {
        let lines = std::fs::read_to_string(out.join(format!("round-{r}/train.jsonl"))).unwrap().lines().count();
        let accepted =
            &query(&evolve_db, &format!("SELECT count(*) FROM items WHERE round <= {r} AND status = 'accepted'"))[0][0];
        assert_eq!(lines.to_string(), *accepted, "round {r}");
    }

    // The best round: the higher HumanEval pass@1, ties (tiny models pass nothing) broken by the
    // reference solutions' log-likelihood; round 1 on a full tie.
    let summary = read_json(&out.join("report.json"));
    let score = |r: usize| {
        let humaneval = &summary["rounds"][r - 1]["eval"]["humaneval"];
        let loglik = humaneval["reference_loglik"].as_f64().unwrap_or_else(|| panic!("round {r}: {humaneval}"));
        assert!(loglik < 0.0 && loglik.is_finite(), "round {r}: {humaneval}");
        (humaneval["pass_at_k"]["pass@1"].as_f64().unwrap(), loglik)
    };
    let best = if score(2) > score(1) { 2 } else { 1 };
    assert_eq!(summary["best_round"], best);

    // Checkpoints: transformers loads the best round's model (linked as `model`).
    let model = std::fs::canonicalize(out.join("model")).unwrap();
    let best_checkpoints = format!("round-{best}/sft/checkpoints");
    assert!(model.starts_with(std::fs::canonicalize(&out).unwrap().join(best_checkpoints)), "{model:?}");
    check_transformers_loads(&model);

    // pass@k reports, one per round and benchmark, over the 2 problems asked for.
    // Each pass@1 is the share of problems whose one sample passed, and the summary carries it.
    for r in 1..=2 {
        for benchmark in ["humaneval", "mbpp"] {
            let dir = out.join(format!("round-{r}/{benchmark}"));
            let report = read_json(&dir.join("report.json"));
            assert_eq!(report["problems"], 2, "{benchmark}: {report}");
            let results = common::read_lines(&dir.join("results.jsonl"));
            assert_eq!(results.len(), 2, "one sample per problem: {results:?}");
            let passed = results.iter().filter(|r| r["result"] == "passed").count();
            assert_eq!(report["pass_at_k"]["pass@1"], json!(passed as f64 / 2.0), "round {r} {benchmark}: {report}");
            let in_summary = &summary["rounds"][r - 1]["eval"][benchmark]["pass_at_k"]["pass@1"];
            assert_eq!(*in_summary, report["pass_at_k"]["pass@1"], "round {r} {benchmark} in report.json");
            let loglik = &summary["rounds"][r - 1]["eval"][benchmark]["reference_loglik"];
            assert_eq!(*loglik, report["reference_loglik"], "round {r} {benchmark} in report.json");
        }
    }

    // The report: Markdown with a row per round, the plots, and a JSON summary.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains(
            "| round | items trained on | evolved | accepted | acceptance | SFT loss | ref log-likelihood | HumanEval pass@1 | MBPP pass@1 |"
        ),
        "{md}"
    );
    let other = 3 - best;
    assert!(md.contains(&format!("| {best} (best) |")) && md.contains(&format!("\n| {other} |")), "{md}");
    for plot in ["loss.svg", "pass1.svg", "loglik.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{plot}");
    }
    let loss = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    for series in ["pretrain", "draft", "sft round 1", "sft round 2"] {
        assert!(loss.contains(&format!(">{series}</text>")), "{series} missing from loss.svg");
    }
    assert_eq!(summary["rounds"].as_array().unwrap().len(), 2);

    // An LSP answer from the produced model with the draft.
    let draft = PathBuf::from(summary["draft"].as_str().unwrap());
    check_lsp_answer(&model, &draft);

    // Unchanged: everything is skipped, and nothing recorded or trained changes.
    let table = "SELECT name, fingerprint, status, outputs, started_at, finished_at FROM stages ORDER BY name";
    let recorded = query(&out.join("pipeline.sqlite"), table);
    let metrics = std::fs::read_to_string(out.join("base/metrics.jsonl")).unwrap();
    let again = check_pipeline(&config_file);
    assert_eq!(ran_and_skipped(&again), (vec![], ALL_STAGES.iter().map(|s| s.to_string()).collect()));
    assert!(!again.contains(" done in "), "a stage ran:\n{again}");
    assert_eq!(query(&out.join("pipeline.sqlite"), table), recorded);
    assert_eq!(std::fs::read_to_string(out.join("base/metrics.jsonl")).unwrap(), metrics);

    // A changed [eval] re-runs only the evaluations; a changed [sft] the fine-tuning and what follows.
    check_changed(&config_file, dir.path(), 20, &format!("{mbpp}\ntimeout = 5.0"), &["eval-1", "eval-2"]);
    let sft_changed = std::fs::read_to_string(&config_file).unwrap().replace("steps = 6", "steps = 7");
    std::fs::write(&config_file, sft_changed).unwrap();
    let (ran, _) = ran_and_skipped(&check_pipeline(&config_file));
    assert_eq!(ran, ["sft-1", "eval-1", "sft-2", "eval-2"]);

    // Edited inputs under unchanged paths: new MBPP problems re-run the evaluations, new seeds the rounds.
    let problems = std::fs::read_to_string(dir.path().join("mbpp.jsonl")).unwrap();
    std::fs::write(dir.path().join("mbpp.jsonl"), problems.replace("add one", "add 1")).unwrap();
    let (ran, _) = ran_and_skipped(&check_pipeline(&config_file));
    assert_eq!(ran, ["eval-1", "eval-2"]);
    // With int8 weights for generation too: the stages that generate get `--dtype int8`.
    let seeds = std::fs::read_to_string(dir.path().join("seeds.jsonl")).unwrap();
    std::fs::write(dir.path().join("seeds.jsonl"), seeds.replace("reverses a string", "reverses a list")).unwrap();
    let int8 = std::fs::read_to_string(&config_file)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cpu\"\ndtype = \"int8\"");
    std::fs::write(&config_file, int8).unwrap();
    let log = dir.path().join("int8.log");
    let (ran, _) = ran_and_skipped(&check_pipeline_logged(&config_file, &log));
    assert_eq!(ran, ALL_STAGES[3..]);
    let log = std::fs::read_to_string(log).unwrap();
    for stage in ["running wizard evolve", "running wizard eval run"] {
        let runs: Vec<&str> = log.lines().filter(|line| line.contains(stage)).collect();
        assert!(!runs.is_empty() && runs.iter().all(|line| line.contains("\"--dtype\", \"int8\"")), "{stage}:\n{log}");
    }
}

fn check_changed(config_file: &Path, dir: &Path, steps: usize, extra: &str, expected: &[&str]) {
    let text = std::fs::read_to_string(config(dir, steps, extra)).unwrap();
    assert_eq!(text, std::fs::read_to_string(config_file).unwrap());
    let (ran, skipped) = ran_and_skipped(&check_pipeline(config_file));
    assert_eq!(ran, expected, "{extra}");
    assert_eq!(ran.len() + skipped.len(), ALL_STAGES.len());
}

#[test]
fn a_kill_in_the_middle_of_a_stage_loses_nothing() {
    let (_dir, config_file, out) = workspace(400, "");
    let mut child = start_until_pretraining_saves(&config_file, &[], true);
    common::kill_group(&mut child);
    let steps_done = std::fs::read_to_string(out.join("base/metrics.jsonl")).unwrap().lines().count();
    assert!(steps_done < 400, "pretraining finished before the kill ({steps_done} steps)");
    assert_eq!(stages(&out), [done(1), vec![("pretrain".into(), "running".into())]].concat());

    let stderr = check_pipeline(&config_file);
    let (ran, skipped) = ran_and_skipped(&stderr);
    assert_eq!(skipped, ["tokenizer"]);
    assert_eq!(ran, &ALL_STAGES[1..], "{stderr}");
    assert!(stderr.contains("pretrain: continuing where it stopped"), "{stderr}");
    assert!(stderr.contains("resuming from"), "training resumed from its checkpoint:\n{stderr}");
    assert_eq!(stages(&out), done(ALL_STAGES.len()));
    // Each step is in the metrics once: the resumed run continued from the checkpoint's step.
    let steps: Vec<u64> =
        common::read_lines(&out.join("base/metrics.jsonl")).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=400).collect::<Vec<u64>>());
    for file in ["report.md", "model/config.json"] {
        assert!(out.join(file).exists(), "no {file} after the re-run");
    }
}

/// Only the pipeline process is killed: its trainer dies with it. A stage child that is still alive
/// (here stood in for by another `wizard` process) makes a re-run refuse, naming the process, rather
/// than start a second one on the same folder; once it is gone, the re-run finishes the stage.
#[test]
fn a_killed_pipeline_leaves_no_stage_running_twice() {
    let (_dir, config_file, out) = workspace(800, "");
    let run = || pipeline_command(&[], &["--rounds", "1"], &config_file).output().unwrap();
    let mut child = start_until_pretraining_saves(&config_file, &["--rounds", "1"], false);
    let db = out.join("pipeline.sqlite");
    let trainer = query(&db, "SELECT pid FROM stages WHERE name = 'pretrain' AND status = 'running'")[0][0].clone();
    child.kill().unwrap();
    child.wait().unwrap();
    // Gone (or a zombie not yet reaped, which has no `exe`).
    wait_until(&format!("the trainer {trainer} dying with its pipeline"), Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{trainer}/exe")).is_err()
    });

    let mut stand_in = common::wizard_command(&["serve", "--model", "/nonexistent"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE stages SET pid = ?1 WHERE name = 'pretrain'", [stand_in.id()])
        .unwrap();
    let expected = format!("stage `pretrain` is still running in process {}", stand_in.id());
    check_failure(&run(), "pipeline beside a stage's process", &[&expected]);
    stand_in.kill().unwrap();
    stand_in.wait().unwrap();

    let output = run();
    stdout_of(&output, "pipeline --rounds 1");
    let stderr = common::text(&output.stderr);
    assert!(stderr.contains("pretrain: continuing where it stopped"), "{stderr}");
    assert_eq!(stages(&out), done(7));
}

#[test]
fn a_failing_stage_stops_the_pipeline_and_keeps_what_was_done() {
    let (dir, config_file, out) = workspace(4, "");
    let seeds = dir.path().join("seeds.jsonl");
    let good = std::fs::read_to_string(&seeds).unwrap();
    std::fs::write(&seeds, "{\"instruction\": 3}\n").unwrap();
    // The stage says why.
    check_failure(&pipeline(&config_file), "pipeline on bad seeds", &["stage `evolve-1` failed", "seeds.jsonl:1"]);
    assert_eq!(stages(&out), [done(3), vec![("evolve-1".into(), "failed".into())]].concat());
    // Fixed, the same command continues after what was done.
    std::fs::write(&seeds, good).unwrap();
    let (ran, skipped) = ran_and_skipped(&check_pipeline(&config_file));
    assert_eq!(skipped, ["tokenizer", "pretrain", "draft"]);
    assert_eq!(ran, &ALL_STAGES[3..]);
}

/// `wizard pipeline` on the test config with its first `from` replaced by `to` fails with `expected`
/// in its message, before anything runs.
fn check_bad(from: &str, to: &str, expected: &str) {
    let (_dir, config_file, out) = workspace(4, "");
    let text = std::fs::read_to_string(&config_file).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&config_file, text.replacen(from, to, 1)).unwrap();
    check_failure(&pipeline(&config_file), (from, to), &[expected]);
    assert!(!out.exists(), "{expected}: nothing may run on a bad config");
}

#[test]
fn bad_configs_are_errors_naming_the_key() {
    let cases = [
        ("steps = 6", "stepz = 6", "unknown field `stepz`"),
        ("[eval]\n", "[eval]\nbest_of = 3\n", "unknown field `best_of`"),
        ("[run]\n", "[runs]\n", "unknown field `runs`"),
        ("vocab_size = 400", "vocab_size = 100", "`tokenizer.vocab_size`: 100 is below 275"),
        ("n_head = 2, n_positions", "n_head = 3, n_positions", "`pretrain.model.n_head`: 3 does not divide"),
        ("seq_len = 384", "seq_len = 4096", "`sft.seq_len`: 4096 is longer than the model's n_positions"),
        ("batch_size = 4 }", "batch_size = 0 }", "`draft.train.batch_size`: must be at least 1"),
        ("rounds = 2", "rounds = 0", "`run.rounds`: must be at least 1"),
        ("device = \"cpu\"", "device = \"cpu\"\ndtype = \"int3\"", "`run.dtype`: unknown dtype `int3`"),
        ("device = \"cpu\"", "device = \"cuda\"\ndtype = \"int8\"", "`run.dtype`: int8 runs on the CPU"),
        ("limit = 2", "limit = 2\nformat = \"chat\"", "`eval.format`: \"chat\""),
        ("limit = 2", "limit = 2\nsamples = 4", "`eval.samples`: several samples"),
        ("[sft]\n", "[sft]\nzero = 4\n", "`sft.zero`: stage 4 does not exist"),
        ("concurrency = 2", "concurrency = 0", "`evolve.concurrency`"),
        ("[evolve]\n", "[evolve]\nbase_url = \"http://127.0.0.1:9/v1\"\n", "`evolve.model`"),
        ("[run]\n", "[base]\ncheckpoint = \"m\"\n[run]\n", "`base`: give either"),
        ("rounds = 2", "rounds = \"two\"", "invalid type: string \"two\", expected u32"),
    ];
    for (from, to, expected) in cases {
        check_bad(from, to, expected);
    }
    let output = common::wizard(&["pipeline", "--config", "/nonexistent/wizard.toml"]);
    check_failure(&output, "--config /nonexistent/wizard.toml", &["cannot read /nonexistent/wizard.toml"]);
}
