//! `wizard serve` through a real LSP client over stdio: JSON-RPC with Content-Length framing, against
//! the built binary. The model is a tiny GPTBigCode whose output is forced to one token ("x"), so
//! completions are known in advance and decoding never ends early on its own.
mod common;

use std::ffi::OsStr;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::lsp::{figures, inline_text, last_figure, read_message, write_message, Client};
use common::WIZARD;
use model::config::ModelConfig;
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tch::{Device, Kind};

/// A model directory: our tokenizer plus a random model whose every prediction is `token`.
fn make_model(dir: &Path, token: &str, n_embd: i64, n_layer: i64) {
    std::fs::create_dir_all(dir).unwrap();
    let corpus = dir.join("corpus.py");
    let code: String = (0..100)
        .map(|i| format!("def function_{i}(value):\n    if value > {i}:\n        return value * {i}\n\n"))
        .collect();
    std::fs::write(&corpus, code).unwrap();
    common::train_tokenizer(&corpus, 400, dir);
    let tokenizer = Tokenizer::from_dir(dir).unwrap();
    let id = tokenizer.token_id(token).unwrap() as i64;
    tch::manual_seed(0);
    let config = ModelConfig {
        vocab_size: tokenizer.vocab_size() as i64,
        n_positions: 1024,
        n_embd,
        n_layer,
        n_head: 4,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        ..ModelConfig::default()
    };
    let model = GptBigCode::new(config, Device::Cpu).unwrap();
    // The final LayerNorm outputs wte[id] scaled up whatever comes in: the tied head then favours `id`.
    tch::no_grad(|| {
        let vars = model.vars().variables();
        let wte = &vars["transformer.wte.weight"];
        let ln_f = &vars["transformer.ln_f.weight"];
        ln_f.shallow_clone().copy_(&ln_f.zeros_like());
        vars["transformer.ln_f.bias"].shallow_clone().copy_(&(wte.get(id) * 100.0));
    });
    model.save(dir, Kind::Float).unwrap();
}

fn model_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("model");
        make_model(&dir, "x", 128, 4);
        (work, dir)
    })
    .1
}

const PY: &str = "file:///work/a.py";

/// One request through every entry point a client may use: inline, completion, llm-ls.
#[test]
fn completions_through_every_method() {
    let mut client = Client::start(model_dir());
    let init = client.initialize(json!({}), json!({"maxTokens": 8}));
    assert_eq!(init["capabilities"]["positionEncoding"], "utf-16");
    assert_eq!(init["capabilities"]["inlineCompletionProvider"], true);
    assert_eq!(init["capabilities"]["textDocumentSync"], 2, "incremental");
    client.open(PY, "python", "def add(a, b):\n    \n\nvalue = ad\nname = value.up\n");
    // An empty body: multi-line; the forced model writes "x" 8 times.
    let text = inline_text(&client.inline(PY, 1, 4).unwrap());
    assert_eq!(text.as_deref(), Some("xxxxxxxx"));
    // textDocument/completion: the same, replacing the word before the cursor ("ad").
    let items = client
        .request(
            "textDocument/completion",
            json!({"textDocument": {"uri": PY}, "position": {"line": 3, "character": 10}}),
        )
        .unwrap();
    let edit = &items[0]["textEdit"];
    assert_eq!(edit["newText"], "adxxxxxxxx");
    assert_eq!(edit["range"], json!({"start": {"line": 3, "character": 8}, "end": {"line": 3, "character": 10}}));
    // llm-ls: camelCase params, snake_case result; tokensToClear removes text.
    let llm = client
        .request(
            "llm-ls/getCompletions",
            json!({"textDocument": {"uri": PY}, "position": {"line": 4, "character": 15}, "contextWindow": 256,
                   "tokensToClear": ["xx"], "fim": {"enabled": true, "prefix": "<fim_prefix>", "middle": "<fim_middle>",
                   "suffix": "<fim_suffix>"}, "requestBody": {"parameters": {"max_new_tokens": 5}}, "ide": "neovim"}),
        )
        .unwrap();
    assert_eq!(llm["completions"], json!([{"generated_text": "x"}]), "{llm}");
    let request_id = llm["request_id"].as_str().unwrap_or_else(|| panic!("no request_id: {llm}"));
    assert!(request_id.strip_prefix("wizard-").is_some_and(|n| n.parse::<u64>().is_ok()), "{llm}");
    assert_eq!(
        client.request(
            "llm-ls/acceptCompletion",
            json!({"request_id": llm["request_id"], "accepted_completion": 0, "shown_completions": [0]})
        ),
        Ok(Value::Null)
    );
    assert_eq!(
        client.request("llm-ls/rejectCompletion", json!({"request_id": llm["request_id"], "shown_completions": [0]})),
        Ok(Value::Null)
    );
    // Inside a word: no completion.
    assert_eq!(client.inline(PY, 4, 14), Ok(Value::Null));
    let llm = client
        .request(
            "llm-ls/getCompletions",
            json!({"textDocument": {"uri": PY}, "position": {"line": 4, "character": 14}}),
        )
        .unwrap();
    assert_eq!(llm["completions"], json!([]));
    client.exit();
}

/// The CUDA libraries (about 350 MiB resident) load only where there is a driver to use them: an
/// editor's server on a machine without one maps none of them.
#[test]
fn cuda_libraries_load_only_with_a_driver() {
    let doctor: Value = serde_json::from_str(&common::check_wizard(&["doctor", "--json"])).unwrap();
    let backend = doctor["cuda_backend"].as_str().unwrap_or_else(|| panic!("{doctor}")).to_string();
    let mut client = Client::start(model_dir());
    client.initialize(json!({}), json!({"maxTokens": 2}));
    client.open(PY, "python", "def add(a, b):\n    \n");
    assert_eq!(inline_text(&client.inline(PY, 1, 4).unwrap()).as_deref(), Some("xx"));
    let maps = client.mapped_files();
    let cuda: Vec<&str> = ["libtorch_cuda.so", "libcublas", "libcudnn", "libnccl"]
        .into_iter()
        .filter(|library| maps.contains(library))
        .collect();
    if backend == "loaded" {
        assert!(cuda.contains(&"libtorch_cuda.so"), "{backend}: {cuda:?}");
    } else {
        assert!(backend.contains("no NVIDIA driver"), "{backend}");
        assert_eq!(cuda, Vec::<&str>::new(), "mapped without a driver");
    }
    client.exit();
}

/// Incremental edits in each encoding, the cache, "typed as suggested", and configuration changes.
#[test]
fn edits_encodings_and_cache() {
    for (offered, name, column) in
        [(json!(["utf-8", "utf-16"]), "utf-8", 12), (json!(["utf-32"]), "utf-32", 8), (json!([]), "utf-16", 9)]
    {
        let mut client = Client::start(model_dir());
        let init =
            client.initialize(json!({"general": {"positionEncodings": offered}}), json!({"wizard": {"maxTokens": 6}}));
        assert_eq!(init["capabilities"]["positionEncoding"], name);
        // "é" is 2 bytes / 1 UTF-16 unit / 1 scalar; "😀" is 4 / 2 / 1. The cursor goes after `s = 'é😀' + `.
        client.open(PY, "python", "s = 'é😀' + \n");
        let changed = json!({"textDocument": {"uri": PY, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": column}, "end": {"line": 0, "character": column}}, "text": "y"}]});
        client.notify("textDocument/didChange", changed);
        // The edit landed after the emoji: the cursor after it is at column + 1.
        let text = inline_text(&client.inline(PY, 0, column + 1).unwrap());
        assert_eq!(text.as_deref(), Some("xxxxxx"), "{name}");
        // Typing the start of the suggestion: the rest comes from the cache.
        let typed = json!({"textDocument": {"uri": PY, "version": 3}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": column + 1}, "end": {"line": 0, "character": column + 1}}, "text": "xx"}]});
        client.notify("textDocument/didChange", typed);
        assert_eq!(inline_text(&client.inline(PY, 0, column + 3).unwrap()).as_deref(), Some("xxxx"));
        // A full-text change and a new configuration.
        client.notify("workspace/didChangeConfiguration", json!({"settings": {"wizard": {"maxTokens": 3}}}));
        client.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": PY, "version": 4}, "contentChanges": [{"text": "z = \n"}]}),
        );
        assert_eq!(inline_text(&client.inline(PY, 0, 4).unwrap()).as_deref(), Some("xxx"));
        assert!(client.log_text().contains("completion served from the cache"), "{}", client.log_text());
        client.exit();
    }
}

/// Every setting that shapes a completion keys the cache, the "typed as suggested" path too: after a
/// configuration change the model runs again. Bad sampling values are refused whole (the settings in
/// force stay, and the editor is told), and a request carrying one answers an error.
#[test]
fn settings_key_the_cache_and_bad_sampling_is_refused() {
    let mut client = Client::start(model_dir());
    client.initialize(json!({}), json!({"maxTokens": 4, "topK": 0}));
    let refused = client.notification("window/showMessage");
    assert!(refused["params"]["message"].as_str().is_some_and(|m| m.contains("top-k must be at least 1")), "{refused}");
    client.open(PY, "python", "x = \n");
    let model_runs = |client: &Client| figures(&client.log_text(), "tokens").len();
    let cache_hits = |client: &Client| client.log_text().matches("completion served from the cache").count();
    let inline = |client: &mut Client, line, character| inline_text(&client.inline(PY, line, character).unwrap());
    // Refused whole: maxTokens stayed at its default of 64.
    assert_eq!(inline(&mut client, 0, 4).map(|text| text.len()), Some(64));
    client.notify("workspace/didChangeConfiguration", json!({"settings": {"maxTokens": 4}}));
    assert_eq!(inline(&mut client, 0, 4).as_deref(), Some("xxxx"));
    assert_eq!(inline(&mut client, 0, 4).as_deref(), Some("xxxx"));
    assert_eq!((model_runs(&client), cache_hits(&client)), (2, 1), "the same request again: from the cache");
    // Each change below alters the completion's settings: the model runs again, nothing from the cache.
    let changes = [json!({"temperature": 0.7}), json!({"topP": 0.9}), json!({"topK": 3}), json!({"suffixShare": 0.5})];
    for (i, change) in changes.iter().enumerate() {
        client.notify("workspace/didChangeConfiguration", json!({"settings": change}));
        assert!(inline(&mut client, 0, 4).is_some(), "{change}");
        assert_eq!((model_runs(&client), cache_hits(&client)), (i + 3, 1), "after {change}: {}", client.log_text());
    }
    client.notify("workspace/didChangeConfiguration", json!({"settings": {"temperature": 0}}));
    assert_eq!(inline(&mut client, 0, 4).as_deref(), Some("xxxx"));
    // Typed as suggested, then a new setting: the rest is computed, not taken from the shown completion.
    let typed = json!({"textDocument": {"uri": PY, "version": 2}, "contentChanges": [
        {"range": {"start": {"line": 0, "character": 4}, "end": {"line": 0, "character": 4}}, "text": "xx"}]});
    client.notify("textDocument/didChange", typed);
    client.notify("workspace/didChangeConfiguration", json!({"settings": {"snippets": false}}));
    assert_eq!(inline(&mut client, 0, 6).as_deref(), Some("xxxx"));
    assert_eq!((model_runs(&client), cache_hits(&client)), (8, 1), "{}", client.log_text());
    // A configuration with a bad value changes nothing: the last completion comes from the cache.
    for (bad, message) in [
        (json!({"topP": 1.5, "maxTokens": 2}), "top-p must be in (0, 1], got 1.5"),
        (json!({"temperature": -1}), "temperature"),
        (json!({"suffixShare": 1.5}), "suffixShare must be in [0, 1]"),
    ] {
        client.notify("workspace/didChangeConfiguration", json!({"settings": {"wizard": bad}}));
        let shown = client.notification("window/showMessage");
        assert!(shown["params"]["message"].as_str().is_some_and(|m| m.contains(message)), "{bad}: {shown}");
        assert_eq!(inline(&mut client, 0, 6).as_deref(), Some("xxxx"), "{bad}");
    }
    assert_eq!((model_runs(&client), cache_hits(&client)), (8, 4), "{}", client.log_text());
    // llm-ls parameters are checked the same way.
    for (parameters, message) in [
        (json!({"top_p": 0.0}), "top-p"),
        (json!({"top_k": 0}), "top-k"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_k": 2.5}), "top_k must be a whole number"),
    ] {
        let error = client
            .request(
                "llm-ls/getCompletions",
                json!({"textDocument": {"uri": PY}, "position": {"line": 0, "character": 6}, "requestBody": {"parameters": parameters}}),
            )
            .unwrap_err();
        assert_eq!(error["code"], -32602, "{parameters}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| m.contains(message)), "{parameters}: {error}");
    }
    client.exit();
}

/// `$/cancelRequest` and a newer request for the same document cancel the completion in flight: it is
/// answered RequestCancelled (before the newer request is), finishes no completion, and the engine
/// serves the next request. That decoding stops within a step of the flag is the engine's own test.
#[test]
fn cancellation() {
    let mut client = Client::start(model_dir());
    client.initialize(json!({}), json!({"maxTokens": 1000, "gamma": 0}));
    client.open(PY, "python", "x = \ny = \n");
    let completed = |client: &Client| figures(&client.log_text(), "tokens");
    // Uncancelled, a completion runs to its 1000 tokens: long enough that the cancels below arrive
    // while it decodes, on a loaded machine too.
    let full = inline_text(&client.inline(PY, 0, 4).unwrap()).unwrap();
    assert_eq!(full.len(), 1000);
    assert_eq!(completed(&client), [1000.0]);
    // $/cancelRequest once decoding has started: the answer is RequestCancelled.
    let id = client.inline_async(PY, 1, 4);
    std::thread::sleep(Duration::from_millis(30));
    client.notify("$/cancelRequest", json!({"id": id}));
    assert_eq!(client.response(id).unwrap_err()["code"], -32800);
    // A newer request for the document cancels the one in flight, which is answered first.
    client.notify("workspace/didChangeConfiguration", json!({"settings": {"maxTokens": 999}}));
    let older = client.inline_async(PY, 1, 4);
    std::thread::sleep(Duration::from_millis(30));
    client.notify("workspace/didChangeConfiguration", json!({"settings": {"maxTokens": 4}}));
    let newer = client.inline(PY, 0, 3);
    assert!(client.has_response(older), "the newer request was answered before the cancelled one");
    assert_eq!(client.response(older).unwrap_err()["code"], -32800);
    assert_eq!(inline_text(&newer.unwrap()).as_deref(), Some("xxxx"));
    // Only the uncancelled completions were finished: the cancelled ones ended in the decode loop.
    assert_eq!(completed(&client), [1000.0, 4.0], "{}", client.log_text());
    client.exit();
}

/// A model that ends at once completes nothing: no item, from the model and from the cache alike.
#[test]
fn an_empty_completion_is_none() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("model");
    make_model(&dir, "<|endoftext|>", 32, 1);
    let mut client = Client::start(&dir);
    client.initialize(json!({}), json!({"maxTokens": 8}));
    client.open(PY, "python", "def add(a, b):\n    \n");
    assert_eq!(client.inline(PY, 1, 4), Ok(Value::Null));
    assert_eq!(client.inline(PY, 1, 4), Ok(Value::Null), "from the cache");
    assert!(client.log_text().contains("completion served from the cache"), "{}", client.log_text());
    client.exit();
}

/// Unknown documents, bad positions, huge and binary files, edit storms, and a model that fails to
/// load: errors, never a crash.
#[test]
fn bad_input() {
    let mut client = Client::start(model_dir());
    client.initialize(json!({}), json!({"maxTokens": 4}));
    let unknown = client.inline("file:///nowhere.py", 0, 0).unwrap_err();
    assert_eq!(unknown["code"], -32602, "{unknown}");
    client.open(PY, "python", "a😀b\n");
    assert_eq!(client.inline(PY, 0, 2).unwrap_err()["code"], -32602, "inside a surrogate pair");
    assert_eq!(client.inline(PY, 7, 0).unwrap_err()["code"], -32602, "past the last line");
    // A character past the line's end means its end, in the answer's range too.
    let end = json!({"line": 0, "character": 4});
    assert_eq!(client.inline(PY, 0, 40).unwrap()[0]["range"], json!({"start": end, "end": end}));
    // A 10 MB file: the prompt takes its budget from around the cursor.
    let big: String = "value = value + 1\n".repeat(10 << 20 >> 4);
    client.open("file:///work/big.py", "python", &format!("{big}z = \n"));
    let lines = big.lines().count() as u32;
    assert_eq!(inline_text(&client.inline("file:///work/big.py", lines, 4).unwrap()).as_deref(), Some("xxxx"));
    let prompt_tokens = last_figure(&client.log_text(), "prompt_tokens");
    assert!((2.0..=1024.0).contains(&prompt_tokens), "a prompt of {prompt_tokens} tokens, over the 1024 budget");
    client.notify("textDocument/didClose", json!({"textDocument": {"uri": "file:///work/big.py"}}));
    // Binary content.
    client.open("file:///work/blob.bin", "plaintext", "\u{0}\u{1}\u{fffd}\u{7f}ÿ\n\u{0}");
    let blob = client.inline("file:///work/blob.bin", 0, 2).unwrap_or_else(|e| panic!("binary content: {e}"));
    assert_eq!(inline_text(&blob).as_deref(), Some("xxxx"), "{blob}");
    // 1000 edits in a burst, then a request that sees all of them.
    client.open("file:///work/c.py", "python", "\n");
    for i in 0..1000 {
        client.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": "file:///work/c.py", "version": i + 2}, "contentChanges": [
                {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "#"}]}),
        );
    }
    assert_eq!(inline_text(&client.inline("file:///work/c.py", 0, 1000).unwrap()).as_deref(), Some("xxxx"));
    client.exit();

    // A model directory that does not load: the server stays up and says why.
    let missing = tempfile::tempdir().unwrap();
    let mut client = Client::start(missing.path());
    client.initialize(json!({}), json!({}));
    client.open(PY, "python", "x = \n");
    let error = client.inline(PY, 0, 4).unwrap_err();
    assert!(error["message"].as_str().unwrap().contains("not available"), "{error}");
    // The client is told the model did not load (the notification may come after the error).
    let shown = client.notification("window/showMessage");
    assert!(shown["params"]["message"].as_str().is_some_and(|m| m.contains("the model did not load")), "{shown}");
    client.exit();
}

/// Speculative decoding in the server: with a draft model, or the target's own int8 or int4 copy
/// (self-speculation), the completions are the same.
#[test]
fn a_draft_model_gives_the_same_completions() {
    let work = tempfile::tempdir().unwrap();
    let draft = work.path().join("draft");
    make_model(&draft, "x", 32, 1);
    let log = check_drafting(&["--draft".as_ref(), draft.as_os_str()]);
    assert!(log.contains("drafts come from a draft model"), "{log}");
    let own = model_dir().as_os_str();
    for (dtype, precision) in [("int8", "precision=Quantized(Int8)"), ("int4", "precision=Quantized(Int4)")] {
        let log = check_drafting(&["--draft".as_ref(), own, "--draft-dtype".as_ref(), dtype.as_ref()]);
        assert!(log.contains(precision) && log.contains("drafts come from the target's own copy"), "{log}");
    }
}

/// `wizard serve` with the drafting arguments `extra` completes as the target alone does, with most
/// tokens from the drafts, and keeps the keys and values of the last request for the next; returns
/// the server's log.
fn check_drafting(extra: &[&OsStr]) -> String {
    let mut client = Client::start_with(model_dir(), extra);
    // Drafts of a fixed length: the cost model's choice rests on timings, which a busy machine moves.
    client.initialize(json!({}), json!({"maxTokens": 16, "fixedGamma": true}));
    client.open(PY, "python", "x = \n");
    assert_eq!(inline_text(&client.inline(PY, 0, 4).unwrap()).as_deref(), Some("xxxxxxxxxxxxxxxx"), "{extra:?}");
    // The draft agrees with the target everywhere: most of the tokens came from it.
    let log = client.log_text();
    let figure = |name: &str| last_figure(&log, name);
    assert!(figure("accepted") >= 10.0, "{extra:?}: accepted {} of 16:\n{log}", figure("accepted"));
    // The request's span has the prompt, prefill and decode figures too.
    assert!(figure("prompt_tokens") > 1.0 && figure("prefill_ms") > 0.0 && figure("decode_ms") > 0.0, "{log}");
    assert_eq!(figure("reused_tokens"), 0.0, "nothing to reuse in the first request");
    // Typing on (not the suggestion): the next prompt starts like the last one, whose keys and values
    // both models kept; the completion is the same as without them.
    let typed = json!({"textDocument": {"uri": PY, "version": 2}, "contentChanges": [{"text": "x = 1 + \n"}]});
    client.notify("textDocument/didChange", typed);
    assert_eq!(inline_text(&client.inline(PY, 0, 8).unwrap()).as_deref(), Some("xxxxxxxxxxxxxxxx"), "{extra:?}");
    let log = client.log_text();
    let reused = last_figure(&log, "reused_tokens");
    assert!(reused >= 3.0, "{extra:?}: reused_tokens={reused}:\n{log}");
    client.exit();
    log
}

/// The Lua that drives Neovim: starts `wizard serve` as the buffer's language server and writes the
/// completion result it receives to $OUT.
const NEOVIM_SCRIPT: &str = r#"
local ready = false
local id = vim.lsp.start_client({
  name = 'wizard',
  cmd = { os.getenv('WIZARD'), 'serve', '--device', 'cpu', '--model', os.getenv('MODEL') },
  root_dir = vim.fn.getcwd(),
  init_options = { maxTokens = 6 },
  on_init = function() ready = true end,
})
vim.lsp.buf_attach_client(0, id)
assert(vim.wait(30000, function() return ready end, 20), 'the server did not initialize')
local params = { textDocument = { uri = vim.uri_from_bufnr(0) }, position = { line = 1, character = 4 } }
local results = vim.lsp.buf_request_sync(0, 'textDocument/completion', params, 30000)
local text = 'no result'
for _, response in pairs(results or {}) do
  text = vim.fn.json_encode(response.result or response.err)
end
vim.fn.writefile({ text }, os.getenv('OUT'))
vim.cmd('qa!')
"#;

/// A real editor: headless Neovim (Debian's, installed by scripts/setup.sh) opens a Python buffer
/// with `wizard serve` as its language server and receives a completion.
#[test]
fn neovim_receives_a_completion() {
    let work = tempfile::tempdir().unwrap();
    let (file, script, out) = (work.path().join("a.py"), work.path().join("test.lua"), work.path().join("out.json"));
    std::fs::write(&file, "def add(a, b):\n    \n").unwrap();
    std::fs::write(&script, NEOVIM_SCRIPT).unwrap();
    let status = Command::new("nvim")
        .args(["--headless", "-u", "NONE", "-n"])
        .arg(&file)
        .arg("-c")
        .arg(format!("luafile {}", script.display()))
        .current_dir(work.path())
        .env("WIZARD", WIZARD)
        .env("MODEL", model_dir())
        .env("OUT", &out)
        .stdin(Stdio::null())
        .status()
        .expect("nvim is installed by scripts/setup.sh (apt-get install neovim)");
    assert!(status.success(), "nvim: {status}");
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let items = result.as_array().unwrap_or_else(|| panic!("{result}"));
    assert_eq!(items[0]["textEdit"]["newText"], "xxxxxx", "{result}");
}

/// `--port`: the same protocol over TCP on loopback; a burst of connections past the process's
/// file limit does not stop it (a failed accept once ended the server).
#[test]
fn serves_over_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", WIZARD])
        .args(["serve", "--device", "cpu", "--port", &port.to_string(), "--model"])
        .arg(model_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).ok();
    common::wait_until(&format!("wizard serve listening on port {port}"), Duration::from_secs(20), || {
        connect().is_some()
    });
    let burst: Vec<_> = (0..100).filter_map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the server exited at {} connections", burst.len());
    drop(burst);
    std::thread::sleep(Duration::from_millis(300));
    // A header that never ends is cut off at its limit, not buffered.
    let mut endless = connect().expect("listening after the burst");
    endless.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = endless.write_all(format!("X-Pad: {}", "a".repeat(64 << 10)).as_bytes());
    let read = endless.read(&mut [0u8; 64]);
    let timed_out = read.as_ref().is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    assert!(!timed_out, "a header of 64 KiB without an end kept the session open");
    let mut stream = connect().expect("listening after the burst");
    write_message(
        &mut stream,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}),
    );
    let response = read_message(&mut BufReader::new(stream)).expect("an answer to initialize");
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(response["result"]["capabilities"]["inlineCompletionProvider"], true, "{response}");
    assert!(output.stdout.is_empty(), "stdout is not used with --port: {:?}", String::from_utf8_lossy(&output.stdout));
}
