//! A tokenizer trained by `pipeline::tokenizer::train` encodes and decodes exactly like the same files
//! loaded by Hugging Face `transformers.AutoTokenizer` and by `tokenizers.Tokenizer.from_file`.
use std::fs;
use std::path::Path;
use std::process::Command;

use pipeline::tokenizer::{self, Tokenizer, TrainConfig, SPECIAL_TOKENS};
use serde_json::{json, Value};

/// The venv interpreter that `scripts/setup.sh` installs, with `transformers` and `tokenizers`.
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.wizard/python");

const PEERS: &str = r#"
import json, sys
from tokenizers import Tokenizer
from transformers import AutoTokenizer

out_dir, request = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
auto = AutoTokenizer.from_pretrained(out_dir)
raw = Tokenizer.from_file(out_dir + "/tokenizer.json")
print(json.dumps({
    "auto": [auto.encode(text, add_special_tokens=False) for text in request["texts"]],
    "raw": [raw.encode(text, add_special_tokens=False).ids for text in request["texts"]],
    "decoded": [auto.decode(ids, skip_special_tokens=False) for ids in request["ids"]],
    "decoded_skipping": [auto.decode(ids, skip_special_tokens=True) for ids in request["ids"]],
    "special_ids": auto.convert_tokens_to_ids(request["specials"]),
    "eos_token": auto.eos_token,
    "eos_token_id": auto.eos_token_id,
    "len": len(auto),
}))
"#;

/// Runs [`PEERS`] on the tokenizer in `dir` and returns its report.
fn ask_python(dir: &Path, texts: &[&str], ids: &[Vec<u32>]) -> Value {
    let request = dir.join("request.json");
    fs::write(&request, json!({"texts": texts, "ids": ids, "specials": SPECIAL_TOKENS}).to_string()).unwrap();
    let output = Command::new(PYTHON)
        .args(["-c", PEERS])
        .arg(dir.join("tokenizer"))
        .arg(&request)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn ids_of(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|id| id.as_u64().unwrap() as u32).collect()
}

/// Trains on a small code corpus, then checks that Rust, `AutoTokenizer` and the raw `tokenizers`
/// tokenizer agree on the ids of every text, and that decoding restores each text on both sides.
fn check(texts: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    write_corpus(&corpus);
    let out = dir.path().join("tokenizer");
    let report = tokenizer::train(&TrainConfig::new(vec![corpus], 400), &out).unwrap();
    assert_eq!(report.vocab_size, 400, "the corpus is big enough to learn 125 merges: {report:?}");

    let rust = Tokenizer::from_dir(&out).unwrap();
    let ids: Vec<Vec<u32>> = texts.iter().map(|text| rust.encode(text).unwrap()).collect();
    let python = ask_python(dir.path(), texts, &ids);
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(ids_of(&python["auto"][i]), ids[i], "AutoTokenizer vs Rust on {text:?}");
        assert_eq!(ids_of(&python["raw"][i]), ids[i], "tokenizers.Tokenizer vs Rust on {text:?}");
        assert_eq!(python["decoded"][i], *text, "AutoTokenizer decode of {:?}", ids[i]);
        assert_eq!(rust.decode(&ids[i], false).unwrap(), *text, "Rust decode of {:?}", ids[i]);
        assert_eq!(python["decoded_skipping"][i], rust.decode(&ids[i], true).unwrap(), "skipping specials in {text:?}");
    }
    assert_eq!(ids_of(&python["special_ids"]), (0..19).collect::<Vec<u32>>());
    assert_eq!(python["eos_token"], "<|endoftext|>");
    assert_eq!(python["eos_token_id"], rust.eos_id());
    assert_eq!(python["len"], rust.vocab_size());
}

#[test]
fn rust_and_transformers_encode_and_decode_alike() {
    check(&[
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
        "中文注释 and 日本語 and Ελληνικά\r\n",
        "it's what they've said we'll do, isn't it? I'm sure they'd agree",
        "numbers 1234567890 3.14159 0xFF 1e-9",
        "control \u{0}\u{1}\u{1b}[0m\u{7f} bytes",
    ]);
}

const NAMES: [&str; 8] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];

/// A few hundred lines of Python, Rust and JavaScript, plus a JSONL file.
fn write_corpus(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for (i, name) in NAMES.iter().enumerate() {
        let python = format!(
            "import os\n\n\nclass {Name}Store:\n    \"\"\"Keeps {name} records.\"\"\"\n\n    def __init__(self, path):\n        self.path = path\n        self.items = []\n\n    def add(self, value, weight={i}):\n        if value is None:\n            raise ValueError(\"value must not be None\")\n        self.items.append((value, weight * {i}))\n        return len(self.items)\n\n    def total(self):\n        return sum(weight for _, weight in self.items)\n\n\nfor index in range({n}):\n    print(f\"{name} {{index}}: {{os.getcwd()}}\")\n",
            Name = capitalize(name),
            n = 10 + i,
        );
        fs::write(dir.join(format!("{name}.py")), python).unwrap();
        let rust = format!(
            "use std::collections::HashMap;\n\n/// A {name} counter.\npub struct {Name} {{\n    counts: HashMap<String, usize>,\n}}\n\nimpl {Name} {{\n    pub fn new() -> Self {{\n        Self {{ counts: HashMap::new() }}\n    }}\n\n    pub fn add(&mut self, key: &str) -> usize {{\n        let count = self.counts.entry(key.to_string()).or_insert(0);\n        *count += {i};\n        *count\n    }}\n}}\n\nfn main() {{\n    let mut counter = {Name}::new();\n    println!(\"{{}}\", counter.add(\"{name}\"));\n}}\n",
            Name = capitalize(name),
        );
        fs::write(dir.join(format!("{name}.rs")), rust).unwrap();
        let javascript = format!(
            "// {name}: fetch and render\nconst {name}Url = \"https://example.com/{name}/{i}\";\n\nasync function load{Name}(id) {{\n  const response = await fetch(`${{{name}Url}}/${{id}}`);\n  if (!response.ok) {{\n    throw new Error(`{name} ${{id}} failed: ${{response.status}}`);\n  }}\n  return response.json();\n}}\n\nexport function render{Name}(items) {{\n  return items.map((item, index) => `<li>${{index}}: ${{item.name}}</li>`).join(\"\\n\");\n}}\n",
            Name = capitalize(name),
        );
        fs::write(dir.join(format!("{name}.js")), javascript).unwrap();
    }
    let jsonl: String = NAMES
        .iter()
        .map(|name| {
            let content = format!("def {name}(x):\n    # héllo {name} 🦀\n    return x * 2\n");
            format!("{}\n", json!({"content": content, "lang": "python"}))
        })
        .collect();
    fs::write(dir.join("snippets.jsonl"), jsonl).unwrap();
}

fn capitalize(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map_or_else(String::new, |first| first.to_ascii_uppercase().to_string() + chars.as_str())
}
