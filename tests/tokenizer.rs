//! `wizard tokenizer train` run as a user would run it: the built binary on a directory of source files
//! and a JSONL corpus, its output loaded by Hugging Face `transformers` and by our Rust tokenizer.
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use pipeline::tokenizer::{Tokenizer, SPECIAL_TOKENS};
use serde_json::{json, Value};

const WIZARD: &str = env!("CARGO_BIN_EXE_wizard");
/// The venv interpreter that `scripts/setup.sh` installs, with `transformers` and `tokenizers`.
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.wizard/python");

/// Runs `wizard` in `dir`, so that paths in `args` are relative to it.
fn wizard(dir: &Path, args: &[&str]) -> Output {
    Command::new(WIZARD).args(args).current_dir(dir).output().expect("wizard runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const PEERS: &str = r#"
import json, sys
from tokenizers import Tokenizer
from transformers import AutoTokenizer

out_dir, request = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
auto = AutoTokenizer.from_pretrained(out_dir)
raw = Tokenizer.from_file(out_dir + "/tokenizer.json")
print(json.dumps({
    "class": type(auto).__name__,
    "auto": [auto.encode(text, add_special_tokens=False) for text in request["texts"]],
    "raw": [raw.encode(text, add_special_tokens=False).ids for text in request["texts"]],
    "special_ids": auto.convert_tokens_to_ids(request["specials"]),
    "raw_special_ids": [raw.token_to_id(token) for token in request["specials"]],
    "eos_token": auto.eos_token,
    "bos_token": auto.bos_token,
    "all_special_tokens": auto.all_special_tokens,
    "model_max_length": auto.model_max_length,
}))
"#;

/// Loads the tokenizer in `out` with `transformers.AutoTokenizer` and `tokenizers.Tokenizer`, and checks
/// that both encode every text to the ids our Rust tokenizer gives, and agree on the special tokens.
fn check_transformers_agree(work: &Path, out: &Path, texts: &[&str]) {
    let request = work.join("request.json");
    fs::write(&request, json!({"texts": texts, "specials": SPECIAL_TOKENS}).to_string()).unwrap();
    let output = Command::new(PYTHON)
        .args(["-c", PEERS])
        .arg(out)
        .arg(&request)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("the venv's python runs");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "python failed:\n{stdout}\n{}", text(&output.stderr));
    let python: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));

    let rust = Tokenizer::from_dir(out).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = json!(rust.encode(text).unwrap());
        assert_eq!(python["auto"][i], ids, "AutoTokenizer vs Rust on {text:?}");
        assert_eq!(python["raw"][i], ids, "tokenizers.Tokenizer vs Rust on {text:?}");
    }
    let expected_ids: Vec<u32> = (0..19).collect();
    let rust_ids: Vec<Option<u32>> = SPECIAL_TOKENS.iter().map(|token| rust.token_id(token)).collect();
    assert_eq!(rust_ids, expected_ids.iter().copied().map(Some).collect::<Vec<_>>());
    assert_eq!(python["special_ids"], json!(expected_ids));
    assert_eq!(python["raw_special_ids"], json!(expected_ids));
    assert_eq!(python["class"], "GPT2Tokenizer");
    assert_eq!(python["eos_token"], "<|endoftext|>");
    assert_eq!(python["bos_token"], "<|endoftext|>");
    assert_eq!(python["all_special_tokens"].as_array().unwrap().len(), 19, "{}", python["all_special_tokens"]);
    assert_eq!(python["model_max_length"], 8192);
}

#[test]
fn trained_tokenizer_loads_in_transformers_and_encodes_like_rust() {
    let work = tempfile::tempdir().unwrap();
    write_corpus(&work.path().join("corpus"));
    let output =
        wizard(work.path(), &["tokenizer", "train", "--input", "corpus", "--vocab-size", "400", "--out", "tok"]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "stdout: {stdout}\nstderr: {}", text(&output.stderr));
    // 3 languages x 8 files, plus the JSONL file with 8 documents.
    assert!(stdout.contains("documents       32 from 25 files\n"), "{stdout}");
    assert!(stdout.contains("vocab size      400 (19 special tokens, 256 bytes, 125 merges)\n"), "{stdout}");
    assert!(stdout.contains("written to      tok\n"), "{stdout}");
    let mut written: Vec<_> = fs::read_dir(work.path().join("tok")).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    assert_eq!(written, ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]);

    check_transformers_agree(
        work.path(),
        &work.path().join("tok"),
        &[
            "",
            "def add(a, b):\n    return a + b\n",
            "fn main() {\n\tprintln!(\"héllo, wörld\");\n}\n",
            "const double = (x) => x * 2; // 🦀 and 🐍, 👩‍💻\n",
            "<fim_prefix>def area(r):\n    return <fim_suffix>\n<fim_middle>",
            "<|endoftext|><reponame>octo/wizard<filename>src/lib.rs<gh_stars>42\n",
            "x<|endoftext|>y",
            "   a  <fim_pad>  b   ",
            "almost special: <|endoftext| and <fim_prefix",
            "中文注释 and 日本語\r\n",
            "it's what they've said we'll do",
        ],
    );
}

/// Writes `files` (path, contents) under a fresh directory, runs `wizard` there with `args`, and checks
/// that it fails and says every one of `expected` on stderr.
fn check_failure(files: &[(&str, &str)], args: &[&str], expected: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    for (path, contents) in files {
        let path = work.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }
    let output = wizard(work.path(), args);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded\nstdout: {}\nstderr: {stderr}", text(&output.stdout));
    for part in expected {
        assert!(stderr.contains(part), "{args:?}: stderr should contain {part:?}:\n{stderr}");
    }
    assert!(!work.path().join("tok/tokenizer.json").exists(), "{args:?} wrote a tokenizer");
}

#[test]
fn bad_inputs_fail_naming_the_file_line_flag_or_path() {
    let train = |input: &'static str, vocab_size: &'static str| {
        ["tokenizer", "train", "--input", input, "--vocab-size", vocab_size, "--out", "tok"]
    };
    let good = "{\"content\": \"def f():\\n    pass\\n\"}\n";
    let broken = format!("{good}{good}{{\"content\": \"def g(\n{good}");
    check_failure(
        &[("corpus/a.py", "x = 1\n"), ("corpus/data.jsonl", &broken)],
        &train("corpus", "400"),
        &["corpus/data.jsonl: line 3", "while parsing a string"],
    );
    check_failure(
        &[("corpus/data.jsonl", "{\"content\": \"x\"}\n{\"id\": 2}\n")],
        &train("corpus", "400"),
        &["corpus/data.jsonl: line 2: no string field `content` or `text`"],
    );
    check_failure(&[("corpus/a.py", "x = 1\n")], &train("corpus", "10"), &["--vocab-size", "at least 275"]);
    check_failure(&[], &train("no/such/dir", "400"), &["no/such/dir", "No such file or directory"]);
    check_failure(&[("corpus/notes.txt", "prose\n")], &train("corpus", "400"), &["no source files under corpus"]);
}

const NAMES: [&str; 8] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];

/// About 400 lines of Python, Rust and JavaScript in 24 files, plus a JSONL file of 8 documents.
fn write_corpus(dir: &Path) {
    for (i, name) in NAMES.iter().enumerate() {
        let title = capitalize(name);
        let python = format!(
            "import json\n\n\ndef load_{name}(path, limit={i}):\n    \"\"\"Read {name} records from a JSON file.\"\"\"\n    with open(path, encoding=\"utf-8\") as handle:\n        records = json.load(handle)\n    return [record for record in records if record[\"score\"] > limit]\n\n\nclass {title}Index:\n    def __init__(self):\n        self.by_key = {{}}\n\n    def insert(self, key, value):\n        self.by_key.setdefault(key, []).append(value)\n        return len(self.by_key[key])\n"
        );
        fs::create_dir_all(dir.join("python")).unwrap();
        fs::write(dir.join(format!("python/{name}.py")), python).unwrap();
        let rust = format!(
            "/// {title} settings.\n#[derive(Debug, Clone)]\npub struct {title}Config {{\n    pub width: usize,\n    pub name: String,\n}}\n\nimpl {title}Config {{\n    pub fn scaled(&self, factor: usize) -> usize {{\n        self.width * factor + {i}\n    }}\n}}\n\n#[cfg(test)]\nmod tests {{\n    #[test]\n    fn scales() {{\n        let config = super::{title}Config {{ width: 2, name: \"{name}\".into() }};\n        assert_eq!(config.scaled(3), 6 + {i});\n    }}\n}}\n"
        );
        fs::create_dir_all(dir.join("rust/src")).unwrap();
        fs::write(dir.join(format!("rust/src/{name}.rs")), rust).unwrap();
        let javascript = format!(
            "// {name}: a tiny event emitter\nexport class {title}Emitter {{\n  constructor() {{\n    this.listeners = new Map();\n  }}\n\n  on(event, listener) {{\n    const list = this.listeners.get(event) ?? [];\n    list.push(listener);\n    this.listeners.set(event, list);\n  }}\n\n  emit(event, ...args) {{\n    for (const listener of this.listeners.get(event) ?? []) {{\n      listener(...args, {i});\n    }}\n  }}\n}}\n"
        );
        fs::create_dir_all(dir.join("web")).unwrap();
        fs::write(dir.join(format!("web/{name}.js")), javascript).unwrap();
    }
    let jsonl: String = NAMES
        .iter()
        .map(|name| format!("{}\n", json!({"text": format!("# {name}: héllo 🦀\nprint('{name}')\n"), "id": name})))
        .collect();
    fs::write(dir.join("snippets.jsonl"), jsonl).unwrap();
}

fn capitalize(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map_or_else(String::new, |first| first.to_ascii_uppercase().to_string() + chars.as_str())
}
