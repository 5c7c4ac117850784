//! `wizard tokenizer train` run as a user would run it: the built binary on a directory of source files
//! and a JSONL corpus, its output loaded by Hugging Face `transformers` and by our Rust tokenizer.
mod common;
#[path = "../model/tests/shared/tokenizer_fixture.rs"]
mod tokenizer_fixture;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{check_failure, stdout_of, PYTHON};

/// Runs `wizard` in `dir`, so that paths in `args` are relative to it.
fn wizard_in(dir: &Path, args: &[&str]) -> Output {
    common::wizard_command(args).current_dir(dir).output().expect("wizard runs")
}

#[test]
fn trained_tokenizer_loads_in_transformers_and_encodes_like_rust() {
    let work = tempfile::tempdir().unwrap();
    tokenizer_fixture::write_corpus(&work.path().join("corpus"));
    let args = ["tokenizer", "train", "--input", "corpus", "--vocab-size", "400", "--out", "tok"];
    let stdout = stdout_of(&wizard_in(work.path(), &args), args);
    // 3 languages x 8 files, plus the JSONL file with 8 documents.
    assert!(stdout.contains("documents       32 from 25 files\n"), "{stdout}");
    assert!(stdout.contains("vocab size      400 (19 special tokens, 256 bytes, 125 merges)\n"), "{stdout}");
    assert!(stdout.contains("written to      tok\n"), "{stdout}");
    let mut written: Vec<_> = fs::read_dir(work.path().join("tok")).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    assert_eq!(written, ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]);
    tokenizer_fixture::check_peers_agree(PYTHON, &work.path().join("tok"), tokenizer_fixture::TEXTS);
}

/// Writes `files` (path, contents) under a fresh directory, runs `wizard` there with `args`, and checks
/// that it fails saying every one of `expected` on stderr, and writes no tokenizer.
fn check_bad(files: &[(&str, &str)], args: &[&str], expected: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    for (path, contents) in files {
        let path = work.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }
    check_failure(&wizard_in(work.path(), args), args, expected);
    assert!(!work.path().join("tok/tokenizer.json").exists(), "{args:?} wrote a tokenizer");
}

#[test]
fn bad_inputs_fail_naming_the_file_line_flag_or_path() {
    let train = |input: &'static str, vocab_size: &'static str| {
        ["tokenizer", "train", "--input", input, "--vocab-size", vocab_size, "--out", "tok"]
    };
    let good = "{\"content\": \"def f():\\n    pass\\n\"}\n";
    let broken = format!("{good}{good}{{\"content\": \"def g(\n{good}");
    check_bad(
        &[("corpus/a.py", "x = 1\n"), ("corpus/data.jsonl", &broken)],
        &train("corpus", "400"),
        &["corpus/data.jsonl: line 3", "while parsing a string"],
    );
    check_bad(
        &[("corpus/data.jsonl", "{\"content\": \"x\"}\n{\"id\": 2}\n")],
        &train("corpus", "400"),
        &["corpus/data.jsonl: line 2: no string field `content` or `text`"],
    );
    check_bad(&[("corpus/a.py", "x = 1\n")], &train("corpus", "10"), &["--vocab-size", "at least 275"]);
    check_bad(&[], &train("no/such/dir", "400"), &["no/such/dir", "No such file or directory"]);
    check_bad(&[("corpus/notes.txt", "prose\n")], &train("corpus", "400"), &["no source files under corpus"]);
}
