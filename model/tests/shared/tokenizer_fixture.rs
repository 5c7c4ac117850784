//! One tokenizer fixture for two test crates: `model/tests/tokenizer_parity.rs` (the library's
//! trainer) and `tests/tokenizer.rs` (`wizard tokenizer train`) include this file by path. It holds
//! a corpus to train on, texts that probe byte-level BPE and the special tokens, and the check that
//! Hugging Face `transformers.AutoTokenizer` and `tokenizers.Tokenizer` load the trained files and
//! encode and decode exactly as our Rust tokenizer does.
use std::fs;
use std::path::Path;
use std::process::Command;

use model::tokenizer::{Tokenizer, SPECIAL_TOKENS};
use serde_json::{json, Value};

/// Code, prose, special tokens alone and in text, near-special text, Unicode, control bytes.
pub const TEXTS: &[&str] = &[
    "",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n\tprintln!(\"héllo, wörld\");\n}\n",
    "const double = (x) => x * 2; // 🦀 and 🐍, 👩‍💻\n",
    "<fim_prefix>def area(r):\n    return <fim_suffix>\n<fim_middle>",
    "<|endoftext|><reponame>octo/wizard<filename>src/lib.rs<gh_stars>42\n",
    "<issue_start>bug<issue_comment>fixed<issue_closed><commit_before>a<commit_msg>b<commit_after>c",
    "<jupyter_start><jupyter_text>md<jupyter_code>x<jupyter_output><empty_output><fim_pad>",
    "x<|endoftext|>y",
    "   a  <fim_pad>  b   ",
    "almost special: <|endoftext| and <fim_prefix",
    "    indented    with   runs of spaces\n\n\n",
    "中文注释 and 日本語\r\n",
    "中文注释 and 日本語 and Ελληνικά\r\n",
    "it's what they've said we'll do",
    "it's what they've said we'll do, isn't it? I'm sure they'd agree",
    "numbers 1234567890 3.14159 0xFF 1e-9",
    "control \u{0}\u{1}\u{1b}[0m\u{7f} bytes",
];

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
    "decoded": [auto.decode(ids, skip_special_tokens=False) for ids in request["ids"]],
    "decoded_skipping": [auto.decode(ids, skip_special_tokens=True) for ids in request["ids"]],
    "special_ids": auto.convert_tokens_to_ids(request["specials"]),
    "raw_special_ids": [raw.token_to_id(token) for token in request["specials"]],
    "eos_token": auto.eos_token,
    "eos_token_id": auto.eos_token_id,
    "bos_token": auto.bos_token,
    "all_special_tokens": auto.all_special_tokens,
    "model_max_length": auto.model_max_length,
    "len": len(auto),
}))
"#;

/// Loads the tokenizer in `dir` with `transformers.AutoTokenizer` and `tokenizers.Tokenizer` (run by
/// `python`), and checks that both encode every text to the ids our Rust tokenizer gives, that both
/// sides decode those ids back to the text (and skip the special tokens alike), and that they agree
/// on the special tokens.
pub fn check_peers_agree(python: &str, dir: &Path, texts: &[&str]) {
    let rust = Tokenizer::from_dir(dir).unwrap();
    let ids: Vec<Vec<u32>> = texts.iter().map(|text| rust.encode(text).unwrap()).collect();
    let work = tempfile::tempdir().unwrap();
    let request = work.path().join("request.json");
    fs::write(&request, json!({"texts": texts, "ids": ids, "specials": SPECIAL_TOKENS}).to_string()).unwrap();
    let output = Command::new(python)
        .args(["-c", PEERS])
        .arg(dir)
        .arg(&request)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let peers: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));

    for (i, text) in texts.iter().enumerate() {
        assert_eq!(peers["auto"][i], json!(ids[i]), "AutoTokenizer vs Rust on {text:?}");
        assert_eq!(peers["raw"][i], json!(ids[i]), "tokenizers.Tokenizer vs Rust on {text:?}");
        assert_eq!(peers["decoded"][i], *text, "AutoTokenizer decode of {:?}", ids[i]);
        assert_eq!(rust.decode(&ids[i], false).unwrap(), *text, "Rust decode of {:?}", ids[i]);
        assert_eq!(peers["decoded_skipping"][i], rust.decode(&ids[i], true).unwrap(), "skipping specials in {text:?}");
    }
    let special_ids: Vec<u32> = (0..19).collect();
    let rust_ids: Vec<Option<u32>> = SPECIAL_TOKENS.iter().map(|token| rust.token_id(token)).collect();
    assert_eq!(rust_ids, special_ids.iter().copied().map(Some).collect::<Vec<_>>());
    assert_eq!(peers["special_ids"], json!(special_ids));
    assert_eq!(peers["raw_special_ids"], json!(special_ids));
    assert_eq!(peers["class"], "GPT2Tokenizer");
    assert_eq!(peers["eos_token"], "<|endoftext|>");
    assert_eq!(peers["eos_token_id"], rust.eos_id());
    assert_eq!(peers["bos_token"], "<|endoftext|>");
    assert_eq!(peers["all_special_tokens"].as_array().unwrap().len(), 19, "{}", peers["all_special_tokens"]);
    assert_eq!(peers["model_max_length"], 8192);
    assert_eq!(peers["len"], rust.vocab_size());
}

const NAMES: [&str; 8] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];

/// About 400 lines of Python, Rust and JavaScript in 24 files under three folders, plus a JSONL file
/// of 8 documents (half with a `text` field, half with `content`): 32 documents from 25 files.
pub fn write_corpus(dir: &Path) {
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
        .enumerate()
        .map(|(i, name)| {
            let code = format!("# {name}: héllo 🦀\nprint('{name}')\n");
            let document =
                if i % 2 == 0 { json!({"text": code, "id": name}) } else { json!({"content": code, "lang": "python"}) };
            format!("{document}\n")
        })
        .collect();
    fs::write(dir.join("snippets.jsonl"), jsonl).unwrap();
}

fn capitalize(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map_or_else(String::new, |first| first.to_ascii_uppercase().to_string() + chars.as_str())
}
